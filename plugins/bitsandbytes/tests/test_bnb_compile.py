"""What torch.compile, CUDA graphs and the static KV cache do with bitsandbytes layers (pinned, see docs/benchmarks.md).

On the CPU, bitsandbytes' ``Linear4bit`` repacks its weight at its first forward (``weight.data = ...``
on CPUs with AVX512-BF16), which dynamo cannot trace: compile after one eager forward. From then
on both layers trace with ``fullgraph=True``.
"""

from __future__ import annotations

import pytest
import torch

import quantcore
from quantcore.cli import resolve_method

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _model(tiny_llama, preset: str, device: str):
    model = tiny_llama.to(device=device, dtype=torch.bfloat16)
    quantcore.quantize(model, resolve_method(preset), progress=False)
    return model


@pytest.mark.parametrize("preset", ["int8", "nf4"])
def test_fullgraph_compile_after_one_eager_forward(tiny_llama, preset):
    model = _model(tiny_llama, preset, "cpu")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits  # the eager forward that settles the layers' state
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(ids).logits, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["int8", "nf4"])
def test_cuda_graphs_and_the_static_cache(tiny_llama, preset):
    model = _model(tiny_llama, preset, "cuda")
    ids = torch.randint(0, 128, (1, 12), device="cuda")
    kwargs = dict(
        max_new_tokens=8,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        eager = model.generate(ids, **kwargs)
        torch._dynamo.reset()
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        recorded = model.generate(ids, **kwargs)
        replayed = model.generate(ids, **kwargs)
    # A random model's greedy tokens sit on near-ties, so compiled and eager may part ways after a
    # few tokens (bf16 rounding); the first step's logits must agree, and replays must repeat exactly.
    torch.testing.assert_close(recorded.logits[0], eager.logits[0], rtol=2e-2, atol=2e-2)
    assert torch.equal(replayed.sequences, recorded.sequences)
    for a, b in zip(replayed.logits, recorded.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
