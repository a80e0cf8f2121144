"""GPTQ on a tiny Llama: quantize with calibration, save in the GPTQ format, load back, load the Hub's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import quantcore_gptq.calibration
import torch
from quantcore_gptq import GPTQConfig, GPTQLinear
from safetensors.torch import load_file, save_file
from torch import nn

import quantcore
from quantcore import ConfigError

from .conftest import CUDA
from .reference import dequantize_v1_4bit, pack_autogptq

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("sym", [False, True])
def test_quantize_replaces_every_block_linear_and_stays_close(tiny_llama, calibration, prompt, sym):
    before = logits(tiny_llama, prompt)
    report = quantcore.quantize(tiny_llama, GPTQConfig(bits=4, group_size=32, sym=sym), calibration=calibration)
    names = {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    assert {r.name for r in report.quantized} == names
    assert {r.calibration_tokens for r in report.quantized} == {8 * 32}
    assert report.record("lm_head").action == "skipped"
    layer = tiny_llama.model.layers[1].mlp.down_proj
    assert isinstance(layer, GPTQLinear)
    assert (layer.qweight.dtype, layer.qzeros.dtype, layer.scales.dtype, layer.g_idx.dtype) == (
        torch.int32,
        torch.int32,
        torch.float16,
        torch.int32,
    )
    assert relative_error(logits(tiny_llama, prompt), before) < 0.1


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths(tiny_llama, calibration, prompt, bits):
    before = logits(tiny_llama, prompt)
    report = quantcore.quantize(tiny_llama, GPTQConfig(bits=bits, group_size=64), calibration=calibration)
    assert len(report.quantized) == 14
    bound = {2: 0.6, 3: 0.25, 8: 0.01}[bits]
    assert relative_error(logits(tiny_llama, prompt), before) < bound


def test_gptq_beats_its_own_rounding_on_the_model(tiny_llama, calibration, prompt, monkeypatch):
    """The same format with plain rounding (every Hessian left empty) moves the logits more."""
    import copy

    from quantcore_gptq import gptq

    before = logits(tiny_llama, prompt)
    rounded = copy.deepcopy(tiny_llama)
    config = GPTQConfig(bits=3, group_size=32, sym=False)
    quantcore.quantize(tiny_llama, config, calibration=calibration)
    monkeypatch.setattr(gptq.Hessian, "add", lambda self, x: None)
    quantcore.quantize(rounded, config, calibration=calibration)
    assert relative_error(logits(tiny_llama, prompt), before) < 0.9 * relative_error(logits(rounded, prompt), before)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_layers_sharing_an_input_are_grouped_in_call_order(tiny_llama, calibration, monkeypatch, true_sequential):
    """Llama's q/k/v, then o, then gate/up, then down: found from the inputs, not from names."""
    seen: list[tuple[int, int]] = []
    original = quantcore_gptq.calibration.gptq_quantize

    def recording(weight, hessian, **options):
        seen.append((weight.shape[0], hessian.rows))
        return original(weight, hessian, **options)

    monkeypatch.setattr(quantcore_gptq.calibration, "gptq_quantize", recording)
    config = GPTQConfig(bits=4, group_size=32, true_sequential=true_sequential)
    quantcore.quantize(tiny_llama, config, calibration=calibration)
    # rows stacked per GPTQ run: q (64) + k (32) + v (32); o; gate + up; down -- for each of 2 blocks
    assert seen == [(128, 256), (64, 256), (256, 256), (64, 256)] * 2


def test_no_calibration_is_an_error_naming_it(tiny_llama):
    with pytest.raises(ConfigError, match="calibration: gptq int4 g128 sym needs calibration data"):
        quantcore.quantize(tiny_llama, GPTQConfig(bits=4))
    plan = quantcore.quantize(tiny_llama, GPTQConfig(bits=4), dry_run=True)
    assert len(plan.quantized) == 14 and not any(isinstance(m, GPTQLinear) for m in tiny_llama.modules())


def test_calibration_from_dataset_texts_and_a_tokenizer(tiny_llama):
    class CharTokenizer:
        """Byte-level: one token per character, as ids below the tiny vocabulary."""

        def __call__(self, text, return_tensors="pt"):
            return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}

    config = GPTQConfig(
        bits=4, dataset=["to be or not to be", "that is the question"], tokenizer=CharTokenizer(), model_seqlen=10
    )
    report = quantcore.quantize(tiny_llama, config)
    assert report.record("model.layers.0.mlp.up_proj").calibration_tokens == 20
    with pytest.raises(ValueError, match="does not download"):
        quantcore.quantize(tiny_llama, GPTQConfig(bits=4, dataset="c4", tokenizer=CharTokenizer()))


def test_save_and_reload_give_equal_logits(tiny_llama, calibration, prompt, tmp_path):
    quantcore.quantize(tiny_llama, GPTQConfig(bits=4, group_size=32, sym=False, desc_act=True), calibration=calibration)
    expected = logits(tiny_llama, prompt)
    quantcore.save_quantized(tiny_llama, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert {k: config[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 32,
        "sym": False,
        "desc_act": True,
        "checkpoint_format": "gptq",
    }
    tensors = load_file(tmp_path / "model.safetensors")
    prefix = "model.layers.0.self_attn.q_proj."
    assert {k[len(prefix) :]: (v.dtype, tuple(v.shape)) for k, v in tensors.items() if k.startswith(prefix)} == {
        "qweight": (torch.int32, (8, 64)),
        "qzeros": (torch.int32, (2, 8)),
        "scales": (torch.float16, (2, 64)),
        "g_idx": (torch.int32, (64,)),
    }
    loaded = quantcore.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, GPTQLinear)
    assert torch.equal(logits(loaded, prompt), expected)


def test_our_tensors_read_the_way_gptqmodel_reads_v1(tiny_llama, calibration):
    """An independent reader of the saved format (word-level +1 on qzeros) gets our weights back."""
    quantcore.quantize(tiny_llama, GPTQConfig(bits=4, group_size=32, sym=False), calibration=calibration)
    for name in LINEARS:
        layer = tiny_llama.model.layers[0].get_submodule(name)
        ours = layer.dequantized_weight(torch.float32).numpy()
        theirs = dequantize_v1_4bit(layer.qweight, layer.qzeros, layer.scales, layer.g_idx)
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6)


def hub_checkpoint(model: nn.Module, folder, *, group_size: int = 32) -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint written as AutoGPTQ writes one (symmetric, v1), built with the reference packer.

    Returns the dequantized float weights it stands for, by module name.
    """
    state = {k: v for k, v in model.state_dict().items() if not any(f".{n}." in k for n in LINEARS)}
    expected = {}
    for i, layer in enumerate(model.model.layers):
        for name in LINEARS:
            linear = layer.get_submodule(name)
            w = linear.weight.detach().float()
            out_f, in_f = w.shape
            groups = in_f // group_size
            g = w.reshape(out_f, groups, group_size)
            scales = (g.abs().amax(-1) / 7).half().float().clamp(min=1e-4)  # [out, groups]
            codes = torch.clamp(torch.round(g / scales[..., None]) + 8, 0, 15).reshape(out_f, in_f).to(torch.int64)
            prefix = f"model.layers.{i}.{name}."
            intweight = codes.t().contiguous().numpy()
            state[prefix + "qweight"] = torch.from_numpy(pack_autogptq(intweight, 4).view(np.int32))
            zeros_minus_one = np.full((groups, out_f), 7, dtype=np.uint32)  # v1: zero point 8 stored as 7
            state[prefix + "qzeros"] = torch.from_numpy(pack_autogptq(zeros_minus_one.T, 4).T.copy().view(np.int32))
            state[prefix + "scales"] = scales.t().contiguous().half()
            state[prefix + "g_idx"] = torch.arange(in_f, dtype=torch.int32) // group_size
            expected[f"model.layers.{i}.{name}"] = ((codes - 8) * scales.repeat_interleave(group_size, 1)).float()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"}
    )
    config = model.config.to_dict()
    config["quantization_config"] = {
        "bits": 4,
        "group_size": group_size,
        "damp_percent": 0.01,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": None,
        "quant_method": "gptq",
        "method": "gptq",  # GPTQModel 7.x writes this beside quant_method
        "checkpoint_format": "gptq",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return expected


def test_a_hub_gptq_checkpoint_loads(tiny_llama, prompt, tmp_path):
    expected = hub_checkpoint(tiny_llama, tmp_path)
    loaded = quantcore.from_pretrained(tmp_path, dtype=torch.float32)
    report = quantcore.loading.get_report(loaded)
    assert len(report.quantized) == 14 and report.quantized[0].method == "gptq int4 g32 sym"
    for name, weight in expected.items():
        torch.testing.assert_close(loaded.get_submodule(name).dequantized_weight(torch.float32), weight)
        tiny_llama.get_submodule(name).weight.data = weight
    torch.testing.assert_close(logits(loaded, prompt), logits(tiny_llama, prompt), rtol=1e-4, atol=1e-4)


def test_dequantize_gives_back_float_linears(tiny_llama, calibration, prompt):
    quantcore.quantize(tiny_llama, GPTQConfig(bits=4, group_size=32), calibration=calibration)
    expected = logits(tiny_llama, prompt)
    report = quantcore.dequantize(tiny_llama)
    assert len(report.modules) == 14 and type(tiny_llama.model.layers[0].mlp.up_proj) is nn.Linear
    torch.testing.assert_close(logits(tiny_llama, prompt), expected)


def test_gptq_and_transformers_configs_load_each_other():
    transformers = pytest.importorskip("transformers")
    theirs = transformers.GPTQConfig(bits=3, group_size=64, desc_act=True, sym=False, damp_percent=0.05)
    ours = GPTQConfig.from_dict(theirs.to_dict())
    assert (ours.bits, ours.group_size, ours.desc_act, ours.sym, ours.damp_percent, ours.format) == (
        3,
        64,
        True,
        False,
        0.05,
        "gptq",
    )
    back = transformers.GPTQConfig.from_dict(ours.to_dict())
    back_format = back.format if hasattr(back, "format") else back.checkpoint_format  # transformers 4.x's name
    assert (back.bits, back.group_size, back.desc_act, back.sym, back_format) == (3, 64, True, False, "gptq")


def test_bad_config_values_are_listed_together():
    with pytest.raises(ConfigError) as info:
        GPTQConfig.from_dict(
            {"quant_method": "gptq", "bits": 5, "group_size": 0, "damp_percent": 1.5, "fromat": "gptq"}
        )
    assert sorted(field for field, _ in info.value.errors) == ["bits", "damp_percent", "fromat", "group_size"]
    with pytest.raises(ConfigError, match="bits: required field is missing"):
        GPTQConfig.from_dict({"quant_method": "gptq"})


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_blocks_calibrate_on_the_gpu_while_the_model_stays_on_the_cpu(tiny_llama, calibration, prompt):
    quantcore.quantize(
        tiny_llama, GPTQConfig(bits=4, group_size=32), calibration=calibration, calibration_device="cuda"
    )
    assert {t.device.type for t in (*tiny_llama.parameters(), *tiny_llama.buffers())} == {"cpu"}
    assert torch.isfinite(logits(tiny_llama, prompt)).all()


def test_quantize_on_load_is_refused_before_reading(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="quantization_config: gptq int4 g128 sym quantizes from calibration data"):
        quantcore.from_pretrained(tmp_path, quantization_config=GPTQConfig(bits=4))
