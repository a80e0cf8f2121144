#!/usr/bin/env python
"""Machine instructions per weight byte in the main loop of each Triton kernel, compiled offline.

The one-row kernels stream a weight once; whether they can keep up with memory depends on how
many instructions they spend per byte. This compiles each kernel for a GPU target (``--arch 90``:
Hopper) with the ``ptxas`` Triton ships, disassembles it with Triton's ``nvdisasm``, finds the
main loop (the longest backward branch) and counts its instructions per weight byte a thread
streams, with the most frequent opcodes. No GPU needed; a proxy, not a timing: the instruction
mix, memory latency and occupancy decide the speed. For scale: an H100 issues about 30 T
thread-instructions a second, so streaming 3 TB/s at full speed allows about 10 instructions a
byte, and at 70 % of it about 14, in a kernel that does nothing else.

Usage (needs ``triton``)::

    python bench/sass_loop.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ptx_fingerprint

_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/")
_OPCODE = re.compile(r"\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def nvdisasm_path() -> Path:
    """The ``nvdisasm`` Triton ships (3.x wheels put it beside their ``ptxas``)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"


def disassemble(cubin: bytes) -> str:
    nvdisasm = nvdisasm_path()
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def main_loop(sass: str) -> Counter:
    """Opcode counts of the longest loop (a branch back to an earlier label) in ``sass``."""
    lines = sass.splitlines()
    labels: dict[str, int] = {}
    for i, line in enumerate(lines):
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            following = next((m for m in map(_ADDRESS.search, lines[i + 1 :]) if m), None)
            if following:
                labels[label.group(1)] = int(following.group(1), 16)
    code = [(int(m.group(1), 16), line) for line in lines if (m := _ADDRESS.search(line))]
    loops = []
    for address, line in code:
        branch = re.search(r"\bBRA\b.*\.L_x_(\d+)", line)
        if branch and labels.get(branch.group(1), address) < address:
            loops.append((labels[branch.group(1)], address))
    if not loops:
        return Counter()
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return Counter(m.group(1) for address, line in code if start <= address <= end and (m := _OPCODE.search(line)))


def main(argv=None) -> int:
    args, _triton = ptx_fingerprint.offline_arguments(__doc__, "counts", argv)
    if not nvdisasm_path().is_file():
        sys.exit(f"this triton ships no nvdisasm (looked for {nvdisasm_path()})")
    i8, i4 = ptx_fingerprint._I8, ptx_fingerprint._I4
    i8m, i4m = dict(i8, M="i32"), dict(i4, M="i32")
    i4i = ptx_fingerprint._I4_INTERLEAVED
    dot = {"HAS_BIAS": False, "BLOCK_M": 16}
    gate_up = {"GATE_UP": True}
    rope = {k: v for k, v in i4i.items() if k not in ("y_ptr", "b_ptr")}
    rope |= dict(b_ptr="*bf16", q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", cos_ptr="*bf16", sin_ptr="*bf16")
    rope |= dict(pos_ptr="*i64", NQ="i32", ROTATED="i32", cache_len="i32")
    t = _triton
    il = t._int4_interleaved_kernel
    # (label, kernel, signature, constexprs, warps, weight bytes a program streams a loop step)
    cases = [
        ("int8 row (2, 1024, 2)", t._int8_row_kernel, i8, {"BLOCK_N": 2, "BLOCK_K": 1024}, 2, 2 * 1024),
        ("int8 row (8, 1024, 4)", t._int8_row_kernel, i8, {"BLOCK_N": 8, "BLOCK_K": 1024}, 4, 8 * 1024),
        ("int4 row (2, 1024, 2)", t._int4_row_kernel, i4, {"BLOCK_N": 2, "BLOCK_K": 1024}, 2, 2 * 512),
        ("int4 row (8, 1024, 4)", t._int4_row_kernel, i4, {"BLOCK_N": 8, "BLOCK_K": 1024}, 4, 8 * 512),
        ("int4 interleaved (8, 1024, 1)", il, i4i, {"BLOCK_N": 8, "BLOCK_K": 1024}, 1, 8 * 512),
        ("int4 interleaved (4, 2048, 2)", il, i4i, {"BLOCK_N": 4, "BLOCK_K": 2048}, 2, 4 * 1024),
        ("int4 interleaved (4, 2048, 4)", il, i4i, {"BLOCK_N": 4, "BLOCK_K": 2048}, 4, 4 * 1024),
        ("int4 interleaved (8, 1024, 4)", il, i4i, {"BLOCK_N": 8, "BLOCK_K": 1024}, 4, 8 * 512),
        # A gated MLP's activation in the epilogue: the rows a program takes change, not the loop.
        ("int8 row (2, 1024, 2) gate/up", t._int8_row_kernel, i8, {"BLOCK_N": 2, "BLOCK_K": 1024, **gate_up}, 2, 2048),
        ("int4 interleaved (4, 2048, 2) gate/up", il, i4i, {"BLOCK_N": 4, "BLOCK_K": 2048, **gate_up}, 2, 4096),
        # The rotary embedding and the cache writes in the q/k/v epilogue: the same loop again.
        ("int4 interleaved (4, 2048, 2) q/k/v rotary", t._int4_interleaved_rope_kernel, rope,
         {"BLOCK_N": 4, "BLOCK_K": 2048, "HALF": 32}, 2, 4096),
        ("int8 dot (32, 128, 4)", t._int8_dot_kernel, i8m, {**dot, "BLOCK_N": 32, "BLOCK_K": 128}, 4, 32 * 128),
        ("int4 dot (32, 1, 4)", t._int4_dot_kernel, i4m, {**dot, "BLOCK_N": 32, "GROUPS_PER_BLOCK": 1}, 4, 32 * 64),
    ]  # fmt: skip
    result = {}
    for label, kernel, signature, constexprs, warps, step_bytes in cases:
        constexprs = {"HAS_BIAS": False, **constexprs}
        if "GROUP" in kernel.fn.arg_names:
            constexprs["GROUP"] = 128
        asm = ptx_fingerprint.compile_kernel(kernel, signature, constexprs, warps, args.arch, None)
        ops = main_loop(disassemble(asm["cubin"]))
        per_byte = sum(ops.values()) / (step_bytes / (32 * warps))
        result[label] = dict(per_byte=per_byte, loop=sum(ops.values()), opcodes=dict(ops.most_common()))
        common = ", ".join(f"{op} {n}" for op, n in ops.most_common(6))
        print(f"{label:38s} {per_byte:5.1f} a weight byte ({sum(ops.values())} in the loop: {common})", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(arch=args.arch, kernels=result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
