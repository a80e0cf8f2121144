"""One LoRA fine-tuning step on SmolLM2-135M: a torch_wo int4 / int8 base against the same on bf16.

Each variant runs in a fresh process (bench/_common.run_in_fresh_process). The model loads in
bf16 through transformers' ``from_pretrained``; the quantized variants pass
``quantization_config=TorchWeightOnlyConfig(...)`` (quantcore.integrations.transformers, so
transformers quantizes while it loads). Then ``peft.get_peft_model`` with a plain ``LoraConfig``
(r=16 on every linear layer of the blocks), AdamW, and training steps on Shakespeare: one
warm-up step, then ``--steps`` timed steps (forward, backward, optimizer step).

Reported per variant: the median step time, the model's bytes (parameters and buffers, adapters
included), the peak RSS of the whole process, and the RSS the timed steps add on top of what the
process held before them (activations, gradients, optimizer state, transient dequantized
weights), and the losses (the runs see the same batch, so they should agree roughly).

    .venv/bin/python bench/bench_lora.py [--steps 3] [--batch 2] [--seq 256] [--json bench/_results/lora.json]
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

VARIANTS = {
    "bf16": None,
    "torch_wo int4 g128": {"bits": 4, "group_size": 128},
    "torch_wo int8": {"bits": 8},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def step_run(variant: str, path: str, steps: int, batch: int, seq: int) -> dict:
    """Run in a child: load, wrap with LoRA, time the training steps."""
    import time
    import warnings

    import peft
    import torch
    import transformers

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    from _common import current_rss_bytes, load_shakespeare_text, peak_rss_bytes, reset_peak_rss

    import quantcore.integrations.transformers  # noqa: F401  (registers torch_wo with transformers)

    torch.manual_seed(0)
    kwargs = VARIANTS[variant]
    config = None
    if kwargs is not None:
        from quantcore_torch import TorchWeightOnlyConfig

        config = TorchWeightOnlyConfig(**kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer(load_shakespeare_text(40_000), return_tensors="pt").input_ids[0, : batch * seq].view(batch, seq)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step()]  # warm-up: allocates the optimizer state
    rss_before = current_rss_bytes() or 0
    reset_peak_rss()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {
        "step_s": times,
        "losses": losses,
        "model_bytes": nbytes,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_rss_bytes": peak_rss_bytes() - rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", default=str(BENCH_DIR / "_results" / "lora.json"))
    args = parser.parse_args()
    path = str(smollm2_bf16_dir())
    results = {}
    for variant in VARIANTS:
        print(f"==> {variant}", flush=True)
        results[variant] = run_in_fresh_process(
            "bench_lora:step_run",
            {"variant": variant, "path": path, "steps": args.steps, "batch": args.batch, "seq": args.seq},
        )
        r = results[variant]
        print(
            f"    steps {[round(t, 2) for t in r['step_s']]} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    base = results["bf16"]
    mib = 2**20
    print(
        f"\nLoRA r=16 on {', '.join(TARGETS)}; batch {args.batch} x {args.seq} tokens; "
        f"median of {args.steps} steps after a warm-up"
    )
    print(
        f"{'variant':<20} {'step s':>7} {'x bf16':>7} {'model MiB':>10} {'x bf16':>7} "
        f"{'step RSS MiB':>13} {'peak RSS MiB':>13} {'x bf16':>7}  losses"
    )
    for variant, r in results.items():
        step = statistics.median(r["step_s"])
        print(
            f"{variant:<20} {step:>7.2f} {step / statistics.median(base['step_s']):>7.2f} "
            f"{r['model_bytes'] / mib:>10.0f} {r['model_bytes'] / base['model_bytes']:>7.2f} "
            f"{r['step_rss_bytes'] / mib:>13.0f} {r['peak_rss_bytes'] / mib:>13.0f} "
            f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:>7.2f}  " + " ".join(f"{x:.3f}" for x in r["losses"])
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
