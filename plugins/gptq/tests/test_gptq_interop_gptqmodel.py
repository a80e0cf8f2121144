"""GPTQ checkpoints across tools: quantcore's read by transformers + GPTQModel, GPTQModel's read by quantcore.

Runs only where ``gptqmodel`` and ``optimum`` are installed (not in CI: GPTQModel 7.7 needs a newer
torch than the pinned one; docs/gptq.md says how these were run). Both directions check that every
layer dequantizes to the same weights in either tool, and that the logits agree to the rounding of
the reading kernel.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import quantcore

# GPTQModel sizes a CPU thread pool from the core count and refuses to quantize when it asks for
# more workers than it has (2 cores); an explicit count avoids that.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
gptqmodel = pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")
transformers = pytest.importorskip("transformers")

from quantcore_gptq import GPTQConfig, GPTQLinear  # noqa: E402

from .conftest import VOCAB  # noqa: E402


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


def load_with_transformers(folder, backend):
    """transformers' GPTQ path (optimum + GPTQModel), CPU, with GPTQModel's ``backend`` kernel."""
    config = transformers.GPTQConfig(bits=4, backend=backend)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map="cpu", dtype=torch.float32, quantization_config=config
    ).eval()


def gptqmodel_weights(model) -> dict[str, torch.Tensor]:
    """Each GPTQModel layer's weight as GPTQModel dequantizes it: fp16, ``[out, in]``."""
    return {name: m.dequantize_weight().t() for name, m in model.named_modules() if hasattr(m, "dequantize_weight")}


def quantcore_weights(model) -> dict[str, torch.Tensor]:
    """Each GPTQ layer of a quantcore model dequantized (in float32), rounded to fp16 as GPTQModel's are."""
    model = copy.deepcopy(model)
    names = [name for name, m in model.named_modules() if isinstance(m, GPTQLinear)]
    quantcore.dequantize(model)
    return {name: model.get_submodule(name).weight.detach().half() for name in names}


def assert_same_weights(ours: dict, theirs: dict):
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    for name, weight in ours.items():
        # scale * (code - zero) is exact in float32 for 4-bit codes, so one rounding to fp16 gives
        # GPTQModel's fp16 product bit for bit: any packing or zero-point difference shows here.
        assert torch.equal(weight, theirs[name]), name


@pytest.mark.parametrize("sym", [True, False])
def test_transformers_and_gptqmodel_read_quantcore_checkpoints(tiny_llama, calibration, prompt, tmp_path, sym):
    quantcore.quantize(tiny_llama, GPTQConfig(bits=4, group_size=32, sym=sym), calibration=calibration)
    quantcore.save_quantized(tiny_llama, tmp_path)
    ours = logits(tiny_llama, prompt)

    # GPTQModel's reference kernel: dequantize to fp16, then a float matmul
    reference = load_with_transformers(tmp_path, "torch")
    assert type(reference.model.layers[0].self_attn.q_proj).__name__ == "TorchLinear"
    assert_same_weights(quantcore_weights(tiny_llama), gptqmodel_weights(reference))
    assert relative_error(logits(reference, prompt), ours) < 1e-3  # fp16 weights vs float32 ones

    # what transformers picks on a CPU by default: aten's int4 kernel with bf16 scales and inputs
    default = load_with_transformers(tmp_path, "auto")
    assert relative_error(logits(default, prompt), ours) < 1e-2


@pytest.mark.parametrize(
    ("bits", "desc_act", "checkpoint_format"),
    [(4, True, "gptq"), (2, False, "gptq"), (3, False, "gptq"), (8, False, "gptq"), (4, False, "gptq_v2")],
)
def test_other_bit_widths_act_order_and_v2(
    tiny_llama, calibration, prompt, tmp_path, bits, desc_act, checkpoint_format
):
    config = GPTQConfig(bits=bits, group_size=32, sym=False, desc_act=desc_act, format=checkpoint_format)
    quantcore.quantize(tiny_llama, config, calibration=calibration)
    quantcore.save_quantized(tiny_llama, tmp_path)
    reference = load_with_transformers(tmp_path, "torch")
    assert_same_weights(quantcore_weights(tiny_llama), gptqmodel_weights(reference))
    assert relative_error(logits(reference, prompt), logits(tiny_llama, prompt)) < 1e-3


def test_quantcore_reads_a_gptqmodel_checkpoint(tiny_llama, prompt, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers

    source, quantized = tmp_path / "float", tmp_path / "gptqmodel"
    tiny_llama.save_pretrained(source)
    # GPTQModel loads a tokenizer with the model; a word-level one over the tiny vocabulary
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="t0", pad_token="t1", bos_token="t2", eos_token="t3"
    ).save_pretrained(source)

    gen = torch.Generator().manual_seed(1)
    calibration = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for ids in (torch.randint(0, VOCAB, (1, 32), generator=gen) for _ in range(8))
    ]
    config = gptqmodel.QuantizeConfig(bits=4, group_size=32, sym=False)
    model = gptqmodel.GPTQModel.load(str(source), config, device="cpu")
    monkeypatch.chdir(tmp_path)  # GPTQModel writes its quantization log under ./logs
    model.quantize(calibration)
    model.save(str(quantized))

    ours = quantcore.from_pretrained(quantized, dtype=torch.float32)
    assert isinstance(ours.model.layers[1].mlp.down_proj, GPTQLinear)
    reference = load_with_transformers(quantized, "torch")
    assert_same_weights(quantcore_weights(ours), gptqmodel_weights(reference))
    ours_logits = logits(ours, prompt)
    assert relative_error(logits(reference, prompt), ours_logits) < 1e-3
    assert relative_error(logits(ours, prompt), logits(tiny_llama, prompt)) < 0.1  # it is the same model


def test_a_zero_point_of_zero_reads_the_same_in_v1(tiny_llama, calibration, prompt, tmp_path):
    """v1 stores zero points minus one per packed word, so a zero point of 0 borrows from the next
    one; GPTQModel's v1 -> v2 conversion must undo it as quantcore does."""
    from quantcore_gptq.packing import pack_cols, unpack_cols, zeros_from_v1, zeros_to_v1

    quantcore.quantize(tiny_llama, GPTQConfig(bits=4, group_size=32, sym=False), calibration=calibration)
    for layer in tiny_llama.modules():
        if isinstance(layer, GPTQLinear):
            zeros = unpack_cols(zeros_from_v1(layer.qzeros, 4), 4, layer.scales.shape[1])
            zeros[:, ::3] = 0  # first, middle and last codes of the packed words
            layer.qzeros = zeros_to_v1(pack_cols(zeros, 4), 4)
            # the borrow is there: unpacking the stored words and adding one per code gets it wrong
            assert not torch.equal(unpack_cols(layer.qzeros, 4, zeros.shape[1]) + 1, zeros)
    quantcore.save_quantized(tiny_llama, tmp_path)
    reference = load_with_transformers(tmp_path, "torch")
    assert_same_weights(quantcore_weights(tiny_llama), gptqmodel_weights(reference))
    assert relative_error(logits(reference, prompt), logits(tiny_llama, prompt)) < 1e-3
