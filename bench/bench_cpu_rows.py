"""Where the CPU's weight-only kernels stop beating dequantize + ``F.linear``, by rows of ``x``.

A torch_wo layer on the CPU runs ``torch._weight_int8pack_mm`` (int8) up to
``kernels.SMALL_BATCH`` rows and ``torch._weight_int4pack_mm_for_cpu`` (int4) up to
``kernels.CPU_INT4_ROWS``; above those it dequantizes the weight and runs the float matmul. This
times both sides of each limit on SmolLM2-135M's and a 1.1B Llama's shapes, bf16, so the limits
can be checked on another CPU (best of ``--rounds`` calls each).

    python bench/bench_cpu_rows.py
    python bench/bench_cpu_rows.py --rows 16,32,48,64,96,128 --out rows.json
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

# [out, in]: SmolLM2-135M's gate/up, down and q/o; a 1.1B Llama's o and gate.
SHAPES = [(1536, 576), (576, 1536), (576, 576), (2048, 2048), (5632, 2048)]


def dequantized_linear(x: torch.Tensor, dequantize, *weight) -> torch.Tensor:
    """The path above the kernels' limits: the weight dequantized, then ``F.linear``."""
    return F.linear(x, dequantize(*weight))


def int4_cpu_kernel(x: torch.Tensor, layout) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, layout.weight, layout.group_size, layout.scales_and_zeros)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="16,33,48,64,96", help="comma-separated row counts")
    parser.add_argument("--rounds", type=_common.int_at_least(1), default=15)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    try:
        row_counts = [int(r) for r in args.rows.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rows: comma-separated integers, got {args.rows!r}")
    if not row_counts or min(row_counts) < 1:
        parser.error("--rows: give at least one positive row count")
    from quantcore_torch import kernels
    from quantcore_torch.packing import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

    torch.manual_seed(0)
    dtype, group = torch.bfloat16, 128
    results = []
    for n, k in SHAPES:
        w = torch.randn(n, k, dtype=dtype) * 0.02
        q, s = quantize_int8(w)
        packed, scale, zero = quantize_int4(w, group)
        layout = kernels.int4_cpu_layout(packed, scale, zero, k, group, dtype)
        line = f"[{n}x{k}]"
        for rows in row_counts:
            x = torch.randn(rows, k, dtype=dtype)
            row = dict(shape=[n, k], rows=rows)
            calls = {
                "int8_kernel_ms": partial(torch.ops.aten._weight_int8pack_mm, x, q, s),
                "int8_dequantize_ms": partial(dequantized_linear, x, dequantize_int8, q, s, dtype),
                "int4_kernel_ms": partial(int4_cpu_kernel, x, layout),
                "int4_dequantize_ms": partial(
                    dequantized_linear, x, dequantize_int4, packed, scale, zero, k, group, dtype
                ),
            }
            for name, call in calls.items():
                row[name] = 1e3 * _common.best_of(call, repeats=args.rounds, warmup=1, collect=False).best_s
            results.append(row)
            line += (
                f"  {rows} rows: int8 {row['int8_kernel_ms']:.2f}/{row['int8_dequantize_ms']:.2f}"
                f" int4 {row['int4_kernel_ms']:.2f}/{row['int4_dequantize_ms']:.2f}"
            )
        print(line + "  (ms, kernel/dequantize + F.linear)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(torch=torch.__version__, dtype=str(dtype), rows=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
