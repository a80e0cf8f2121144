"""Loading over GPUs with ``device_map="auto"`` and a small ``max_memory``: quantcore against transformers.

A Llama-shaped checkpoint is written in bf16 (``--size``; the default does not fit the GPU budget
in bf16 but does in NF4), then each library loads it with ``device_map="auto"``, the same
``max_memory`` and the same bitsandbytes NF4 settings, in fresh processes of the same run. For each
load: the chosen map (device -> module count and bytes), peak memory per GPU
(``torch.cuda.max_memory_allocated``) and how much of it was transient (peak minus what the loaded
model holds there), load time, and the logits on a fixed input (max abs diff between the two).
Works with one or more GPUs; refuses to run without CUDA.

The checkpoint is read once before any timed load (a cold page cache would be paid by whichever
library loads first), the order alternates between repeats, and the fastest repeat is compared.
The two planners may split the model differently, which moves memory from one GPU to another; a
third variant, ``quantcore (transformers' map)``, loads with the map transformers chose, so that
the per-GPU peaks compare like for like (``--no-same-map`` to skip it).

    python bench/bench_device_map.py [--size small|medium] [--gpu-budget 1.2GiB] [--repeats 3] \
        [--json bench/_results/device_map.json]

``--gpu-budget`` is the total over the visible GPUs, split evenly; ``--model PATH`` loads an
existing bf16 checkpoint instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import DATA_DIR, run_in_fresh_process  # noqa: E402

SIZES = {  # hidden, intermediate, layers, vocab; bf16 / NF4 sizes of the whole model
    "small": (2048, 5504, 16, 32000),  # 1.75 GiB bf16, about 0.68 GiB NF4 (embeddings and head in bf16)
    "medium": (4096, 11008, 16, 32000),  # 6.5 GiB bf16, about 2.1 GiB NF4
}
NF4 = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "bfloat16",
}
IDS = [[1, 504, 3, 2210, 30, 1820, 314, 253, 1379, 28, 9, 5, 100, 7000, 42, 12]]


def prepare(size: str) -> str:
    """Write the random bf16 checkpoint of ``size`` once; returns its folder."""
    import torch
    import transformers

    hidden, intermediate, layers, vocab = SIZES[size]
    folder = DATA_DIR / f"llama-{size}-bf16"
    if (folder / "config.json").is_file():
        return str(folder)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return str(folder)


def warm(path: str) -> None:
    """Read every file of the checkpoint once: no library pays for a cold page cache."""
    for file in Path(path).iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def load(library: str, path: str, max_memory: dict, device_map: dict | None = None) -> dict:
    """In a child: load with ``device_map="auto"`` (or the map given), then report the map, per-GPU
    peaks and the logits."""
    import time
    import warnings

    import torch
    import transformers

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    from quantcore_bnb import BitsAndBytesConfig

    import quantcore

    quantcore.available_backends()
    budgets = {int(k) if k.isdigit() else k: v for k, v in max_memory.items()}
    for d in range(torch.cuda.device_count()):
        torch.empty(1, device=f"cuda:{d}")  # the allocator of a device exists only once it was used
        torch.cuda.reset_peak_memory_stats(d)
    start = time.perf_counter()
    try:
        if library == "quantcore":
            model = quantcore.from_pretrained(
                path,
                BitsAndBytesConfig(**NF4),
                dtype=torch.bfloat16,
                device_map=device_map or "auto",
                max_memory=None if device_map else budgets,
            )
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path,
                dtype=torch.bfloat16,
                device_map="auto",
                max_memory=budgets,
                quantization_config=transformers.BitsAndBytesConfig(**NF4),
            )
    except Exception as exc:  # a library that refuses the budget is a result too
        return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)
    seconds = time.perf_counter() - start
    peaks = {str(d): torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())}
    held = {str(d): 0 for d in range(torch.cuda.device_count())}
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type == "cuda":
            held[str(t.device.index)] += t.numel() * t.element_size()
    # transformers leaves hf_device_map unset when "auto" put everything on one device
    device_map = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    with torch.no_grad():
        first = next(p.device for p in model.parameters() if p.device.type != "meta")
        logits = model(torch.tensor(IDS, device=first)).logits.float().cpu()
    return {
        "load_s": seconds,
        "peak_allocated_bytes": peaks,
        "transient_bytes": {d: peaks[d] - held[d] for d in peaks},
        "devices": _by_device(model, device_map),
        "device_map": {k: str(v) for k, v in device_map.items()},
        "logits": logits.flatten().tolist(),
    }


def _by_device(model, device_map: dict) -> dict:
    """device -> number of top entries of the map, and the bytes of the tensors they hold."""
    out: dict[str, dict] = {}
    for name, device in device_map.items():
        row = out.setdefault(str(device), {"entries": 0, "bytes": 0})
        row["entries"] += 1
        module = model.get_submodule(name) if name else model
        row["bytes"] += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--model", help="an existing bf16 checkpoint folder (instead of --size)")
    parser.add_argument("--gpu-budget", default="1.2GiB", help="max_memory over all visible GPUs, split evenly")
    parser.add_argument("--cpu-budget", default="64GiB")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per library, order alternating")
    parser.add_argument("--no-same-map", action="store_true", help="skip quantcore with transformers' map")
    parser.add_argument("--json", default=str(BENCH_DIR / "_results" / "device_map.json"))
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_device_map.py needs CUDA GPUs (it measures per-GPU memory); none is visible here")
    from accelerate.utils import convert_file_size_to_int

    gpus = torch.cuda.device_count()
    share = convert_file_size_to_int(args.gpu_budget) // gpus
    max_memory = {**{str(d): share for d in range(gpus)}, "cpu": args.cpu_budget}
    path = args.model or run_in_fresh_process(prepare, {"size": args.size}, timeout=1800)

    warm(path)
    runs: dict[str, list[dict]] = {"quantcore": [], "transformers": []}
    for i in range(args.repeats):
        for library in ("quantcore", "transformers") if i % 2 == 0 else ("transformers", "quantcore"):
            runs[library].append(
                run_in_fresh_process(load, {"library": library, "path": path, "max_memory": max_memory}, timeout=1800)
            )
    theirs = runs["transformers"][-1].get("device_map")
    if theirs and not args.no_same_map:
        same = {k: int(v) if v.isdigit() else v for k, v in theirs.items()}
        runs["quantcore (transformers' map)"] = [
            run_in_fresh_process(
                load,
                {"library": "quantcore", "path": path, "max_memory": max_memory, "device_map": same},
                timeout=1800,
            )
            for _ in range(args.repeats)
        ]
    results = {library: samples[-1] for library, samples in runs.items()}
    for library, samples in runs.items():
        times = [s["load_s"] for s in samples if "load_s" in s]
        if times:
            results[library]["load_s_min"] = min(times)
            results[library]["load_s_all"] = times
    a, b = results["quantcore"].get("logits"), results["transformers"].get("logits")
    diff = max(abs(x - y) for x, y in zip(a, b, strict=True)) if a and b else None
    for r in results.values():
        r.pop("logits", None)
    report = {
        "model": path,
        "gpus": [torch.cuda.get_device_name(d) for d in range(gpus)],
        "max_memory": max_memory,
        "results": results,
        "max_abs_logit_diff": diff,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{path} on {gpus} GPU(s) ({report['gpus'][0]}), max_memory {max_memory}")
    base = results["transformers"].get("load_s_min")
    for library, r in results.items():
        if "error" in r:
            print(f"  {library}: refused: {r['error'].splitlines()[0]}")
            continue
        placed = ", ".join(f"{d}: {v['entries']} entries {v['bytes'] / 2**20:.0f} MiB" for d, v in r["devices"].items())
        peaks = ", ".join(
            f"GPU {d} {n / 2**20:.0f} MiB ({r['transient_bytes'][d] / 2**20:.0f} transient)"
            for d, n in r["peak_allocated_bytes"].items()
        )
        ratio = f", {r['load_s_min'] / base:.2f}x transformers" if base and library != "transformers" else ""
        times = ", ".join(f"{t:.2f}" for t in r["load_s_all"])
        print(f"  {library}: min {r['load_s_min']:.2f} s{ratio} (runs {times}); map {placed}; peak {peaks}")
    print(f"  max abs logit diff: {diff}")
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
