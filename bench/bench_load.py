"""Loading SmolLM2-135M quantized: quantcore.from_pretrained against transformers' from_pretrained.

Each load runs in a fresh process (bench/_common.run_in_fresh_process): load time (imports
excluded), peak RSS of the whole process, and the logits on a fixed input, compared between the
two libraries (max abs diff). Both load on the CPU (transformers with ``device_map="cpu"``) in
bf16 with the same bitsandbytes settings.

    .venv/bin/python bench/bench_load.py [--repeats 3] [--json bench/_results/load.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import run_in_fresh_process, smollm2_bf16_dir  # noqa: E402

FORMATS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"},
    "int8": {"load_in_8bit": True},
}
IDS = [[1, 504, 3, 2210, 30, 1820, 314, 253, 1379, 28, 9, 5, 100, 7000, 42, 12]]


def load(library: str, fmt: str, path: str) -> dict:
    """Run in a child: import everything, then time the load alone; return logits and timings."""
    import time
    import warnings

    import torch
    import transformers

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    from quantcore_bnb import BitsAndBytesConfig as QuantcoreBnb

    import quantcore

    quantcore.available_backends()  # plugin discovery is a one-time cost, not a load cost
    kwargs = dict(FORMATS[fmt])
    baseline = _rss_bytes()
    start = time.perf_counter()
    if library == "quantcore":
        model = quantcore.from_pretrained(path, QuantcoreBnb(**kwargs), dtype=torch.bfloat16, progress=False)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.bfloat16,
            device_map="cpu",
            quantization_config=transformers.BitsAndBytesConfig(**kwargs),
        )
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits.float()
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {
        "load_s": seconds,
        "model_bytes": nbytes,
        "rss_before_load": baseline,
        "logits": logits.flatten().tolist(),
    }


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per library and format")
    parser.add_argument("--json", default=str(BENCH_DIR / "_results" / "load.json"))
    args = parser.parse_args()
    path = smollm2_bf16_dir()
    if not Path(path, "model.safetensors").is_file():
        sys.exit(f"{path} is missing: run `python bench/prepare_models.py` first")

    results = {}
    for fmt in FORMATS:
        runs: dict[str, list[dict]] = {"quantcore": [], "transformers": []}
        for _ in range(args.repeats):
            for library in runs:  # interleaved, so drift hits both alike
                out = run_in_fresh_process(
                    load, {"library": library, "fmt": fmt, "path": str(path)}, with_stats=True, timeout=900
                )
                runs[library].append({**out["result"], "peak_rss_bytes": out["peak_rss_bytes"]})
        row = {}
        for library, samples in runs.items():
            row[library] = {
                "load_s_median": statistics.median(s["load_s"] for s in samples),
                "load_s": [s["load_s"] for s in samples],
                "load_s_min": min(s["load_s"] for s in samples),
                # what the load itself added to the process's peak (imports excluded)
                "load_peak_mib_median": statistics.median((s["peak_rss_bytes"] - s["rss_before_load"]) for s in samples)
                / 2**20,
                "peak_rss_mib_median": statistics.median(s["peak_rss_bytes"] for s in samples) / 2**20,
                "model_mib": samples[0]["model_bytes"] / 2**20,
            }
        a, b = runs["quantcore"][0]["logits"], runs["transformers"][0]["logits"]
        row["max_abs_logit_diff"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
        row["time_ratio"] = row["quantcore"]["load_s_median"] / row["transformers"]["load_s_median"]
        row["rss_ratio"] = row["quantcore"]["peak_rss_mib_median"] / row["transformers"]["peak_rss_mib_median"]
        row["load_peak_ratio"] = row["quantcore"]["load_peak_mib_median"] / row["transformers"]["load_peak_mib_median"]
        results[fmt] = row

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    import platform

    import torch
    import transformers

    meta = {
        "model": str(path),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")

    print(
        "| format | load s: quantcore / transformers (min) | time ratio (median) | peak RSS MiB: quantcore / "
        "transformers | RSS ratio | added by the load MiB | ratio | max abs logit diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for fmt, r in results.items():
        q, t = r["quantcore"], r["transformers"]
        print(
            f"| {fmt} | {q['load_s_median']:.2f} / {t['load_s_median']:.2f} ({q['load_s_min']:.2f} / "
            f"{t['load_s_min']:.2f}) | {r['time_ratio']:.2f} | {q['peak_rss_mib_median']:.0f} / "
            f"{t['peak_rss_mib_median']:.0f} | {r['rss_ratio']:.2f} | {q['load_peak_mib_median']:.0f} / "
            f"{t['load_peak_mib_median']:.0f} | {r['load_peak_ratio']:.2f} | {r['max_abs_logit_diff']:.3g} |"
        )
    print(
        f"\n(medians of {args.repeats} fresh processes each; ratios are quantcore / transformers, "
        f"lower is better; JSON: {out})"
    )


if __name__ == "__main__":
    main()
