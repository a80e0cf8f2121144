"""torchao layers under ``torch.compile(fullgraph=True)`` on the CPU: one graph, the eager logits.

On CUDA (an H200, torch 2.11, torchao 0.17) the float8 dynamic-activation format failed to compile
with ``fullgraph=True`` in inductor, and compiled int4 decoding was slow: docs/torchao.md says so.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchao", reason="torchao is not installed")

import torch
from quantcore_torchao import TorchAoConfig, TorchAoLinear
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

import quantcore

CPU_FORMATS = [
    pytest.param(Int8WeightOnlyConfig(version=2), id="int8-weight-only"),
    pytest.param(Float8WeightOnlyConfig(), id="float8-weight-only"),
]


def _compiled_matches_eager(model, backend: str) -> None:
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        torch.testing.assert_close(compiled(ids).logits, eager, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


@pytest.mark.parametrize("quant_type", CPU_FORMATS)
def test_fullgraph_compile(tiny_llama, quant_type):
    model = tiny_llama.to(torch.bfloat16)
    quantcore.quantize(model, TorchAoConfig(quant_type=quant_type))
    assert isinstance(model.model.layers[0].mlp.up_proj, TorchAoLinear)
    _compiled_matches_eager(model, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("quant_type", CPU_FORMATS)
def test_fullgraph_compile_with_inductor(tiny_llama, quant_type):
    model = tiny_llama.to(torch.bfloat16)
    quantcore.quantize(model, TorchAoConfig(quant_type=quant_type))
    _compiled_matches_eager(model, "inductor")
