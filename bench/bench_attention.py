"""The decode attention's split configs on the GPU: one token against a static KV cache, batch 1.

For each model shape (the 1.1B Llama's 32 query heads on 4 key/value heads of 64; Llama-2-7B's
32 heads of 128) and cache length, a CUDA graph runs the attention once for each of the model's
layers, every layer on its own cache (a step's reads, not one cache kept in L2), and is replayed.
Rows: every ``(BLOCK_L, warps)`` of ``--configs`` for the split kernel (``_attention.SPLIT_CONFIG``),
and PyTorch's SDPA on the repeated key/value heads (transformers' path, eager kernels in the
graph). Reports microseconds a layer and the cache bytes read a second.

    python bench/bench_attention.py --out attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import torch

SHAPES = {"llama-1.1b": (22, 32, 4, 64), "llama-7b": (32, 32, 32, 128)}  # layers, heads, kv heads, head_dim
CONFIGS = "16x2,16x4,32x2,32x4,32x8,64x4,64x8,128x8"


def _time_graph(fn, replays: int) -> float:
    """Seconds a call of ``fn`` takes, captured once in a CUDA graph and replayed."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def run(shape: str, length: int, kept: int, configs: list[tuple[int, int]], replays: int) -> list[dict]:
    from quantcore_torch import _attention, kernels

    layers, heads, kv_heads, head = SHAPES[shape]
    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(1, 1, heads * head, device=dev, dtype=dtype)
    caches = [torch.randn(2, 1, kv_heads, length, head, device=dev, dtype=dtype) for _ in range(layers)]
    mask = (torch.arange(length, device=dev) < kept).view(1, 1, 1, length)
    scale = head**-0.5
    nbytes = 2 * kv_heads * kept * head * 2  # keys and values of the kept positions, bf16
    rows = []

    def sdpa():
        query = q.view(1, heads, 1, head)
        for keys, values in caches:
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (keys, values))
            torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)

    reference = None
    for config in [None, *configs]:
        if config is None:
            seconds, label = _time_graph(sdpa, replays), "sdpa (repeat_kv)"
        else:
            _attention.SPLIT_CONFIG[head] = config
            out = kernels.decode_attention(q, *caches[0], mask, scale)
            reference = out if reference is None else reference
            torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
            seconds = _time_graph(lambda: [kernels.decode_attention(q, *c, mask, scale) for c in caches], replays)
            label = f"BLOCK_L={config[0]} warps={config[1]}"
        per_layer = seconds / layers
        gbps = nbytes / per_layer / 1e9
        rows.append(dict(shape=shape, length=length, kept=kept, config=label, us=per_layer * 1e6, gbps=gbps))
        print(f"  {shape:10} L={length:5} kept={kept:5} {label:22} {per_layer * 1e6:7.2f} us {gbps:7.1f} GB/s")
    _attention.SPLIT_CONFIG.pop(head, None)
    return rows


def _pairs(text: str, sep: str) -> list[tuple[int, int]]:
    """``"AsepB,..."`` as ``[(A, B), ...]`` of positive integers (an argparse type)."""
    try:
        pairs = [tuple(int(v) for v in item.split(sep)) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected comma-separated A{sep}B of positive integers, got {text!r}")
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    lengths, configs = (lambda t: _pairs(t, ":")), (lambda t: _pairs(t, "x"))
    parser.add_argument("--lengths", type=lengths, default="640:577,4096:4000", help="cache length:kept positions")
    parser.add_argument("--configs", type=configs, default=CONFIGS, help="BLOCK_LxWARPS, comma-separated")
    parser.add_argument("--replays", type=_common.int_at_least(1), default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if unknown := set(args.shapes.split(",")) - SHAPES.keys():
        parser.error(f"--shapes: {', '.join(sorted(unknown))} unknown (known: {', '.join(SHAPES)})")
    if bad := [(length, kept) for length, kept in args.lengths if kept > length]:
        parser.error(f"--lengths: more kept positions than the cache holds: {bad}")
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}")
    rows = []
    for shape in args.shapes.split(","):
        for length, kept in args.lengths:
            rows += run(shape, length, kept, args.configs, args.replays)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
