#!/usr/bin/env python
"""Where one compiled decode step's GPU time goes, kernel by kernel, for each method (CUDA).

``bench_decode.py`` gives a step's time under CUDA graphs; this script says what that time is made
of. Each method's decode step (the same ``Decoder`` as ``bench_decode.py``: static cache, a
``--prompt``-token prefill) is compiled with ``fullgraph=True`` but without CUDA graphs (the
kernels are the ones ``reduce-overhead`` captures; the profiler sees them one by one), run for
``--steps`` steps under ``torch.profiler``, and the kernels' GPU time is summed per step: total,
number of launches, and the top kernels by time. The linears' share is what quantizing can change;
the rest (attention, norms, rotary embeddings, the head) every method pays alike.

Usage::

    python bench/profile_decode.py --methods bf16,int8-torch,int4-torch --out profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import bench_decode
import torch

# Substrings of kernel names that are a linear layer's matmul: cuBLAS / nvjet GEMMs and GEMVs,
# tinygemm, quantcore's Triton kernels, bitsandbytes' kernels. Inductor's fused kernels
# (``triton_poi_fused_...bmm...``) and cuDNN's attention are not, whatever their names mention.
LINEAR = ("gemv", "gemm", "nvjet", "xmma", "tinygemm", "kgemm", "splitkreduce")
# quantcore_torch._triton's kernels.
LINEAR += ("_int8_row_kernel", "_int8_dot_kernel", "_int4_row_kernel", "_int4_dot_kernel", "_int4_interleaved_kernel")
LINEAR += ("_int4_interleaved_rope_kernel",)  # q/k/v with the rotary embedding and the cache writes
# quantcore_torch._fold's: o and down with the residual add, gate/up after the folded norm.
LINEAR += ("_int4_interleaved_residual_kernel", "_int4_interleaved_norm_kernel")
# On the CPU (the smoke test) the events are operators: the matmuls and the weight-only ops.
LINEAR += ("aten::mm", "aten::addmm", "_weight_int8pack_mm", "_weight_int4pack_mm")


def is_linear(name: str) -> bool:
    lowered = name.lower()
    if lowered.startswith(("triton_poi", "triton_red", "triton_per")) or "cudnn" in lowered or "fmha" in lowered:
        return False
    return any(s in lowered for s in LINEAR)


def profile_method(base, method: str, args) -> dict:
    model = bench_decode.make_variant(base, method)
    dev = args.device
    dec = bench_decode.Decoder(model, 1, args.prompt, args.steps + 8, dev, compiled=True)
    dec.compile_mode = args.mode
    dec.run()  # compiles
    dec.cache.reset()
    # On the CPU (a smoke test of this script) the "kernels" are the operators the CPU ran.
    cuda = dev == "cuda"
    activities = [torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU]
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with torch.no_grad():
        position = torch.arange(args.prompt, device=dev)
        token = dec._step(dec.ids, position)
        position = torch.tensor([args.prompt], device=dev)
        for _ in range(3):  # warm: nothing of the first steps' allocation in the profile
            token = dec.step(token, position).clone()
            position = position + 1
        bench_decode.sync(dev)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.steps):
                token = dec.step(token, position).clone()
                position = position + 1
            bench_decode.sync(dev)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        time = event.device_time_total if cuda else event.self_cpu_time_total
        if event.device_type == kind and time > 0:
            entry = kernels[event.name]
            entry[0] += time
            entry[1] += 1
    per_step = {name: (us / args.steps, n / args.steps) for name, (us, n) in kernels.items()}
    total = sum(us for us, _ in per_step.values())
    linear = sum(us for name, (us, _) in per_step.items() if is_linear(name))
    launches = sum(n for _, n in per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1][0])[: args.top]
    print(
        f"{method}: {total:.0f} us of kernels a step ({launches:.0f} launches), linears {linear:.0f} us, "
        f"the rest {total - linear:.0f} us",
        flush=True,
    )
    for name, (us, n) in top:
        print(f"    {us:8.1f} us  x{n:5.1f}  {'L ' if is_linear(name) else '  '}{name[:110]}", flush=True)
    del dec, model
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return dict(
        method=method,
        step_kernel_us=total,
        linear_us=linear,
        launches=launches,
        kernels={name: dict(us=us, calls=n) for name, (us, n) in sorted(per_step.items(), key=lambda kv: -kv[1][0])},
    )


def step_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The arguments this script and ``profile_eager.py`` share: what to profile, and how long."""
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model", choices=("llama-1.1b", "llama-7b", "tiny"), default="llama-1.1b")
    parser.add_argument("--methods", default="bf16,int8-torch,int4-torch")
    parser.add_argument("--prompt", type=_common.int_at_least(1), default=512)
    parser.add_argument("--steps", type=_common.int_at_least(1), default=steps)
    parser.add_argument("--top", type=_common.int_at_least(0), default=12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_arguments(parser, steps=10)
    parser.add_argument(
        "--mode",
        default=None,
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile mode (default: inductor without CUDA graphs)",
    )
    parser.add_argument("--method-timeout", type=_common.int_at_least(0), default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    base = bench_decode.build_model(args.model, args.device, args.prompt + args.steps + 8)
    results = []
    for method in args.methods.split(","):
        try:
            with bench_decode._time_limit(args.method_timeout):
                results.append(profile_method(base, method, args))
        except Exception as exc:
            print(f"{method}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            results.append(dict(method=method, error=f"{type(exc).__name__}: {exc}"))
            torch._dynamo.reset()
        if args.out:
            args.out.write_text(json.dumps(dict(model=args.model, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
