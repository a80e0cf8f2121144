#!/usr/bin/env python
"""What the interleaved int4 kernels load before and after a programmatic launch's wait, offline.

Under a programmatic launch (``USE_GDC``) a kernel loads its first weight tile before
``griddepcontrol.wait`` and its input after it. The nineteenth run in ``docs/benchmarks.md``
found the input's loads after the wait the largest cost of a 1.1B step's linears. This compiles
the interleaved kernel for sm_90 (Triton's ``ptxas``, no GPU), finds the wait in the machine code
(``ACQBULK``) and adds up the bytes its global loads (``LDG``) move a thread on each side: before
it the weight words, scales and zero points; after it, on a one-tile row, the input. Triton picks
the tile's layout, so the input bytes a thread loads for its weight bytes depend on the config,
not on ``BLOCK_N`` alone. It also gives the registers the code uses (the highest ``R`` named,
plus one) and its spill stores (``STL``): what ``--pre`` costs a config, and why
``QUANTCORE_TRITON_PDL_PRE`` applies only within ``_triton.PRE_WEIGHTS`` weights a thread. Static
counts of one thread's code, not a timing.

Usage (needs ``triton``)::

    python bench/wait_split.py [--pre] [--spread]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ptx_fingerprint
import sass_loop

_LINE = re.compile(r"/\*[0-9a-f]{4}\*/\s*(.*)")
_LOAD_BYTES = {None: 4, "64": 8, "128": 16, "U16": 2, "16": 2, "U8": 1, "8": 1}
_REGISTER = re.compile(r"\bR(\d+)\b")  # RZ, the zero register, is not one of them
# (BLOCK_N, BLOCK_K, num_warps): the pinned 1.1B configs and the ones the nineteenth run tried,
# then 7B's pins on the H100.
CONFIGS = [(2, 2048, 2), (2, 2048, 4), (4, 2048, 4), (4, 1024, 2), (8, 1024, 4), (8, 2048, 8), (16, 1024, 8)]
CONFIGS += [(4, 2048, 2), (8, 1024, 1), (4, 1024, 1)]


def load_bytes(lines: list[str]) -> int:
    """The bytes the global loads among ``lines`` (machine instructions) move a thread."""
    total = 0
    for line in lines:
        load = re.search(r"\bLDG\.E(?:\.(64|128|U16|16|U8|8))?\b", line)
        if load:
            total += _LOAD_BYTES[load.group(1)]
    return total


def split(block_n: int, block_k: int, warps: int, pre: bool, arch: int, kernel, spread: bool = False) -> dict:
    """The load bytes a thread moves before and after the wait of one config's programmatic variant
    (``spread``: its ``SPREAD`` variant, the rows in each thread's registers)."""
    constexprs = dict(GROUP=128, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k, PREFETCH=False, PRE=pre)
    constexprs["SPREAD"] = spread
    asm = ptx_fingerprint.compile_kernel(kernel, ptx_fingerprint._I4_INTERLEAVED, constexprs, warps, arch, 2)
    lines = [m.group(1) for m in map(_LINE.search, sass_loop.disassemble(asm["cubin"]).splitlines()) if m]
    wait = next(i for i, line in enumerate(lines) if line.startswith("ACQBULK"))
    words = block_n * block_k // 8 // (32 * warps)
    before, after = load_bytes(lines[:wait]), load_bytes(lines[wait:])
    registers = 1 + max((int(r) for line in lines for r in _REGISTER.findall(line)), default=-1)
    spills = sum(line.startswith("STL") for line in lines)
    return dict(
        words=words, before=before, after=after, input_per_weight_byte=after / (4 * words),
        registers=registers, spill_stores=spills,
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pre",
        action="store_true",
        help="the variant that dequantizes its first tile before the wait (its code after the wait "
        "also holds the loop over later tiles, whose weight loads then count there)",
    )
    parser.add_argument(
        "--spread", action="store_true", help="the SPREAD variant (a program's rows in each thread's registers)"
    )
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        from quantcore_torch import _triton
    except ImportError as exc:
        parser.error(f"needs triton (pip install triton): {exc}")
    result = {}
    for config in CONFIGS if not args.spread else [c for c in CONFIGS if c[1] // 8 >= 32 * c[2]]:
        row = split(*config, args.pre, args.arch, _triton._int4_interleaved_kernel, args.spread)
        result["x".join(map(str, config))] = row
        print(
            f"{config!s:16s} {row['words']:3d} words a thread ({4 * row['words']:3d} B); "
            f"loads before the wait {row['before']:4d} B, after {row['after']:4d} B: "
            f"{row['input_per_weight_byte']:.2f} input bytes a weight byte; "
            f"{row['registers']} registers, {row['spill_stores']} spill stores",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(dict(arch=args.arch, pre=args.pre, configs=result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
