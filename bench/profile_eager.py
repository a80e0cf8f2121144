#!/usr/bin/env python
"""Where an eager decode step's time goes: the host's Python and launches, or the GPU's kernels.

``bench_decode.py`` gives eager tokens/s; this script says whether a method's eager step is bound
by the host (the time to enqueue a step's kernels, measured without synchronizing) or by the GPU
(the kernels' summed time, from ``torch.profiler``), and which Python functions the host spends it
in (``cProfile``, by own time). Each method runs the same ``Decoder`` as ``bench_decode.py``
(static cache, a ``--prompt``-token prefill, then one token a step). Every method is timed, in
rounds, before anything is profiled.

Usage::

    python bench/profile_eager.py --methods bf16,int8-torch,int8-torch+fused --out eager.json
    python bench/profile_eager.py --prefill --steps 5 --methods bf16,int8-torch+fused   # the prefill
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import bench_decode
import profile_decode
import torch


def _prefills(dec, steps: int, sync: bool) -> float:
    """Seconds per prefill over ``steps`` prefills of the prompt, each into an emptied cache."""
    positions = torch.arange(dec.prompt, device=dec.device)
    bench_decode.sync(dec.device)
    t = time.perf_counter()
    for _ in range(steps):
        dec.cache.reset()
        dec._step(dec.ids, positions)
        if sync:
            bench_decode.sync(dec.device)
    host = time.perf_counter() - t
    bench_decode.sync(dec.device)
    return host / steps


def _steps(dec, steps: int, sync: bool, prefill: bool = False) -> float:
    """Seconds per step over ``steps`` decode steps, after a fresh prefill (the cache counts its
    length); ``prefill``: per prefill instead (:func:`_prefills`)."""
    if prefill:
        return _prefills(dec, steps, sync)
    dec.cache.reset()
    token = dec._step(dec.ids, torch.arange(dec.prompt, device=dec.device))
    position = torch.tensor([dec.prompt], device=dec.device)
    bench_decode.sync(dec.device)
    t = time.perf_counter()
    for _ in range(steps):
        token = dec._step(token, position)
        position = position + 1
        if sync:
            bench_decode.sync(dec.device)
    host = time.perf_counter() - t
    bench_decode.sync(dec.device)
    return host / steps


def launcher_state() -> dict:
    """Whether quantcore's Triton launchers take their direct path (a failed one falls back for good)."""
    triton_mod = sys.modules.get("quantcore_torch._triton")
    if triton_mod is None:
        return {}
    state = {
        f"{fmt}.{kind}": (getattr(kernels, kind).direct, len(getattr(kernels, kind).compiled))
        for fmt, kernels in (("int8", triton_mod._INT8), ("int4", triton_mod._INT4))
        for kind in ("row", "dot")
    }
    state["launch_hooks_unset"] = triton_mod._launch_hooks_unset()
    return state


def time_methods(decoders: dict, args) -> dict[str, dict]:
    """Host (enqueue) and synchronized ms per step of every method, in rounds, before any profiler.

    A profiler, once run, can leave hooks behind that slow later launches: nothing is profiled
    until every method has been timed. A step bound by the host has a synchronized time close to
    its host time; one bound by the GPU, close to its kernels' sum.
    """
    host: dict[str, list] = {m: [] for m in decoders}
    synced: dict[str, list] = {m: [] for m in decoders}
    with torch.no_grad():
        for _ in range(args.rounds):
            for method, dec in decoders.items():
                host[method].append(1e3 * _steps(dec, args.steps, sync=False, prefill=args.prefill))
                synced[method].append(1e3 * _steps(dec, args.steps, sync=True, prefill=args.prefill))
    return {m: dict(method=m, host_ms=min(host[m]), synced_ms=min(synced[m])) for m in decoders}


def profile_method(dec, row: dict, args) -> dict:
    """Add the kernels' time per step (torch.profiler) and the host's hot spots (cProfile) to ``row``."""
    method = row["method"]
    cuda = args.device == "cuda"
    with torch.no_grad():
        activities = [torch.profiler.ProfilerActivity.CUDA] if cuda else [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities) as prof:
            _steps(dec, args.steps, sync=True, prefill=args.prefill)
        kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
        events = [e for e in prof.events() if e.device_type == kind]
        row["kernels_per_step"] = len(events) / args.steps
        total_us = sum(e.device_time_total if cuda else e.self_cpu_time_total for e in events)
        row["kernel_ms"] = total_us / 1e3 / args.steps
        profiler = cProfile.Profile()
        profiler.enable()
        _steps(dec, args.steps, sync=True, prefill=args.prefill)
        profiler.disable()
    row["triton_launchers"] = launcher_state()
    stats = pstats.Stats(profiler)
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[: args.top]
    row["top_own_ms_per_step"] = [
        (f"{Path(f).name}:{line}:{name}", round(1e3 * tt / args.steps, 3), calls // args.steps)
        for (f, line, name), (_cc, calls, tt, _ct, _callers) in top
    ]
    print(
        f"  {method:<20} host {row['host_ms']:.2f} ms/step  synced {row['synced_ms']:.2f}  "
        f"kernels {row['kernel_ms']:.2f} ms in {row['kernels_per_step']:.0f} launches",
        flush=True,
    )
    if row["triton_launchers"]:
        print(f"      Triton launchers (direct, kept kernels): {row['triton_launchers']}")
    print("      cProfile, own time per step (cProfile's overhead inflates Python functions):")
    for name, ms, calls in row["top_own_ms_per_step"]:
        print(f"      {ms:7.3f} ms  {calls:5d} calls  {name}")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    profile_decode.step_arguments(parser, steps=20)
    parser.add_argument("--rounds", type=_common.int_at_least(1), default=3, help="timing rounds over the methods")
    parser.add_argument(
        "--prefill", action="store_true", help="a step is the prompt's prefill (time to first token), not a token"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    base = bench_decode.build_model(args.model, args.device, args.prompt + args.steps + 8)
    decoders = {}
    for method in args.methods.split(","):
        model = bench_decode.make_variant(base, method)
        decoders[method] = bench_decode.Decoder(model, 1, args.prompt, args.steps + 8, args.device, compiled=False)
        decoders[method].run()  # warm: kernels compiled and tuned
    rows = time_methods(decoders, args)
    for method, row in rows.items():
        print(f"  {method:<20} host {row['host_ms']:.2f} ms/step  synced {row['synced_ms']:.2f} ms/step", flush=True)
    results = []
    for method, dec in decoders.items():
        results.append(profile_method(dec, rows[method], args))
        if args.out:
            args.out.write_text(json.dumps(dict(model=args.model, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
