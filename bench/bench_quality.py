"""Quality of each quantization method on SmolLM2-135M: perplexity on real Shakespeare text.

    .venv/bin/python bench/bench_quality.py [--max-tokens 2048] [--methods int8,nf4,...]

Loads the bf16 checkpoint that ``bench/prepare_models.py`` writes, scores it, then quantizes a copy
with each ``--method`` preset of the CLI (:data:`quantcore.cli.PRESETS`) and scores that. The text
is the first ``--max-tokens`` tokens of ``load_shakespeare_text(12000)`` (Hamlet first), the same
text ``prepare_models.py`` checks the checkpoint with. Writes ``bench/_results/quality.json`` and
the "## Quality" section of ``docs/benchmarks.md`` (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import _common  # noqa: E402

RESULTS = BENCH_DIR / "_results" / "quality.json"
DOCS = BENCH_DIR.parent / "docs" / "benchmarks.md"
HEADING = "## Quality"
METHODS = ("int8", "nf4", "fp4", "nf4-dq", "int8-torch", "int4-torch", "int8-ao", "fp8wo-ao")


def measure(methods: list[str], max_tokens: int, dtype: str) -> dict:
    """Score the float model and each method; everything JSON-ready."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import bitsandbytes
    import torch
    import transformers

    from quantcore.cli import PRESETS, resolve_method
    from quantcore.evaluate import Evaluation

    transformers.utils.logging.disable_progress_bar()
    text = _common.load_shakespeare_text(12_000)
    start = time.perf_counter()
    evaluation = Evaluation(
        _common.smollm2_bf16_dir(),
        dtype=dtype,
        text=text,
        max_tokens=max_tokens,
        log=lambda m: print(f"... {m} ({time.perf_counter() - start:.0f} s)", file=sys.stderr),
    )
    rows = evaluation.compare({name: resolve_method(name) for name in methods})
    return {
        "model": "SmolLM2-135M (bench/_data/smollm2-135m-bf16)",
        "params": evaluation.params,
        "text": f"first {max_tokens} tokens of load_shakespeare_text(12000) (Hamlet)",
        "tokens_scored": rows[0].metrics["tokens"],
        "dtype": str(evaluation.dtype).removeprefix("torch."),
        "configs": {name: PRESETS[name][0] for name in methods},
        "rows": [r.to_dict() for r in rows],
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "torchao": _version("torchao"),
            "python": platform.python_version(),
        },
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "seconds": time.perf_counter() - start,
    }


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def markdown(result: dict, command: str) -> str:
    """The "## Quality" section."""
    lines = [
        HEADING,
        "",
        f"Perplexity of {result['model']} on real text: the {result['text']}, {result['tokens_scored']} "
        f"predicted tokens, in one window. The float model is the {result['dtype']} checkpoint; each method "
        "quantizes a copy of it in memory (every linear layer except the tied output head, which stays in "
        "float with the embeddings). Lower perplexity is better.",
        "",
        "| method | backend config | size | bits/param (model) | bits/param (linear layers) | perplexity | change "
        "| quantize time |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in result["rows"]:
        config = result["configs"].get(row["label"])
        config_text = (
            "-"
            if config is None
            else ", ".join(f"{k}={json.dumps(v)}" for k, v in config.items() if k != "quant_method")
        )
        change = row["metrics"].get("perplexity_change")
        linear = row["quantized_bits_per_param"]
        cells = [
            f"{row['label']} ({row['method']})",
            config_text,
            f"{row['bytes'] / 2**20:.1f} MiB",
            f"{row['bits_per_param']:.2f}",
            "-" if linear is None else f"{linear:.2f}",
            f"{row['metrics']['perplexity']:.3f}",
            "-" if row["label"] == "float" else f"{100 * change:+.2f}%",
            "-" if row["seconds"] is None else f"{row['seconds']:.1f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    v = result["versions"]
    lines += [
        "",
        f"Command: `{command}` ({result['seconds']:.0f} s in all). {result['machine']}; torch {v['torch']}, "
        f"transformers {v['transformers']}, bitsandbytes {v['bitsandbytes']}, "
        + (f"torchao {v['torchao']}, " if v.get("torchao") else "")
        + f"Python {v['python']}. "
        "Sizes count every parameter and buffer once (tied weights once), quantization constants included. "
        "Quantize times are wall-clock on a shared machine: compare them only roughly. "
        f"Raw numbers: `bench/_results/{RESULTS.name}`.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the "## Quality" section of ``path`` (up to the next "## " heading), or append it."""
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: section + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new.rstrip("\n") + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated --method presets")
    parser.add_argument("--dtype", default="auto", help="float dtype of the model (default: the checkpoint's, bf16)")
    parser.add_argument("--no-docs", action="store_true", help="don't touch docs/benchmarks.md")
    args = parser.parse_args()
    result = measure([m for m in args.methods.split(",") if m], args.max_tokens, args.dtype)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    command = "python bench/bench_quality.py" + " ".join(["", *sys.argv[1:]])
    section = markdown(result, command.rstrip())
    if not args.no_docs:
        write_section(DOCS, section)
    print(section)


if __name__ == "__main__":
    main()
