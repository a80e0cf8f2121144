"""Dequantizing a torch_wo weight (the prefill path: more rows than the kernels take) against the
plain fp32 formula it must equal bit for bit, side by side on the same weights.

Above ``SMALL_BATCH`` rows (a prompt's prefill) a torch_wo layer dequantizes its weight, then runs
``F.linear``: this cost is in every quantized model's time to first token. ``packing.dequantize_int8``
multiplies in the output's half dtype when the scale has it (exact, one pass) and
``dequantize_int4`` keeps one fp32 temporary; the baseline is the formula written out, as it was
(``(q.float() * s.float()).to(dtype)``; ``((q.float() - z.float()) * s.float()).to(dtype)``). On
CUDA, the Triton kernel eager code dequantizes with (``kernels.dequantized_int8`` /
``dequantized_int4``) is timed too, each of the three as its kernels alone (calls captured in one
CUDA graph) and back to back in eager code (the host's launch path included); all three must give
the same bits.

    python bench/bench_dequantize.py                    # CPU, the 1.1B Llama's four shapes
    python bench/bench_dequantize.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "torch")]

import _common  # noqa: E402

# [out, in] of a 1.1B Llama's (TinyLlama's) linears, q/k/v and gate/up fused as they run decoding.
SHAPES = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]


def fp32_int8(q, s, dtype):
    return (q.float() * s.float()[:, None]).to(dtype)


def fp32_int4(packed, scale, zero, in_features, group_size, dtype):
    from quantcore_torch.packing import unpack_int4

    out_features, groups = scale.shape
    codes = unpack_int4(packed, in_features)
    codes = F.pad(codes, (0, groups * group_size - in_features)).reshape(out_features, groups, group_size)
    w = (codes.float() - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(out_features, -1)[:, :in_features].to(dtype)


def back_to_back_ms(call, calls: int = 50) -> float:
    """CUDA: ``calls`` calls issued back to back, CUDA events around them, per call: what eager code
    pays, the larger of the host's launch path and the kernels' time."""
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def graph_ms(call, calls: int = 20, replays: int = 5) -> float:
    """CUDA: ``calls`` calls captured in one CUDA graph, the best of ``replays`` replays, per call:
    the kernels' time alone, without the host."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


def cuda_row(n: int, k: int, fmt: str, baseline, ours, fast) -> dict:
    """The three dequantizes of one weight on CUDA, each timed as the kernels alone (one CUDA graph)
    and back to back in eager code; the line printed gives the kernels' times and ratios."""
    row = dict(shape=[n, k], format=fmt)
    for name, call in (("fp32_formula", baseline), ("packing", ours), ("kernel", fast)):
        row[f"{name}_graph_ms"], row[f"{name}_eager_ms"] = graph_ms(call), back_to_back_ms(call)
    base = row["fp32_formula_graph_ms"]
    line = f"[{n}x{k}] {fmt} (kernels alone / back to back, ms): "
    line += f"fp32 formula {base:.4f} / {row['fp32_formula_eager_ms']:.4f}"
    for name, label in (("packing", "packing"), ("kernel", "Triton kernel")):
        ms = row[f"{name}_graph_ms"]
        line += f", {label} {ms:.4f} ({base / ms:.2f}x) / {row[f'{name}_eager_ms']:.4f}"
    print(line)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--rounds", type=_common.int_at_least(1), default=10, help="CPU: single calls timed, the best kept"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    from quantcore_torch import kernels
    from quantcore_torch.packing import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    dtype = torch.bfloat16
    rows = []
    for n, k in SHAPES:
        w = (torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02).to(dtype).to(args.device)
        q, s = quantize_int8(w)
        packed, scale, zero = quantize_int4(w, 128)
        assert torch.equal(dequantize_int8(q, s, dtype), fp32_int8(q, s, dtype))
        assert torch.equal(
            dequantize_int4(packed, scale, zero, k, 128, dtype), fp32_int4(packed, scale, zero, k, 128, dtype)
        )
        int4_args = (packed, scale, zero, k, 128, dtype)
        cases = (
            ("int8", dequantize_int8, fp32_int8, kernels.dequantized_int8, (q, s, dtype)),
            ("int4", dequantize_int4, fp32_int4, kernels.dequantized_int4, int4_args),
        )
        for fmt, ours, baseline, fast, call_args in cases:
            ours, baseline, fast = (partial(f, *call_args) for f in (ours, baseline, fast))
            assert torch.equal(fast(), baseline())
            if args.device == "cuda":
                rows.append(cuda_row(n, k, fmt, baseline, ours, fast))
                continue
            base_ms, ours_ms = (
                1e3 * _common.best_of(call, repeats=args.rounds, warmup=1, collect=False).best_s
                for call in (baseline, ours)
            )
            rows.append(dict(shape=[n, k], format=fmt, fp32_formula_ms=base_ms, packing_ms=ours_ms))
            ratio = base_ms / ours_ms
            print(f"[{n}x{k}] {fmt}: fp32 formula {base_ms:8.3f} ms, packing {ours_ms:8.3f} ms ({ratio:5.2f}x)")
    if args.out:
        args.out.write_text(json.dumps(dict(device=args.device, torch=torch.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
