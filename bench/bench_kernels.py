#!/usr/bin/env python
"""One weight-only linear layer, kernel by kernel, against bf16 ``F.linear`` (CUDA; CPU with ``--device cpu``).

For each layer shape of the 1.1B Llama (``[out, in]``: q/o 2048x2048, k/v 256x2048, gate/up
5632x2048, down 2048x5632) and each batch (rows of ``x``), it times: bf16 ``F.linear``; torch_wo
int8 through its dispatch (Triton on CUDA, ``_weight_int8pack_mm`` on the CPU);
``aten._weight_int8pack_mm`` directly; torch_wo int4 g128 through its dispatch (Triton on CUDA,
the CPU kernel on the CPU); tinygemm (``aten._weight_int4pack_mm``, CUDA); and the reference
dequantize + ``F.linear``. CUDA times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``,
median), so launch gaps do not count; the floor is the layer's bytes over the copy bandwidth.
Each kernel's output is checked against the reference path (relative L2 error printed).

Usage::

    python bench/bench_kernels.py --out kernels_cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_decode
import torch
from torch import nn

SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3

    def cpu(fn):
        fn()
        times = []
        for _ in range(20):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e6 * sorted(times)[len(times) // 2]

    return cpu


def eager_timer(device: str):
    """Microseconds per call of 200 back-to-back eager calls: what an eager decode step pays per layer."""

    def run(fn):
        fn()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        sync()
        return 1e6 * (time.perf_counter() - t) / 200

    return run


def layer_cases(x, lin, m8, m4, tinygemm) -> dict:
    """The calls to time for one layer and one input: name -> zero-argument function."""
    from quantcore_torch import kernels

    cases = {
        "bf16": lambda: lin(x),
        "int8_torch_wo": lambda: m8(x),
        "int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, m8.qweight, m8.scale),
        "int8_cast_linear": lambda: torch.nn.functional.linear(x, m8.qweight.to(x.dtype)) * m8.scale,
        "int8_reference": lambda: m8.reference_forward(x),
        "int4_torch_wo": lambda: m4(x),
        "int4_reference": lambda: m4.reference_forward(x),
    }
    if x.is_cuda and kernels.triton_available():
        cases["int4_triton"] = lambda: kernels._TRITON.int4_mm(x, m4.qweight, m4.scale, m4.zero, 128, None)
    if tinygemm is not None:
        cases["int4_tinygemm"] = lambda: kernels.int4_weight_only_linear(
            x, m4.qweight, m4.scale, m4.zero, 128, None, tinygemm
        )
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--eager", action="store_true", help="time back-to-back eager calls (launch cost included)")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first N shapes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from quantcore_torch import WeightOnlyLinear, kernels

    dev = args.device
    bench = eager_timer(dev) if args.eager else timer(dev)
    # Timed eagerly: a copy captured in a CUDA graph runs as a memcpy node, slower than a kernel.
    bandwidth = bench_decode.copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}: copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    torch.manual_seed(0)
    for n, k in SHAPES[: args.shapes]:
        lin = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        m8 = WeightOnlyLinear.from_linear(lin, bits=8)
        m4 = WeightOnlyLinear.from_linear(lin, bits=4, group_size=128)
        tg = kernels.int4_tinygemm_layout(m4.qweight, m4.scale, m4.zero, k, 128) if dev == "cuda" else None
        for m in [int(b) for b in args.batch.split(",")]:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            cases = layer_cases(x, lin, m8, m4, tg)
            ref8, ref4 = m8.reference_forward(x), m4.reference_forward(x)
            row = dict(n=n, k=k, m=m)
            with torch.no_grad():
                for name, fn in cases.items():
                    try:
                        out = fn()
                        err = rel(out, ref8 if "int8" in name else ref4 if "int4" in name else out)
                        row[name] = dict(us=bench(fn), rel_err=err)
                    except Exception as exc:
                        row[name] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
            rows.append(row)
            line = " ".join(
                f"{name}={v['us']:.1f}us" + (f"(e{v['rel_err']:.0e})" if name != "bf16" else "")
                if "us" in v
                else f"{name}=ERR"
                for name, v in row.items()
                if isinstance(v, dict)
            )
            floor4 = (n * k // 2 + 4 * n * k // 128) / bandwidth * 1e6
            print(f"[{n}x{k}] m={m}: {line} floor_int4={floor4:.1f}us", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(bandwidth=bandwidth, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
