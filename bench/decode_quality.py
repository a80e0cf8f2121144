#!/usr/bin/env python
"""Quality through the decode path: SmolLM2-135M's perplexity on real text, a token at a time.

``bench_quality.py`` scores each method in one 2,048-token window: the prefill path, where
torch_wo dequantizes and runs the float matmul. Generation runs another path: one token a step
against a static cache, where torch_wo runs its fused kernels (``_weight_int8pack_mm`` and
``_weight_int4pack_mm_for_cpu`` on the CPU; the Triton kernels on CUDA, with whatever
``bench_decode.py`` suffix folds more into them: ``+glu``, ``+rope``, ``+norms``). This script
scores every method both ways on the same tokens (``quantcore.evaluate.decode_scores``):

- ``window``: the perplexity of one forward over the text;
- ``decode``: the perplexity with each token fed alone through a ``StaticCache``, eagerly, and with
  ``--compiled`` also under ``torch.compile(fullgraph=True)`` (CUDA graphs on CUDA);
- against the float model on the same path: the perplexity's change, the share of steps whose
  greedy token (the argmax) is the float model's, and the mean absolute difference of the
  per-token log-likelihoods; and between a method's own two paths, that last difference too.

A fused kernel as accurate as the dequantize path gives ``decode`` within float rounding of
``window``, as the float model itself does. Methods are ``bench_decode.py``'s (a CLI preset and
its suffixes, ``+group=N`` for another group size: SmolLM2's 576 columns are whole groups of 64,
not of 128, and only whole groups take the interleaved CUDA kernels).

Usage (``bench/prepare_models.py`` first)::

    python bench/decode_quality.py --out bench/_results/decode_quality_cpu.json
    python bench/decode_quality.py --device cuda --compiled \\
        --methods bf16,int8-torch,int8-torch+glu+rope+norms,int4-torch+group=64,int4-torch+group=64+glu+rope+norms
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import bench_decode
import torch

DEFAULT_METHODS = "bf16,int8-torch,int4-torch,int4-torch+group=64"


def window_scores(model, ids: torch.Tensor) -> dict:
    """Per-token negative log-likelihoods and argmaxes of one forward over ``ids``."""
    with torch.inference_mode():
        logits = model(ids.view(1, -1)).logits[0, :-1].float()
    target = ids[1:].view(-1, 1)
    return {"nll": torch.logsumexp(logits, -1) - logits.gather(1, target)[:, 0], "predicted": logits.argmax(-1)}


def score(model, method: str, ids: torch.Tensor, compiled: bool) -> dict:
    """Both paths' scores of one model (``compiled``: the decode path compiled too)."""
    from quantcore.evaluate import decode_scores

    paths = {"window": window_scores(model, ids)}
    start = time.perf_counter()
    paths["decode"] = decode_scores(model, ids)
    seconds = {"decode": time.perf_counter() - start}
    if compiled:
        counters = bench_decode.zeroed_fold_counters(model)
        start = time.perf_counter()
        paths["compiled"] = decode_scores(model, ids, compiled=True)
        seconds["compiled"] = time.perf_counter() - start
        # the residual kernels leave the fold's counters non-zero: proof the compiled steps folded
        paths["compiled"]["folded"] = bench_decode.folded(counters)
        torch._dynamo.reset()
    return {"method": method, "paths": paths, "seconds": seconds}


def _perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


def summarize(scored: dict, reference: dict | None) -> dict:
    """A method's JSON row: each path's perplexity, and its agreement with ``reference`` (the float
    model's scores) on the same path and with its own window path."""
    row: dict = {"method": scored["method"], "seconds": scored["seconds"]}
    window = scored["paths"]["window"]
    for path, s in scored["paths"].items():
        entry = {"perplexity": _perplexity(s["nll"])}
        if path != "window":
            entry["vs_window_mean_abs_nll"] = (s["nll"] - window["nll"]).abs().mean().item()
            entry["fullgraph"] = s.get("fullgraph")
            entry["folded"] = s.get("folded")
        if reference is not None and path in reference["paths"]:
            ref = reference["paths"][path]
            entry["change"] = entry["perplexity"] / _perplexity(ref["nll"]) - 1.0
            entry["top1_agreement"] = (s["predicted"] == ref["predicted"]).double().mean().item()
            entry["vs_float_mean_abs_nll"] = (s["nll"] - ref["nll"]).abs().mean().item()
        row[path] = entry
    return row


def markdown(rows: list[dict]) -> str:
    paths = [p for p in ("window", "decode", "compiled") if p in rows[0]]
    header = ["method"] + [f"{p} ppl" for p in paths]
    header += [f"{p} vs window (mean abs dNLL)" for p in paths[1:]]
    header += [f"{p}: change, top-1 agreement with float" for p in paths]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
    for r in rows:
        cells = [f"`{r['method']}`"] + [f"{r[p]['perplexity']:.3f}" for p in paths]
        cells += [f"{r[p]['vs_window_mean_abs_nll']:.4f}" for p in paths[1:]]
        for p in paths:
            e = r[p]
            cells.append("-" if "change" not in e else f"{100 * e['change']:+.2f}%, {100 * e['top1_agreement']:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated bench_decode.py methods")
    parser.add_argument("--max-tokens", type=_common.int_at_least(2), default=2048)
    parser.add_argument("--compiled", action="store_true", help="also score the decode path compiled")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if "graph" in bench_decode.split_method(method)[1]:
            parser.error(f"{method}: +graph is bench_decode.py's timing capture; --compiled compiles the step here")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_common.smollm2_bf16_dir())
    text = _common.load_shakespeare_text(12_000)
    ids = tokenizer(text, return_tensors="pt").input_ids[0][: args.max_tokens].to(args.device)
    base = bench_decode.build_model("smollm2", args.device, ids.numel())
    rows, reference = [], None
    for method in methods:
        print(f"... {method}", file=sys.stderr, flush=True)
        with bench_decode.launch_options(method, "smollm2"):
            model = bench_decode.make_variant(base, method)
            scored = score(model, method, ids, args.compiled)
        del model
        if method == "bf16":
            reference = scored
        rows.append(summarize(scored, reference))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "model": "SmolLM2-135M (bench/_data/smollm2-135m-bf16), bf16",
            "text": f"first {ids.numel()} tokens of load_shakespeare_text(12000) (Hamlet)",
            "device": torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU",
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
            "rows": rows,
            "table": table,
        }
        args.out.write_text(json.dumps(result, indent=1))
    return 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
