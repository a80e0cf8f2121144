#!/usr/bin/env python
"""What quantizing the output head costs in quality: SmolLM2-135M's perplexity with torch_wo, the
head in float (the default) against the head quantized too (``quantize(..., default_skips=False)``).

SmolLM2's head is tied to its input embeddings; quantized, it gets its own quantized copy and
the embeddings stay in float. ``bench_decode.py``'s ``+head`` suffix measures the speed side (the
head is a 32000x2048 linear in the 1.1B Llama shape: 131 MB of a decode step's 2 GB in bf16).
Same text and scoring as ``bench_quality.py`` (``bench/prepare_models.py`` first).

Usage::

    python bench/head_quality.py [--methods int4-torch,int8-torch] [--max-tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import _common  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="int4-torch,int8-torch")
    parser.add_argument("--max-tokens", type=_common.int_at_least(16), default=2048)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from quantcore.cli import resolve_method
    from quantcore.evaluate import Evaluation

    evaluation = Evaluation(
        _common.smollm2_bf16_dir(),
        dtype="bfloat16",
        text=_common.load_shakespeare_text(12_000),
        max_tokens=args.max_tokens,
    )
    rows = [evaluation.float_row]
    for method in args.methods.split(","):
        config = resolve_method(method)
        rows.append(evaluation.quantized(method, config))
        rows.append(evaluation.quantized(f"{method}+head", config, default_skips=False))
    out = []
    for row in rows:
        metrics = row.metrics
        print(
            f"{row.label:<18} {row.bytes / 2**20:7.1f} MiB  perplexity {metrics['perplexity']:.3f} "
            f"({100 * metrics['perplexity_change']:+.2f} %)",
            flush=True,
        )
        out.append(dict(label=row.label, bytes=row.bytes, **metrics))
    if args.out:
        args.out.write_text(json.dumps(dict(tokens=args.max_tokens, rows=out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
