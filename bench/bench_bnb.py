#!/usr/bin/env python
"""bitsandbytes on a Llama-shaped model: quantcore vs transformers, bf16 / int8 / NF4, in one run.

The model comes from a transformers ``LlamaConfig`` with random (seeded) weights in bfloat16:
``--size tiny`` (CPU smoke test) or ``--size 1.1b`` (TinyLlama-1.1B's shape: hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000). It is saved once as a
safetensors checkpoint in a temporary folder, and every variant starts from that checkpoint:

- ``bf16``: ``from_pretrained(dir, dtype=bfloat16, device_map=device)``, not quantized;
- ``quantcore``: ``quantcore.from_pretrained(dir, quantization_config=BitsAndBytesConfig(...))``,
  quantize-on-load: each layer is quantized as soon as its tensors are read;
- ``quantcore_quantize``: transformers' float ``from_pretrained`` (float weights on the device),
  then ``quantcore.quantize(model, BitsAndBytesConfig(...))`` (in place: peak holds the float model);
- ``transformers``: ``from_pretrained(dir, dtype=bfloat16, device_map=device,
  quantization_config=transformers.BitsAndBytesConfig(...))``, transformers' own path, which
  quantizes each weight as it loads it.

Why this comparison: both start from the same files on disk and end with the same modules (the
tests check the quantized tensors are equal), so ``load + quantize`` against transformers' load
is the honest end-to-end figure; quantcore's ``quantize`` alone is reported too. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA (reset before each variant) and the process's RSS
growth on the CPU (indicative only: the allocator keeps freed memory). Forward time per token is
the best of ``--repeats`` forwards of one ``(1, --tokens)`` prompt (prefill), divided by
``--tokens``, and of a single-token forward (decode-like, no cache), after a warm-up forward.

Usage::

    python bench/bench_bnb.py --device cpu --size tiny --out bench/_results/bnb_cpu.json
    python bench/bench_bnb.py --device cuda --size 1.1b --out bench/_results/bnb_cuda.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

SIZES = _common.LLAMA_SHAPES
MODES = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16"),
}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


class Memory:
    """Peak memory of one variant: CUDA allocator peak, or RSS growth on the CPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> Memory:
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            _common.reset_peak_rss()
            self.start = _common.current_rss_bytes() or 0
        return self

    def peak_bytes(self) -> int:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.start
        return _common.peak_rss_bytes() - self.start

    def __exit__(self, *exc) -> None:
        pass


def _forward_times(model, device: str, tokens: int, repeats: int, vocab: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
    one = prompt[:, :1]
    out = {}
    with torch.no_grad():
        model(prompt)  # warm-up (also the one-time CPU repacking of 4-bit weights)
        for name, ids in (("prefill", prompt), ("decode", one)):
            best = float("inf")
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                logits = model(ids).logits
                _sync(device)
                best = min(best, time.perf_counter() - start)
            out[f"{name}_ms_per_token"] = best / ids.shape[1] * 1e3
        out["logits_finite"] = bool(torch.isfinite(logits).all())
    return out


def _logits(model, device: str, vocab: int):
    import torch

    ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        return model(ids).logits.float().cpu()


def run(device: str, size: str, tokens: int, repeats: int) -> dict:
    """Every variant on one checkpoint; returns the results."""
    import torch
    import transformers
    from quantcore_bnb import BitsAndBytesConfig

    import quantcore

    config = transformers.LlamaConfig(
        **SIZES[size], max_position_embeddings=max(256, tokens), tie_word_embeddings=False
    )
    results: dict = {"size": size, "device": device, "tokens": tokens, "repeats": repeats, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="bench_bnb_") as tmp:
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        results["params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model

        def load(**kwargs):
            return transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.bfloat16, device_map=device, **kwargs
            ).eval()

        logits: dict = {}
        variants = [("bf16", None, None)]
        for mode, kwargs in MODES.items():
            variants += [
                (f"quantcore_{mode}", "quantcore-stream", kwargs),
                (f"quantcore_quantize_{mode}", "quantcore", kwargs),
                (f"transformers_{mode}", "transformers", kwargs),
            ]
        for name, path, kwargs in variants:
            row: dict = {}
            with Memory(device) as mem:
                start = time.perf_counter()
                if path == "transformers":
                    model = load(quantization_config=transformers.BitsAndBytesConfig(**kwargs))
                    _sync(device)
                    row["load_s"] = time.perf_counter() - start
                    row["quantize_s"] = None
                elif path == "quantcore-stream":  # quantize-on-load: each layer as its tensors arrive
                    model = quantcore.from_pretrained(
                        tmp,
                        quantization_config=BitsAndBytesConfig(**kwargs),
                        dtype=torch.bfloat16,
                        device_map=device,
                        progress=False,
                    ).eval()
                    _sync(device)
                    row["load_s"] = time.perf_counter() - start
                    row["quantize_s"] = None
                    row["quantized_modules"] = len(model.quantcore_report.quantized)
                else:
                    model = load()
                    _sync(device)
                    row["load_s"] = time.perf_counter() - start
                    if path == "quantcore":
                        q_start = time.perf_counter()
                        report = quantcore.quantize(model, BitsAndBytesConfig(**kwargs), progress=False)
                        _sync(device)
                        row["quantize_s"] = time.perf_counter() - q_start
                        row["quantized_modules"] = len(report.quantized)
                row["load_and_quantize_s"] = time.perf_counter() - start
                row["peak_bytes"] = mem.peak_bytes()
            row["model_bytes"] = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
            row.update(_forward_times(model, device, tokens, repeats, config.vocab_size))
            logits[name] = _logits(model, device, config.vocab_size)
            mode = name.rsplit("_", 1)[-1]
            if name.startswith("transformers_"):
                for other in (f"quantcore_{mode}", f"quantcore_quantize_{mode}"):
                    diff = (logits[other] - logits[name]).abs().max().item()
                    results["variants"][other]["logits_max_abs_diff_vs_transformers"] = diff
            results["variants"][name] = row
            print(
                f"{name:<24} load+quantize {row['load_and_quantize_s']:7.2f} s   "
                f"peak {_common.mib(row['peak_bytes']):9.1f} MiB   model {_common.mib(row['model_bytes']):9.1f} MiB   "
                f"prefill {row['prefill_ms_per_token']:8.3f} ms/token   decode {row['decode_ms_per_token']:8.2f} ms",
                flush=True,
            )
            del model
            gc.collect()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--tokens", type=int, default=128, help="prompt length of the prefill forward")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = ap.parse_args(argv)

    import bitsandbytes
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }
    results = run(args.device, args.size, args.tokens, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, **results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
