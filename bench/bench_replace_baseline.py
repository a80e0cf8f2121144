#!/usr/bin/env python
"""Incumbent baseline for the module-replacement benchmark (temporary; to be merged
into the quantcore-vs-transformers replacement comparison).

Measures, on CPU:

1. ``transformers.integrations.bitsandbytes.replace_with_bnb_linear(model,
   quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` on a meta-device
   model of 10,000 ``nn.Linear(64, 64)`` (``_common.build_meta_block_model``:
   2,500 blocks x q/k/v/o + LayerNorm) -- best of N runs, a fresh model each run
   (model construction is not timed).
2. Bare construction of ``bitsandbytes.nn.Linear4bit(64, 64, device="meta")`` per
   layer, default vs. with weight init skipped (``reset_parameters`` patched to a
   no-op), plus ``nn.Linear(64, 64, device="meta")`` for reference.

Usage::

    python bench/bench_replace_baseline.py [--repeats 3] [--n-blocks 2500] [--dim 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def time_replace_with_bnb_linear(n_blocks: int = 2500, dim: int = 64, repeats: int = 3) -> dict:
    """Best-of-``repeats`` wall time of ``replace_with_bnb_linear`` (4-bit) on a fresh meta model each run."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    qcfg = BitsAndBytesConfig(load_in_4bit=True)
    n_linear = 4 * n_blocks

    def setup():
        return _common.build_meta_block_model(n_blocks=n_blocks, dim=dim)

    def run(model):
        return replace_with_bnb_linear(model, quantization_config=qcfg)

    # Untimed sanity run (also warms imports / lazy native-lib lookups).
    m = run(setup())
    n_4bit = sum(isinstance(x, bnb.nn.Linear4bit) for x in m.modules())
    if n_4bit != n_linear:
        raise RuntimeError(f"expected {n_linear} Linear4bit after replacement, got {n_4bit}")
    del m

    build = _common.best_of(setup, repeats=repeats)
    res = _common.best_of(run, setup=setup, repeats=repeats)
    return {
        "n_linear": n_linear,
        "replace_best_s": res.best_s,
        "replace_median_s": res.median_s,
        "replace_times_s": res.times_s,
        "replace_best_per_linear_us": res.best_s / n_linear * 1e6,
        "build_meta_model_best_s": build.best_s,
    }


def time_per_layer_construction(n: int = 10_000, dim: int = 64, repeats: int = 3) -> dict:
    """Per-layer construction cost on the meta device (best of ``repeats`` loops of ``n`` constructions)."""
    import bitsandbytes as bnb
    import torch

    def loop(factory):
        def run():
            return [factory() for _ in range(n)]  # keep them alive: no dealloc inside the timed region

        return _common.best_of(run, repeats=repeats)

    variants = {
        "linear4bit_default": lambda: bnb.nn.Linear4bit(dim, dim, device="meta"),
        "nn_linear_default": lambda: torch.nn.Linear(dim, dim, device="meta"),
    }
    out: dict = {"n": n}
    for name, factory in variants.items():
        factory()  # warm-up
        r = loop(factory)
        out[name + "_us"] = r.best_s / n * 1e6
    # Init skipped: nn.Linear.__init__ calls self.reset_parameters() (kaiming_uniform_ + uniform_);
    # Linear4bit inherits it, so patching nn.Linear covers both.
    with _common.skip_reset_parameters(torch.nn.Linear):
        for name, factory in variants.items():
            factory()
            r = loop(factory)
            out[name.replace("_default", "_skip_init") + "_us"] = r.best_s / n * 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-blocks", type=int, default=2500)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-layer-n", type=int, default=10_000)
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    import bitsandbytes
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    print(f"env: {env}", flush=True)

    rep = time_replace_with_bnb_linear(args.n_blocks, args.dim, args.repeats)
    print(
        f"replace_with_bnb_linear(4-bit), {rep['n_linear']:,} x nn.Linear({args.dim},{args.dim}) on meta: "
        f"best {_common.format_seconds(rep['replace_best_s'])} of {args.repeats} "
        f"(median {_common.format_seconds(rep['replace_median_s'])}; "
        f"{rep['replace_best_per_linear_us']:.1f} us/linear; "
        f"runs {[round(t, 4) for t in rep['replace_times_s']]} s)",
        flush=True,
    )
    print(
        "  (building the meta model itself: best "
        f"{_common.format_seconds(rep['build_meta_model_best_s'])}, untimed in the above)"
    )

    per = time_per_layer_construction(args.per_layer_n, args.dim, args.repeats)
    print(f"per-layer construction on meta (best of {args.repeats} x {per['n']:,}):")
    for k in ("linear4bit_default_us", "linear4bit_skip_init_us", "nn_linear_default_us", "nn_linear_skip_init_us"):
        print(f"  {k[:-3]:<26} {per[k]:8.2f} us/layer")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"env": env, "replace": rep, "per_layer": per}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
