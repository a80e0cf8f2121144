"""Against transformers: the same quantized tensors as its bitsandbytes path; a Llama end to end."""

from __future__ import annotations

import pytest
import torch
from quantcore_bnb import BitsAndBytesConfig

import quantcore

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

CASES = [
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    dict(load_in_8bit=True),
]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a, b) if a.dim() == 0 else torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("kwargs", CASES, ids=repr)
def test_same_tensors_as_transformers_from_pretrained(tmp_path, tiny_llama, kwargs):
    tiny_llama.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=transformers.BitsAndBytesConfig(**kwargs),
        dtype=torch.float32,
        device_map="cpu",
    )
    report = quantcore.quantize(tiny_llama, {"quant_method": "bitsandbytes", **kwargs})
    ours_sd, theirs_sd = tiny_llama.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    for key, value in theirs_sd.items():
        assert _same_bits(ours_sd[key], value), key
    layer_types = {type(m) for m in theirs.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    assert {type(tiny_llama.get_submodule(r.name)) for r in report.quantized} == layer_types
    assert len(report.quantized) == 2 * 7 and report.record("lm_head").action == "skipped"
    # the same model: both in eval mode (int8 takes another matmul path in training), same logits
    assert not tiny_llama.training and not any(m.training for m in tiny_llama.modules())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize(
    ("kwargs", "bound"),
    [
        (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), 0.25),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), 0.25),
        (dict(load_in_8bit=True), 0.05),
    ],
    ids=["nf4", "nf4-dq", "int8"],
)
def test_llama_end_to_end(tiny_llama, kwargs, bound):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_llama(ids).logits
    report = quantcore.quantize(tiny_llama, {"quant_method": "bitsandbytes", **kwargs})
    assert type(tiny_llama.lm_head) is torch.nn.Linear  # the output head stays in float by default
    assert tiny_llama.model.layers[0].mlp.down_proj in [tiny_llama.get_submodule(r.name) for r in report.quantized]
    with torch.no_grad():
        logits = tiny_llama(ids).logits
    assert torch.isfinite(logits).all()
    assert ((logits - expected).norm() / expected.norm()).item() < bound
    assert report.bytes_after < report.bytes_before


def test_skip_modules_from_config(tiny_llama):
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["mlp"])
    report = quantcore.quantize(tiny_llama, config)
    assert all("mlp" not in r.name for r in report.quantized)
    assert type(tiny_llama.model.layers[0].mlp.up_proj) is torch.nn.Linear
