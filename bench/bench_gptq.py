#!/usr/bin/env python
"""GPTQ in one run: quality against plain rounding on SmolLM2-135M, and the time to quantize.

Two modes:

``--model smollm2`` (CPU; needs ``bench/prepare_models.py``): perplexity on held-out text of
SmolLM2-135M in float, with plain round-to-nearest int4 (``torch_wo`` int4 g128, asymmetric, the
data-free incumbent) and with GPTQ 4-bit g128 asymmetric, calibrated on ``--samples`` x ``--seqlen``
tokens. The held-out text is the first 2048 tokens of ``load_shakespeare_text(12000)`` (Hamlet,
what every quality figure in docs/benchmarks.md uses); calibration comes from *other* plays
(Macbeth, Othello, Lear). Reported: each perplexity, the increase over float, and GPTQ's increase
as a fraction of rounding's (the issue's target: at most 0.6). Then the GPTQ model is saved in the
GPTQ format, loaded back with ``quantcore.from_pretrained`` and its logits compared.

``--model llama-1.1b`` / ``--model llama-tiny`` (any device): a Llama with TinyLlama-1.1B's shape
(or a tiny one) and seeded random weights in bf16, calibrated on random tokens (enough for timing;
not for quality). Reported: GPTQ's quantize time and peak memory with the whole model on the device,
and with the model on the CPU and only the block being calibrated on the device
(``calibration_device=``), beside plain rounding (``torch_wo`` int4 g128) of the same model.

Usage::

    .venv/bin/python bench/bench_gptq.py --model smollm2 --out bench/_results/gptq_smollm2.json
    python bench/bench_gptq.py --model llama-1.1b --device cuda --out gptq_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import _common  # noqa: E402

LLAMA = {"llama-tiny": _common.LLAMA_SHAPES["tiny"], "llama-1.1b": _common.LLAMA_SHAPES["1.1b"]}
CALIBRATION_WORKS = ("macbeth_gut", "othello_gut", "lear_gut")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _gptq(bits: int = 4, **kwargs):
    from quantcore_gptq import GPTQConfig

    return GPTQConfig(bits=bits, group_size=128, sym=False, **kwargs)


# ---------------------------------------------------------------------- quality on SmolLM2
def calibration_batches(tokenizer, samples: int, seqlen: int):
    """``samples`` windows of ``seqlen`` tokens from plays other than the held-out Hamlet."""
    text = _common.load_shakespeare_text(samples * seqlen * 6, works=CALIBRATION_WORKS)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < samples * seqlen:
        raise SystemExit(f"calibration text too short: {len(ids)} tokens")
    return [ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0) for i in range(samples)]


def quality(samples: int, seqlen: int, max_tokens: int, variants: list[str]) -> dict:
    import torch
    import transformers

    import quantcore

    transformers.utils.logging.disable_progress_bar()
    folder = _common.smollm2_bf16_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    held_out = _common.load_shakespeare_text(12_000)
    calibration = calibration_batches(tokenizer, samples, seqlen)

    def fresh():
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def score(model) -> float:
        return _common.perplexity(model, tokenizer, held_out, max_tokens=max_tokens)["ppl"]

    rows: dict[str, dict] = {}
    rows["float32"] = {"ppl": score(fresh())}
    print(f"float32 ppl {rows['float32']['ppl']:.3f}", file=sys.stderr)
    model = fresh()
    start, cpu = time.perf_counter(), time.process_time()
    quantcore.quantize(model, {"quant_method": "torch_wo", "bits": 4, "group_size": 128})
    rows["rtn int4 g128 (torch_wo)"] = {
        "quantize_s": time.perf_counter() - start,
        "quantize_cpu_s": time.process_time() - cpu,
        "ppl": score(model),
    }
    configs = {
        "gptq int4 g128 asym": _gptq(),
        "gptq int4 g128 asym damp 0.01": _gptq(damp_percent=0.01),
        "gptq int4 g128 asym act-order": _gptq(desc_act=True),
    }
    configs = {k: v for k, v in configs.items() if not variants or k in variants}
    saved = None
    for name, config in configs.items():
        model = fresh()
        start, cpu = time.perf_counter(), time.process_time()
        report = quantcore.quantize(model, config, calibration=calibration)
        seconds = time.perf_counter() - start
        rows[name] = {"quantize_s": seconds, "quantize_cpu_s": time.process_time() - cpu, "ppl": score(model)}
        rows[name]["modules"] = len(report.quantized)
        print(f"{name}: ppl {rows[name]['ppl']:.3f}, {seconds:.1f} s", file=sys.stderr)
        if saved is None:
            saved = name, model
    base = rows["float32"]["ppl"]
    rtn = rows["rtn int4 g128 (torch_wo)"]["ppl"] - base
    for row in rows.values():
        row["increase"] = row["ppl"] - base
        row["vs_rtn_increase"] = row["increase"] / rtn if rtn else None
    result = {
        "model": "SmolLM2-135M (bench/_data/smollm2-135m-bf16), float32 on the CPU",
        "held_out": f"first {max_tokens} tokens of load_shakespeare_text(12000) (Hamlet)",
        "calibration": f"{samples} x {seqlen} tokens of {', '.join(CALIBRATION_WORKS)}",
        "rows": rows,
    }
    if saved is not None:
        result["reload"] = reload_check(*saved, tokenizer, held_out)
    return result


def reload_check(name: str, model, tokenizer, text: str) -> dict:
    """Save in the GPTQ format, load back with from_pretrained, compare logits."""
    import torch

    import quantcore

    ids = tokenizer(text, return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        before = model(ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        quantcore.save_quantized(model, tmp)
        files = sorted(p.name for p in Path(tmp).iterdir())
        loaded = quantcore.from_pretrained(tmp, dtype=torch.float32)
        with torch.no_grad():
            after = loaded(ids).logits
    return {"variant": name, "files": files, "max_abs_logit_diff": float((before - after).abs().max())}


# ---------------------------------------------------------------------- timing on a Llama
def timing(size: str, device: str, samples: int, seqlen: int) -> dict:
    import torch
    import transformers

    import quantcore

    shape = LLAMA[size]
    config = transformers.LlamaConfig(**shape)
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, shape["vocab_size"], (1, seqlen), generator=gen) for _ in range(samples)]

    def build(where: str):
        torch.manual_seed(0)
        with torch.device(where):
            model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
        return model

    rows = {}
    for name, where, kwargs in (
        ("rtn int4 g128 (torch_wo), model on device", device, None),
        ("gptq int4 g128 asym, model on device", device, {}),
        ("gptq int4 g128 asym, model on cpu, blocks on device", "cpu", {"calibration_device": device}),
    ):
        if where == "cpu" and kwargs and device == "cpu":
            continue
        model = build(where)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        if kwargs is None:
            quantcore.quantize(model, {"quant_method": "torch_wo", "bits": 4, "group_size": 128})
        else:
            quantcore.quantize(model, _gptq(), calibration=calibration, **kwargs)
        _sync(device)
        row = {"quantize_s": time.perf_counter() - start, "quantize_cpu_s": time.process_time() - cpu}
        if device.startswith("cuda"):
            row["peak_device_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            row["model_resident_mib"] = base / 2**20
        rows[name] = row
        print(f"{name}: {row}", file=sys.stderr)
        del model
    params = sum(p.numel() for p in build("meta").parameters())
    return {
        "model": f"Llama {size} shape, random bf16 weights ({params:,} parameters)",
        "calibration": f"{samples} x {seqlen} random tokens",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", *LLAMA], default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--variants", default="", help="comma-separated GPTQ variants (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        variants = [v for v in args.variants.split(",") if v]
        result = quality(args.samples, args.seqlen, args.max_tokens, variants)
    else:
        result = timing(args.model, args.device, args.samples, args.seqlen)
    result["command"] = "python bench/bench_gptq.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
