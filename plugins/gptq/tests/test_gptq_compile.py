"""GPTQ layers under ``torch.compile(fullgraph=True)`` on the CPU: one graph, the eager logits."""

from __future__ import annotations

import pytest
import torch
from quantcore_gptq import GPTQConfig

import quantcore


def _compile_and_compare(model, prompt, backend) -> None:
    with torch.no_grad():
        eager = model(prompt).logits  # also converts the 4-bit weights for the CPU kernel
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        torch.testing.assert_close(compiled(prompt).logits, eager, rtol=1e-3, atol=1e-3)
    torch._dynamo.reset()


@pytest.mark.parametrize("desc_act", [False, True], ids=["in-order", "act-order"])
def test_fullgraph_compile_runs_the_kernel_where_eager_does(tiny_llama, calibration, prompt, desc_act):
    quantcore.quantize(tiny_llama, GPTQConfig(bits=4, group_size=32, desc_act=desc_act), calibration=calibration)
    graphs: list[str] = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    _compile_and_compare(tiny_llama, prompt[:1, :1], recording)  # one token: the kernels' batch
    assert len(graphs) == 1
    # In-order groups run the int4 CPU kernel in the graph; act-order ones dequantize (as in eager).
    assert ("_weight_int4pack_mm_for_cpu" in graphs[0]) is not desc_act


@pytest.mark.slow
def test_fullgraph_compile_with_inductor(tiny_llama, calibration, prompt):
    quantcore.quantize(tiny_llama, GPTQConfig(bits=4, group_size=32), calibration=calibration)
    _compile_and_compare(tiny_llama, prompt[:1, :1], "inductor")
