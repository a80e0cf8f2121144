"""TorchAoQuantizer on the CPU: torchao's formats under quantcore's rules, plans, rollback and dequantize."""

from __future__ import annotations

import pytest

pytest.importorskip("torchao", reason="torchao is not installed")

import torch
from quantcore_torchao import TorchAoConfig, TorchAoEmbedding, TorchAoLinear
from torch import nn
from torchao.quantization import (
    Float8WeightOnlyConfig,
    FqnToConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from torchao.quantization.granularity import PerAxis, PerGroup

import quantcore
from quantcore import BackendUnavailableError
from quantcore.quantizer import module_nbytes

CUDA = torch.cuda.is_available()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# What torchao runs on the CPU (torchao 0.17 / 0.18), with the bound on the relative output error
# of the Stack fixture (float32, N(0, 1) inputs) each one must meet.
CPU_FORMATS = [
    pytest.param(Int8WeightOnlyConfig(version=2), "Int8Tensor", 0.01, id="int8-weight-only"),
    pytest.param(Int8DynamicActivationInt8WeightConfig(version=2), "Int8Tensor", 0.03, id="int8-dynamic"),
    pytest.param(Float8WeightOnlyConfig(), "Float8Tensor", 0.05, id="float8-weight-only"),
    pytest.param(
        IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
        "IntxUnpackedToInt8Tensor",
        0.15,
        id="int4-intx-g32",
    ),
]


@pytest.mark.parametrize(("quant_type", "tensor_type", "bound"), CPU_FORMATS)
def test_quantizes_linears_on_the_cpu(stack, quant_type, tensor_type, bound):
    x = torch.randn(8, 64)
    ref = stack(x)
    config = TorchAoConfig(quant_type=quant_type)
    plan = quantcore.AutoQuantizer.from_config(config).plan(stack)
    report = quantcore.quantize(stack, config)

    assert isinstance(stack.up, TorchAoLinear) and isinstance(stack.down, TorchAoLinear)
    assert type(stack.up.weight).__name__ == tensor_type
    assert type(stack.lm_head) is nn.Linear  # the output head: a default skip
    assert relative_error(stack(x), ref) < bound
    # the dry run's bytes are exactly what the modules hold afterwards
    for record in plan.modules:
        if record.action == "quantized":
            assert record.bytes_after == module_nbytes(stack.get_submodule(record.name))
    assert plan.bytes_after == report.bytes_after
    assert report.bytes_after < report.bytes_before


def test_skip_list(stack):
    config = TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2), modules_to_not_convert=["up"])
    report = quantcore.quantize(stack, config)
    assert type(stack.up) is nn.Linear
    assert isinstance(stack.down, TorchAoLinear)
    assert next(r for r in report.modules if r.name == "up").rule == "skip: 'up' (modules_to_not_convert)"


def test_overrides_mix_torchao_with_another_backend(stack):
    x = torch.randn(4, 64)
    ref = stack(x)
    config = TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2))
    report = quantcore.quantize(stack, config, overrides={"down": {"quant_method": "torch_wo", "bits": 8}})
    assert isinstance(stack.up, TorchAoLinear)
    assert type(stack.down).__name__ == "WeightOnlyLinear"  # quantcore-torch, chosen by the override
    assert {r.name: r.method for r in report.modules if r.action == "quantized"} == {
        "up": "torchao Int8WeightOnly",
        "down": "torch_wo int8",
    }
    assert relative_error(stack(x), ref) < 0.01


def test_per_module_table(stack):
    table = FqnToConfig({"up": Float8WeightOnlyConfig(), "re:dow.*": Int8WeightOnlyConfig(version=2)})
    report = quantcore.quantize(stack, TorchAoConfig(quant_type=table))
    assert type(stack.up.weight).__name__ == "Float8Tensor"
    assert type(stack.down.weight).__name__ == "Int8Tensor"
    assert {r.name: r.action for r in report.modules} == {"up": "quantized", "down": "quantized", "lm_head": "skipped"}


def test_a_weight_torchao_cannot_take_stays_in_float_and_says_why(make_stack):
    torch.manual_seed(0)
    model = make_stack(dim=64, hidden=96)  # down has 96 inputs: not a multiple of the group size
    config = TorchAoConfig(quant_type=IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))
    plan = quantcore.AutoQuantizer.from_config(config).plan(model)
    report = quantcore.quantize(model, config)
    assert isinstance(model.up, TorchAoLinear)
    assert type(model.down) is nn.Linear
    down = next(r for r in report.modules if r.name == "down")
    assert down.action == "skipped"
    assert "cannot take a (64, 96) weight" in down.rule
    assert [r.action for r in plan.modules] == [r.action for r in report.modules]


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_only_format_is_refused_before_anything_changes(stack):
    with pytest.raises(BackendUnavailableError, match="IntxWeightOnlyConfig"):
        quantcore.quantize(stack, TorchAoConfig(quant_type=Int4WeightOnlyConfig(group_size=64)))
    assert type(stack.up) is nn.Linear
    # the dry run still says what it would do, with the int4 sizes
    plan = quantcore.AutoQuantizer.from_config(TorchAoConfig(quant_type=Int4WeightOnlyConfig(group_size=64))).plan(
        stack
    )
    up = next(r for r in plan.modules if r.name == "up")
    assert up.bytes_after == 128 * 64 // 2 + 2 * 128 * 1 * 4 + 128 * 4  # codes, scale + zero per group, bias


def test_dequantize_gives_float_linears(stack):
    x = torch.randn(4, 64)
    quantcore.quantize(stack, TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2)))
    quantized_out = stack(x)
    quantcore.dequantize(stack)
    assert type(stack.up) is nn.Linear and type(stack.down) is nn.Linear
    assert stack.up.weight.dtype == torch.float32 and type(stack.up.weight.data) is torch.Tensor
    assert relative_error(stack(x), quantized_out) < 1e-5


def test_embeddings_when_asked(tiny_llama):
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    # IntxWeightOnlyConfig: torchao's format for embeddings (torchao 0.17's Int8Tensor has no embedding op)
    int8 = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    config = TorchAoConfig(quant_type=int8, include_input_output_embeddings=True)
    report = quantcore.quantize(tiny_llama, config)
    assert isinstance(tiny_llama.model.embed_tokens, TorchAoEmbedding)
    assert "model.embed_tokens" in {r.name for r in report.modules if r.action == "quantized"}
    with torch.no_grad():
        assert relative_error(tiny_llama(ids).logits, ref) < 0.02
    quantcore.dequantize(tiny_llama)
    assert type(tiny_llama.model.embed_tokens) is nn.Embedding


def test_embeddings_are_left_alone_by_default(tiny_llama):
    quantcore.quantize(tiny_llama, TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2)))
    assert type(tiny_llama.model.embed_tokens) is nn.Embedding


def test_a_weight_torchao_already_quantized_is_not_quantized_again():
    from torchao.quantization import quantize_

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    quantize_(model[0], Int8WeightOnlyConfig(version=2), filter_fn=lambda m, fqn: True)  # as transformers leaves it
    plan = quantcore.AutoQuantizer.from_config(TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2))).plan(model)
    first = next(r for r in plan.modules if r.name == "0")
    assert first.action == "skipped"
    assert "already a Int8Tensor" in first.rule
