#!/usr/bin/env python
"""Module replacement: quantcore's bitsandbytes backend vs transformers' ``replace_with_bnb_linear``.

On a meta-device model of 10,000 ``nn.Linear(64, 64)`` (2,500 blocks of q/k/v/o + LayerNorm,
``_common.build_meta_block_model``), 4-bit NF4, in one process:

- quantcore ``plan`` (the dry run: decisions and sizes, nothing built);
- quantcore ``quantize`` (plans again, builds every ``Linear4bit`` meta skeleton, swaps them in);
- transformers ``replace_with_bnb_linear(model, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4"))`` (builds every ``Linear4bit`` on meta).

Each sample runs on a fresh model (its construction untimed); the three are interleaved so that
machine noise hits them alike; best of ``--repeats``. Both sides are checked to have produced
10,000 ``Linear4bit``. The ratio is transformers' time over quantcore's ``quantize`` time (and over
``plan + quantize``, the cost of a user who looks before quantizing).

Usage::

    python bench/bench_replace.py [--repeats 3] [--n-blocks 2500] [--dim 64] [--out PATH]

The JSON goes to ``bench/_results/bench_replace.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

RESULTS_DIR = Path(__file__).resolve().parent / "_results"


def _results_dir() -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    ignore = RESULTS_DIR / ".gitignore"
    if not ignore.exists():  # results are machine-specific: never committed
        ignore.write_text("*\n")
    return RESULTS_DIR


def _count(model, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def run(n_blocks: int, dim: int, repeats: int) -> dict:
    """Time the three operations, interleaved, best of ``repeats``; return the results."""
    import bitsandbytes as bnb
    import transformers
    from quantcore_bnb import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    import quantcore

    n_linear = 4 * n_blocks
    qc_quantizer = quantcore.AutoQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    tf_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")

    def qc_plan(model):
        return qc_quantizer.plan(model)

    def qc_quantize(model):
        return qc_quantizer.quantize(model, progress=False)

    def tf_replace(model):
        return replace_with_bnb_linear(model, quantization_config=tf_config)

    # Warm-up on a small model: imports, lazy native-library lookups, plugin discovery.
    for fn in (qc_plan, qc_quantize, tf_replace):
        fn(_common.build_meta_block_model(n_blocks=8, dim=dim))

    ops = {"quantcore_plan": qc_plan, "quantcore_quantize": qc_quantize, "transformers_replace": tf_replace}
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, fn in ops.items():
            model = _common.build_meta_block_model(n_blocks=n_blocks, dim=dim)
            gc.collect()
            start = time.perf_counter()
            result = fn(model)
            times[name].append(time.perf_counter() - start)
            if name == "quantcore_plan":
                assert len(result.quantized) == n_linear, result.summary()
            else:
                got = _count(model, bnb.nn.Linear4bit)
                assert got == n_linear, f"{name}: {got} Linear4bit, expected {n_linear}"
            del model, result
    best = {name: min(ts) for name, ts in times.items()}
    best["quantcore_plan_plus_quantize"] = best["quantcore_plan"] + best["quantcore_quantize"]
    return {
        "n_linear": n_linear,
        "dim": dim,
        "repeats": repeats,
        "times_s": times,
        "best_s": best,
        "speedup_quantize": best["transformers_replace"] / best["quantcore_quantize"],
        "speedup_plan_plus_quantize": best["transformers_replace"] / best["quantcore_plan_plus_quantize"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-blocks", type=int, default=2500)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/_results/bench_replace.json)")
    args = ap.parse_args(argv)

    import bitsandbytes
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    res = run(args.n_blocks, args.dim, args.repeats)
    n = res["n_linear"]
    print(
        f"replacing {n:,} x nn.Linear({args.dim},{args.dim}) on meta with 4-bit NF4 Linear4bit "
        f"(best of {args.repeats}, fresh model each run)"
    )
    print(f"{'operation':<32} {'best':>10} {'per linear':>12}   runs")
    for name, best in res["best_s"].items():
        runs = ", ".join(f"{t:.3f}" for t in res["times_s"].get(name, []))
        print(f"{name:<32} {_common.format_seconds(best):>10} {best / n * 1e6:>9.1f} us   {runs}")
    print(f"speedup of quantcore quantize over transformers replace_with_bnb_linear: {res['speedup_quantize']:.1f}x")
    print(f"speedup of quantcore plan + quantize over transformers: {res['speedup_plan_plus_quantize']:.1f}x")
    out = args.out or _results_dir() / "bench_replace.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, **res}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
