"""The persistent chain kernel (``quantcore_torch._chain``) on a GPU: one launch with grid barriers
gives the bits of a launch a link, in CUDA graphs too (its counters reset for each replay).
The arithmetic a link at a time is checked under Triton's interpreter (test_triton_interpreter.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _links(h=2048, inter=5632, kv=256, layers=3, group=128, dtype=torch.bfloat16):
    """A Llama's fused int4 links for ``layers`` layers, data flowing as a layer's (see
    ``bench_gemv.chain_stack``): q/k/v from the hidden state, o from q, gate/up, down back."""
    from quantcore_torch import kernels
    from quantcore_torch._chain import ChainLink
    from quantcore_torch.packing import quantize_int4

    torch.manual_seed(0)
    new = lambda n: torch.randn(n, device="cuda", dtype=dtype)  # noqa: E731
    hidden, q, hidden2, act = new(h), new(h + 2 * kv), new(h), new(inter)
    start = hidden.clone()
    links = []
    for _ in range(layers):
        for (n, k), x, y, gated in (
            ((h + 2 * kv, h), hidden, q, False), ((h, h), q[:h], hidden2, False),
            ((2 * inter, h), hidden2, act, True), ((h, inter), act, hidden, False),
        ):  # fmt: skip
            packed, scale, zero = quantize_int4((torch.randn(n, k, device="cuda") * 0.02).to(dtype), group)
            layout = kernels.int4_interleaved_layout(packed, scale, zero, k, group)
            links.append(ChainLink(x, layout.weight, layout.scales_and_zeros, y, gated))
    return links, start, (hidden, q, hidden2, act)


def _run(chain, start, buffers, graph: bool):
    buffers[0].copy_(start)
    if not graph:
        chain()
    else:
        captured = torch.cuda.CUDAGraph()
        chain()  # compiled, its grid found, outside the capture
        buffers[0].copy_(start)
        with torch.cuda.graph(captured):
            chain()
        for _ in range(3):  # each replay from the same start: the counters must be back at zero
            buffers[0].copy_(start)
            captured.replay()
    torch.cuda.synchronize()
    chain.check()
    return [b.clone() for b in buffers]


@pytest.mark.parametrize(
    "config", [(2, 2048, 2, False, 8), (4, 2048, 4, False, 4), (8, 1024, 4, True, 2), (2, 2048, 2, False, 1)], ids=str
)
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_one_persistent_launch_gives_the_bits_of_a_launch_a_link(config, graph):
    from quantcore_torch._chain import ChainConfig, Int4Chain

    links, start, buffers = _links()
    config = ChainConfig(*config)
    expected = _run(Int4Chain(links, 128, config, one_launch=False), start, buffers, graph=False)
    chain = Int4Chain(links, 128, config)
    got = _run(chain, start, buffers, graph)
    assert chain.programs == config.per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert all(torch.isfinite(b).all() for b in got) and int(chain.counters.abs().sum()) == 0


def test_a_persistent_launch_refuses_more_programs_than_the_gpu_holds():
    from quantcore_torch._chain import ChainConfig, Int4Chain

    links, _, _ = _links(layers=1)
    chain = Int4Chain(links, 128, ChainConfig(8, 1024, 8, True, 32))
    with pytest.raises(ValueError, match="programs a multiprocessor asked for"):
        chain()
