"""Disk offload on the CPU: quantcore against transformers + accelerate, same checkpoint, same device map.

The checkpoint is SmolLM2-135M in bf16 (``bench/prepare_models.py``), or ``--model PATH``, or with
``--tiny`` a small random Llama written here. Both libraries load it with one dict map: the
embeddings, the head and the first half of the layers on ``"cpu"``, the second half on ``"disk"``
with ``offload_folder``, in bf16, each load in a fresh process (the page cache is warmed first and
the order alternates between repeats). For each: load time, peak RSS after the load and after one
forward (VmHWM, the interpreter and imports included), the RSS the imports alone took, what was
written to ``offload_folder``, the forward time, and the logits against the plain in-memory load.
A third row loads the same map with quantcore and torch_wo int4 (quantized modules on disk are
written to the folder; transformers has no counterpart to compare it with).

    python bench/bench_disk_offload.py [--tiny] [--model PATH] [--repeats 3] \
        [--json bench/_results/disk_offload.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import DATA_DIR, run_in_fresh_process, smollm2_bf16_dir  # noqa: E402

IDS = [[1, 504, 3, 2210, 30, 1820, 314, 253, 1379, 28, 9, 5, 100, 42, 12, 7]]
VARIANTS = ("transformers", "quantcore", "quantcore-int4")


def prepare_tiny() -> str:
    """A random bf16 Llama (8 layers, about 60 MiB), written once."""
    import torch
    import transformers

    folder = DATA_DIR / "llama-disk-tiny-bf16"
    if (folder / "config.json").is_file():
        return str(folder)
    config = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return str(folder)


def device_map_for(path: str) -> dict[str, str]:
    """The first half of the layers and everything else on the CPU, the second half on disk."""
    import transformers

    layers = transformers.AutoConfig.from_pretrained(path).num_hidden_layers
    device_map = {"model.embed_tokens": "cpu"}
    device_map.update({f"model.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)})
    device_map.update({"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})
    return device_map


def warm(path: str) -> None:
    """Read every file of the checkpoint once, so that no load pays for a cold page cache."""
    for file in Path(path).iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                while f.read(1 << 24):
                    pass


def load(variant: str, path: str, device_map: dict, folder: str) -> dict:
    """In a child: load with the map, then one forward; times, RSS, the folder's files, the logits."""
    import time
    import warnings

    import torch
    import transformers
    from _common import current_rss_bytes, peak_rss_bytes

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    import quantcore

    quantcore.available_backends()
    config = None
    if variant == "quantcore-int4":
        from quantcore_torch import TorchWeightOnlyConfig

        config = TorchWeightOnlyConfig(bits=4, group_size=64)
    imports_rss = current_rss_bytes()
    start = time.perf_counter()
    if variant == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map=device_map, offload_folder=folder
        )
    else:
        model = quantcore.from_pretrained(
            path, config, dtype=torch.bfloat16, device_map=device_map, offload_folder=folder
        )
    load_s = time.perf_counter() - start
    load_peak = peak_rss_bytes()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(ids).logits.float()
        forward_s = time.perf_counter() - start
    written = [p for p in Path(folder).rglob("*") if p.is_file()]
    return {
        "load_s": load_s,
        "forward_s": forward_s,
        "imports_rss_bytes": imports_rss,
        "load_peak_rss_bytes": load_peak,
        "peak_rss_bytes": peak_rss_bytes(),
        "written_files": len(written),
        "written_bytes": sum(p.stat().st_size for p in written),
        "logits": logits.flatten().tolist(),
    }


def reference(path: str, variant: str) -> list[float]:
    """In a child: the logits of the plain in-memory load (no device map) of the same variant."""
    import warnings

    import torch
    import transformers

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    import quantcore

    if variant == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        config = None
        if variant == "quantcore-int4":
            from quantcore_torch import TorchWeightOnlyConfig

            config = TorchWeightOnlyConfig(bits=4, group_size=64)
        model = quantcore.from_pretrained(path, config, dtype=torch.bfloat16)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().flatten().tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a bf16 transformers checkpoint folder (default: SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="a small random Llama written here instead")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant, order alternating")
    parser.add_argument("--json", default=str(BENCH_DIR / "_results" / "disk_offload.json"))
    args = parser.parse_args()

    path = args.model or (run_in_fresh_process(prepare_tiny, {}) if args.tiny else str(smollm2_bf16_dir()))
    device_map = device_map_for(path)
    warm(path)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(args.repeats):
        for variant in VARIANTS if i % 2 == 0 else reversed(VARIANTS):
            with tempfile.TemporaryDirectory(prefix="offload-") as folder:
                result = run_in_fresh_process(
                    load, {"variant": variant, "path": path, "device_map": device_map, "folder": folder}, timeout=1800
                )
            runs[variant].append(result)
    results = {}
    for variant, samples in runs.items():
        plain = run_in_fresh_process(reference, {"path": path, "variant": variant}, timeout=1800)
        last = samples[-1]
        diff = max(abs(a - b) for a, b in zip(last["logits"], plain, strict=True))
        results[variant] = {
            "load_s_min": min(s["load_s"] for s in samples),
            "load_s": [s["load_s"] for s in samples],
            "forward_s_min": min(s["forward_s"] for s in samples),
            "load_peak_rss_bytes": min(s["load_peak_rss_bytes"] for s in samples),
            "peak_rss_bytes": min(s["peak_rss_bytes"] for s in samples),
            "imports_rss_bytes": min(s["imports_rss_bytes"] or 0 for s in samples),
            "written_files": last["written_files"],
            "written_bytes": last["written_bytes"],
            "max_abs_logit_diff_vs_plain_load": diff,
        }
    a, b = runs["quantcore"][-1]["logits"], runs["transformers"][-1]["logits"]
    cross = max(abs(x - y) for x, y in zip(a, b, strict=True))
    report = {
        "model": path,
        "device_map": device_map,
        "repeats": args.repeats,
        "results": results,
        "max_abs_logit_diff_quantcore_vs_transformers": cross,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    on_disk = sum(1 for d in device_map.values() if d == "disk")
    print(f"{path}: {on_disk} of {len(device_map)} map entries on disk, {args.repeats} repeats")
    base = results["transformers"]
    for variant, r in results.items():
        ratio = (
            f" ({r['load_s_min'] / base['load_s_min']:.2f}x time, "
            f"{r['load_peak_rss_bytes'] / base['load_peak_rss_bytes']:.2f}x peak RSS)"
            if variant != "transformers"
            else ""
        )
        mib = {k: r[k] / 2**20 for k in ("load_peak_rss_bytes", "imports_rss_bytes", "peak_rss_bytes", "written_bytes")}
        print(
            f"  {variant}: load {r['load_s_min']:.2f} s, peak RSS after load {mib['load_peak_rss_bytes']:.0f} MiB "
            f"(imports {mib['imports_rss_bytes']:.0f}), after a forward {mib['peak_rss_bytes']:.0f} MiB, "
            f"forward {r['forward_s_min']:.2f} s, wrote {r['written_files']} files {mib['written_bytes']:.1f} MiB, "
            f"logits vs its plain load {r['max_abs_logit_diff_vs_plain_load']:.3g}" + ratio
        )
    print(f"  logits quantcore vs transformers: max abs diff {cross:.3g}")
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
