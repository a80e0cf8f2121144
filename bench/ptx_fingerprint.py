#!/usr/bin/env python
"""Fingerprints of the Triton kernels' PTX for a GPU target, compiled offline (no GPU).

Triton compiles for a target it is told (``--arch 90``: Hopper) with the ``ptxas`` it ships, so a
change meant to leave a kernel's code alone can be checked on a machine without a GPU: run this
at two revisions and compare the fingerprints. A fingerprint hashes the kernel's entry body
without debug lines (``.loc``, comments, the labels that inlined helpers number). Each kernel is
compiled for a few configs of its table, with ``USE_GDC`` off (the default launch) and on
(programmatic dependent launch; ``griddepcontrol`` must then appear in the PTX); the several-row
``tl.dot`` kernels once each. Each line also counts the kernel's integer-to-float conversion
instructions (slow: the kernels build their floats from bits instead).

Usage (needs ``triton``; under ``TRITON_INTERPRET`` nothing is compiled)::

    python bench/ptx_fingerprint.py                      # this checkout
    git stash; python bench/ptx_fingerprint.py; git stash pop   # the revision before a change
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "plugins" / "torch"))

_DEBUG = re.compile(r"^\s*(\.loc|\.file|//)|^\$L__tmp\d+:|^\$L__func")
_I8 = dict(x_ptr="*bf16", w_ptr="*i8", s_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", N="i32", K="i32", stride_wn="i32")
_I4 = dict(_I8, w_ptr="*u8", z_ptr="*bf16", stride_sn="i32", row_bytes="i32")
# The interleaved int4 kernels': 32-bit words, scales and zero points in one tensor.
_I4_INTERLEAVED = {k: v for k, v in _I4.items() if k not in ("s_ptr", "z_ptr", "row_bytes")}
_I4_INTERLEAVED |= dict(w_ptr="*i32", sz_ptr="*bf16", zero_offset="i32", magic="i32")


def fingerprint(ptx: str) -> str:
    body = re.search(r"^\.visible \.entry.*?^}", ptx, re.S | re.M)
    lines = [line for line in (body.group(0) if body else ptx).splitlines() if not _DEBUG.search(line)]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


# Integer-to-float conversions (``cvt.rn.f32.s32``, ``cvt.rn.f16.u16``...): a quarter or an eighth of
# the rate of other instructions on recent GPUs, which the kernels build floats without.
_INT_TO_FLOAT = re.compile(r"^\s*cvt\.rn\.(f16|bf16|f32)\.[su]\d+\b", re.M)


def int_to_float(ptx: str) -> int:
    """How many integer-to-float conversion instructions the kernel's PTX holds."""
    return len(_INT_TO_FLOAT.findall(ptx))


def compile_ptx(kernel, signature: dict, constexprs: dict, warps: int, arch: int, pdl: bool | None) -> str:
    """PTX of ``kernel`` (autotuned: its ``.fn``) with every pointer and int 16-divisible, as Triton
    specializes the sizes of a decode step. ``pdl``: None leaves ``USE_GDC`` out (kernels before it)."""
    return compile_kernel(kernel, signature, constexprs, warps, arch, pdl)["ptx"]


def compile_kernel(kernel, signature: dict, constexprs: dict, warps: int, arch: int, pdl: bool | None) -> dict:
    """:func:`compile_ptx`'s compilation, every stage's output (``ptx``, ``cubin``...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    # Every constexpr gets a value, its default where not given: Triton (3.6) binds the given ones
    # out of place when a defaulted one before them is missing.
    constants = {p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}
    constants.update(constexprs)
    if pdl is not None and "USE_GDC" in fn.arg_names:
        constants["USE_GDC"] = pdl
    full = {name: signature.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in signature}
    source = ASTSource(fn, full, constexprs=constants, attrs=attrs)
    options = {"num_warps": warps, "num_stages": 1, **({"launch_pdl": True} if pdl else {})}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm


def offline_arguments(doc: str, what: str, argv=None) -> tuple[argparse.Namespace, types.ModuleType]:
    """The ``--arch`` / ``--out`` arguments of the offline compile tools (this one, ``sass_loop.py``)
    and ``quantcore_torch._triton``; an argument error where Triton is missing."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    parser.add_argument("--out", type=Path, default=None, help=f"also write the {what} as JSON")
    args = parser.parse_args(argv)
    try:
        from quantcore_torch import _triton
    except ImportError as exc:
        parser.error(f"needs triton (pip install triton): {exc}")
    return args, _triton


def main(argv=None) -> int:
    args, _triton = offline_arguments(__doc__, "fingerprints", argv)

    kernels = [
        ("int8", _triton._int8_row_kernel, _I8, {"HAS_BIAS": False}, _triton.INT8_ROW),
        ("int4", _triton._int4_row_kernel, _I4, {"GROUP": 128, "HAS_BIAS": False}, _triton.INT4_ROW),
    ]
    has_gdc = "USE_GDC" in _triton._int8_row_kernel.fn.arg_names
    result = {}
    for name, kernel, signature, constexprs, table in kernels:
        for block_n, block_k, warps in [c for c in table if c[1] % 128 == 0][:3]:
            for pdl in (False, True) if has_gdc else (None,):
                ptx = compile_ptx(kernel, signature, {**constexprs, "BLOCK_N": block_n, "BLOCK_K": block_k}, warps,
                                  args.arch, pdl)  # fmt: skip
                label = f"{name} {(block_n, block_k, warps)}" + (" USE_GDC" if pdl else "")
                result[label] = fingerprint(ptx)
                gdc = "griddepcontrol" in ptx
                print(f"{label:44s} {result[label]}  griddepcontrol: {gdc}  int-to-float: {int_to_float(ptx)}")
                if gdc != bool(pdl):
                    print(f"  unexpected: griddepcontrol {'present' if gdc else 'absent'}", flush=True)
                    return 1
    # The several-row kernels (tl.dot), one config each; they take no programmatic launch.
    dots = [
        ("int8 dot", _triton._int8_dot_kernel, {"HAS_BIAS": False, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}),
        (
            "int4 dot",
            _triton._int4_dot_kernel,
            {"GROUP": 128, "HAS_BIAS": False, "BLOCK_M": 16, "BLOCK_N": 32, "GROUPS_PER_BLOCK": 1},
        ),
    ]
    for name, kernel, constexprs in dots:
        signature = dict(_I4 if "z_ptr" in kernel.fn.arg_names else _I8, M="i32")
        ptx = compile_ptx(kernel, signature, constexprs, 4, args.arch, None)
        result[name] = fingerprint(ptx)
        print(f"{name:44s} {result[name]}  int-to-float: {int_to_float(ptx)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(arch=args.arch, fingerprints=result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
