"""torchao on CUDA: int4 weight-only (tinygemm), int8 and float8 with torchao's kernels (``-m gpu``)."""

from __future__ import annotations

import pytest

pytest.importorskip("torchao", reason="torchao is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import torch
from quantcore_torchao import TorchAoConfig, TorchAoLinear
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    PerRow,
)

import quantcore
from quantcore.quantizer import module_nbytes

pytestmark = pytest.mark.gpu


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


# (config, the weight's tensor subclass, bound on the relative error of the logits against bf16)
GPU_FORMATS = [
    pytest.param(
        Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
        "Int4TilePackedTo4dTensor",
        0.25,
        id="int4-tinygemm-g128",
    ),
    pytest.param(Int8WeightOnlyConfig(version=2), "Int8Tensor", 0.05, id="int8-weight-only"),
    pytest.param(Int8DynamicActivationInt8WeightConfig(version=2), "Int8Tensor", 0.08, id="int8-dynamic"),
    pytest.param(Float8WeightOnlyConfig(), "Float8Tensor", 0.1, id="float8-weight-only"),
    pytest.param(
        Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
        "Float8Tensor",
        0.1,
        id="float8-dynamic-per-row",
        marks=pytest.mark.skipif(not _fp8_capable(), reason="needs compute capability 8.9+ (H100, L4, ...)"),
    ),
]


@pytest.fixture
def bf16_llama(tiny_llama, tmp_path):
    # A bf16 model as users get one, from from_pretrained: tiny_llama.to(torch.bfloat16) would also
    # cast the rotary embedding's inv_freq, which every load (ours, transformers') keeps in float32,
    # and the reloaded models' logits would differ from it in the last bits.
    tiny_llama.save_pretrained(tmp_path / "float32")
    return transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float32", dtype=torch.bfloat16, device_map="cuda"
    ).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize(("quant_type", "tensor_type", "bound"), GPU_FORMATS)
def test_quantize_save_load_and_transformers_interop(bf16_llama, tmp_path, quant_type, tensor_type, bound):
    ids = torch.randint(0, 256, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = logits(bf16_llama, ids)
    config = TorchAoConfig(quant_type=quant_type)
    plan = quantcore.AutoQuantizer.from_config(config).plan(bf16_llama)
    quantcore.quantize(bf16_llama, config)

    q_proj = bf16_llama.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, TorchAoLinear) and type(q_proj.weight).__name__ == tensor_type
    out = logits(bf16_llama, ids)
    assert ((out - ref).norm() / ref.norm()).item() < bound
    for record in plan.modules:
        if record.action == "quantized":
            assert record.bytes_after == module_nbytes(bf16_llama.get_submodule(record.name)), record.name

    quantcore.save_quantized(bf16_llama, tmp_path / "q")
    ours = quantcore.from_pretrained(tmp_path / "q", device_map="cuda")
    assert torch.equal(logits(ours, ids), out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", dtype=torch.bfloat16, device_map="cuda"
    ).eval()
    assert torch.equal(logits(theirs, ids), out)


def test_quantize_on_load_to_the_gpu(tiny_llama, tmp_path):
    tiny_llama.to(torch.bfloat16).save_pretrained(tmp_path / "float")
    config = TorchAoConfig(quant_type=Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    streamed = quantcore.from_pretrained(
        tmp_path / "float", quantization_config=config, dtype=torch.bfloat16, device_map="cuda"
    )
    layer = streamed.model.layers[1].mlp.down_proj
    assert isinstance(layer, TorchAoLinear) and layer.weight.device.type == "cuda"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float",
        dtype=torch.bfloat16,
        device_map="cuda",
        quantization_config=transformers.TorchAoConfig(config.quant_type),
    ).eval()
    ids = torch.randint(0, 256, (1, 16), device="cuda")
    assert torch.equal(logits(streamed, ids), logits(theirs, ids))
