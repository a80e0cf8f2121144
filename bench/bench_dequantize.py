"""Dequantizing a torch_wo weight (the prefill path: more rows than the kernels take) against the
plain fp32 formula it must equal bit for bit, side by side on the same weights.

Above ``SMALL_BATCH`` rows (a prompt's prefill) a torch_wo layer dequantizes its weight, then runs
``F.linear``: this cost is in every quantized model's time to first token. ``packing.dequantize_int8``
multiplies in the output's half dtype when the scale has it (exact, one pass) and
``dequantize_int4`` keeps one fp32 temporary; the baseline is the formula written out, as it was
(``(q.float() * s.float()).to(dtype)``; ``((q.float() - z.float()) * s.float()).to(dtype)``). On
CUDA, the Triton kernel eager code dequantizes with (``kernels.dequantized_int8`` /
``dequantized_int4``) is timed too; all three must give the same bits.

    python bench/bench_dequantize.py                    # CPU, the 1.1B Llama's four shapes
    python bench/bench_dequantize.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "torch")]

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


def best_ms(call, device: str, rounds: int) -> float:
    call()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=10)
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
            base_ms, ours_ms = best_ms(baseline, args.device, args.rounds), best_ms(ours, args.device, args.rounds)
            kernel_ms = best_ms(fast, args.device, args.rounds) if args.device == "cuda" else None
            rows.append(
                dict(shape=[n, k], format=fmt, fp32_formula_ms=base_ms, packing_ms=ours_ms, kernel_ms=kernel_ms)
            )
            line = f"[{n}x{k}] {fmt}: fp32 formula {base_ms:8.3f} ms, "
            line += f"packing {ours_ms:8.3f} ms ({base_ms / ours_ms:5.2f}x)"
            if kernel_ms is not None:
                line += f", Triton kernel {kernel_ms:8.3f} ms ({base_ms / kernel_ms:5.2f}x)"
            print(line)
    if args.out:
        args.out.write_text(json.dumps(dict(device=args.device, torch=torch.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
