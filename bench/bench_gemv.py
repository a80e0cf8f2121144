#!/usr/bin/env python
"""Batch-1 weight-only matmuls as a decode step runs them: weights streamed from HBM, not L2 (CUDA).

``bench_kernels.py`` times one layer again and again, so its weight (0.5 to 23 MiB) sits in the
GPU's L2 cache (50 MiB on an H200) after the first call. A decode step reads each weight once,
from HBM. This benchmark gives every call its own weight: for each layer shape of the model it
builds as many copies as make up ``--stream-mib`` (far beyond L2), captures one CUDA graph that
calls the kernel on each copy in turn, and reports microseconds per call and the share of the
copy bandwidth that call moves.

It times, per shape: bf16 ``F.linear``; each one-row config of the int8 and int4 Triton kernels
(``quantcore_torch._triton.INT8_ROW`` / ``INT4_ROW`` / ``INT4_INTERLEAVED``, the last on the
interleaved layout),
forced; the autotuned choice that
``int8_weight_only_linear`` / ``int4_weight_only_linear`` make; tinygemm (int4, bf16). Then
``--stack``: the linears of a whole decode step (every layer's q, k, v, o, gate, up, down, each
with its own weight) through each method's dispatch, in one graph: the linears' share of a step.
``--fused``: the shapes ``quantcore_torch.fuse_projections`` runs (q+k+v and gate+up stacked),
for tuning the kernels on them; bf16's stack keeps transformers' separate projections. The
``read`` stacks bound what any design with a kernel a linear could do: ``read`` gives each linear
a kernel that only reads its int4 bytes (codes, scales, zero points: 8 KiB a program, 16-byte
loads, one word out a program); ``read-pdl`` launches it programmatically (loads issued before it
waits on the kernel before, the next launched once its work is done, as torch_wo's ``+pdl``);
``read-pdl-early`` launches the next at once; ``read-x-pdl-early``, ``read-math-pdl-early`` and
``read-x-math-pdl-early`` add, after the wait, the input's loads, the int4 arithmetic, or both, and
a reduction (``_read_kernel``'s probes): what each part of the kernels' work costs. ``-x4-`` and
``-x16-`` (``read-x4-pdl-early``) load the input with the same instructions over a window of a
quarter or a sixteenth of ``-x-``'s (which wraps over the whole input at 1.1B: 2 or 0.5 KiB a
program against 4 or 8): whether the input's cost is its bytes (programs of more rows would cut
it) or one round trip after the wait (they would not). ``-r<n>-`` (``read-x16-r8-pdl-early``)
adds to a probe a reduction across groups of ``n`` programs, as a split over K would need (each
program's sum stored, an atomic count, the last to arrive adding its group's sums in order):
what that reduction costs a stack beside the same probe without it.
``int4-interleaved-pdl`` and ``-pdl-early`` are torch_wo's kernels launched as ``+pdl`` and
``+pdl-early``; ``-pdl-early-onepass`` pins them to configs that load a row's whole weight in one
tile; ``-pre`` (after ``-pdl`` or ``-pdl-early``)
dequantizes each kernel's first tile before its wait (``QUANTCORE_TRITON_PDL_PRE``). ``-l2``: one
weight a shape, so the kernels read from L2 (their own work and boundaries, without HBM). An
interleaved stack takes ``@`` configs, one a shape separated by ``/``, ``-`` for the pinned one
(``int4-interleaved-pdl-early-pre@-/-/8x1024x4x1/4x2048x4``: see :func:`bench_decode.pin_spec`). ``--dot``:
also the several-row ``tl.dot`` kernels on the one row (a 16-row tile, 15 rows masked): whether
tensor cores beat the one-row kernels' reduction, where the int4 one is bound by its instructions.

Usage::

    python bench/bench_gemv.py --out gemv_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import operator
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import bench_decode
import torch
import torch.nn.functional as F

GROUP = 128
READ_BLOCK = 2048  # int32 words a program of the read kernel loads (8 KiB)

try:
    import triton
    import triton.language as tl
except ImportError:  # the read stacks need Triton; everything else runs without
    triton = None

if triton is not None:
    from quantcore_torch._triton import INT4_MAGIC, _offset_nibble

    @triton.jit
    def _read_kernel(
        src, pairs, out, NUMEL, PAIRS, magic, c,
        BLOCK: tl.constexpr, USE_GDC: tl.constexpr, INPUT: tl.constexpr = False, MATH: tl.constexpr = False,
        src2=None, NUMEL2=0, SECOND: tl.constexpr = False, SHARE: tl.constexpr = 0,
        counters=None, result=None, REDUCE: tl.constexpr = 0,
    ):  # fmt: skip
        """Read ``src``'s words, one program a block, and store their XOR (so the loads stay).
        ``USE_GDC``: 1, launched programmatically, the next kernel launched once this one's work is
        done; 2, the next launched at once (the most overlap programmatic launches allow).

        The probes add a part of an int4 kernel's work after the wait, to see what each part
        costs: ``INPUT``, two 32-bit input pairs a word loaded from ``pairs`` (four bf16 values,
        as a two-row program of the interleaved kernel loads them; a word's pair and its
        neighbour's, coalesced; ``PAIRS`` a power of two), ``MATH``, the interleaved kernel's
        arithmetic on each word (three rotations, eight LOP3s, eight multiply-adds) against those
        values or the run-time constant ``c``. Their sums are reduced across the program, one float
        stored in place of the XOR. ``SHARE``: the input's loads stay the same instructions, but
        over a window of ``BLOCK >> SHARE`` pairs (a program's words share each pair, as
        ``2 ** SHARE`` times the rows of a program would share the input). ``SECOND``: the
        programs past ``src``'s read ``src2``'s ``NUMEL2`` words (a weight's codes, then its scales
        and zero points, in one launch). ``REDUCE`` (with a probe): the programs in groups of
        ``REDUCE``, as a split over K would split a row's sum; each stores its sum, counts itself in
        its group's ``counters`` slot (an atomic add, acquire-release), and the last to arrive
        adds the group's sums in program order into ``result`` and zeroes the slot for the next
        launch: what a deterministic reduction across programs costs after the arithmetic."""
        if USE_GDC == 2:
            tl.extra.cuda.gdc_launch_dependents()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if SECOND:
            first = tl.cdiv(NUMEL, BLOCK)
            if tl.program_id(0) >= first:
                at = offs - first * BLOCK
                words = tl.load(src2 + at, mask=at < NUMEL2, other=0)
            else:
                words = tl.load(src + offs, mask=offs < NUMEL, other=0)
        else:
            words = tl.load(src + offs, mask=offs < NUMEL, other=0)
        if USE_GDC:
            tl.extra.cuda.gdc_wait()
        if INPUT or MATH:
            word = words.to(tl.uint32, bitcast=True)
            if INPUT:
                window = BLOCK >> SHARE  # the program's pairs, contiguous: the same loads at any SHARE
                at = (tl.program_id(0) * window + (tl.arange(0, BLOCK) & (window - 1))) & (PAIRS - 1)
                a = tl.load(pairs + at)  # coalesced, in 4-byte loads (offline, sm_90), not 16 as the words
                b = tl.load(pairs + (at ^ 1))
                x0, x1 = (a << 16).to(tl.float32, bitcast=True), (a & -65536).to(tl.float32, bitcast=True)
                x2, x3 = (b << 16).to(tl.float32, bitcast=True), (b & -65536).to(tl.float32, bitcast=True)
            else:
                x0 = tl.full((BLOCK,), 1.0, tl.float32) * c
                x1, x2, x3 = x0 + 1.0, x0 + 2.0, x0 + 3.0
            if MATH:
                left8 = (word << 8) | (word >> 24)
                right8 = (word >> 8) | (word << 24)
                half = (word >> 16) | (word << 16)
                acc = _offset_nibble(magic, word, 12) * x0
                acc += _offset_nibble(magic, word, 16) * x1
                acc += _offset_nibble(magic, left8, 12) * x2
                acc += _offset_nibble(magic, left8, 16) * x3
                acc += _offset_nibble(magic, right8, 12) * x0
                acc += _offset_nibble(magic, right8, 16) * x1
                acc += _offset_nibble(magic, half, 12) * x2
                acc += _offset_nibble(magic, half, 16) * x3
            else:
                acc = (x0 + x1) + (x2 + x3) + (word & 1).to(tl.float32)
            tl.store(out + tl.program_id(0), tl.sum(acc, 0))
            if REDUCE:
                _last_arriver_sum(out, counters, result, REDUCE)
        else:
            tl.store(out + tl.program_id(0), tl.xor_sum(words, 0))
        if USE_GDC == 1:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _last_arriver_sum(out, counters, result, REDUCE: tl.constexpr):
        """``_read_kernel``'s reduction across programs (``REDUCE``): after this program's sum is
        stored, the last of its group to arrive sums the group's, in program order."""
        pid = tl.program_id(0)
        group = pid // REDUCE
        members = tl.minimum(REDUCE, tl.num_programs(0) - group * REDUCE)
        tl.debug_barrier()  # every thread's store before the count
        arrived = tl.atomic_add(counters + group, 1, sem="acq_rel")
        if arrived == members - 1:
            first = group * REDUCE + tl.arange(0, REDUCE)
            sums = tl.load(out + first, mask=first < group * REDUCE + members, other=0.0, cache_modifier=".cg")
            tl.store(result + group, tl.sum(sums, 0))
            tl.store(counters + group, 0)


def read_call(
    nbytes: int,
    pdl: int,
    x: torch.Tensor | None = None,
    input_loads: bool = False,
    math: bool = False,
    share: int = 0,
    reduce: int = 0,
):
    """A zero-argument call that reads ``nbytes`` of fresh memory with the read kernel (``pdl``:
    its ``USE_GDC``), as a kernel a linear would read its weight and nothing more; or, a probe,
    with a part of an int4 kernel's work after the wait: ``input_loads`` from ``x`` (a bf16 row,
    4-byte aligned; ``share``: the kernel's ``SHARE``), the arithmetic (``math``), or both, and
    with ``reduce`` a reduction across groups of that many programs. A plain read's call, and a
    reducing probe's, have a ``check``."""
    if share and not input_loads:
        raise ValueError("share applies to the input's loads")
    if reduce and (not (input_loads or math) or reduce & (reduce - 1) or reduce > 64):
        raise ValueError(
            f"a reduction (reduce={reduce}) follows a probe's sum, across a power of two up to 64 programs"
        )
    if triton is None:
        raise RuntimeError("the read stacks need Triton")
    src = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
    programs = triton.cdiv(src.numel(), READ_BLOCK)
    probe = input_loads or math
    out = torch.empty(programs, dtype=torch.float32 if probe else torch.int32, device="cuda")
    pairs = x.reshape(-1).view(torch.int32) if input_loads else src  # unread without input loads
    power = 1 << (pairs.numel().bit_length() - 1)  # the most pairs a power of two covers
    options = {"launch_pdl": True} if pdl else {}  # sm_90 and later
    groups = triton.cdiv(programs, reduce) if reduce else 1
    counters = torch.zeros(groups, dtype=torch.int32, device=src.device)
    result = torch.empty(groups, dtype=torch.float32, device=src.device)

    def call():
        _read_kernel[(programs,)](
            src, pairs, out, src.numel(), power, INT4_MAGIC, 0.5,
            BLOCK=READ_BLOCK, USE_GDC=pdl, INPUT=input_loads, MATH=math, SHARE=share,
            counters=counters, result=result, REDUCE=reduce, num_warps=4, **options,
        )  # fmt: skip

    def check() -> None:
        """The first program's word is the XOR of its block (the kernel read what it was given)."""
        want = functools.reduce(operator.xor, src[:READ_BLOCK].tolist())
        if int(out[0]) != want:
            raise RuntimeError(f"read kernel: {int(out[0])} where the block's XOR is {want}")

    def check_reduced() -> None:
        """Each group's result is the sum of its programs' sums, and every count is back at 0."""
        padded = torch.zeros(groups * reduce, device=out.device)
        padded[:programs] = out
        want = padded.view(groups, reduce).sum(1)
        if not torch.allclose(result, want, rtol=1e-5, atol=1e-3) or counters.any():
            raise RuntimeError(
                f"read kernel's reduction: {result[:4].tolist()} where the sums give {want[:4].tolist()}"
            )

    if not probe:
        call.check = check
    elif reduce:
        call.check = check_reduced
    return call


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as int32 words (no copy: a copy would be a kernel of its own)."""
    if not t.is_contiguous() or (t.numel() * t.element_size()) % 4:
        raise ValueError(f"the read kernel reads contiguous whole words, got {tuple(t.shape)} {t.dtype}")
    return t.reshape(-1).view(torch.int32)


def read_weight(codes: torch.Tensor, params: torch.Tensor, pdl: int) -> torch.Tensor:
    """Read a weight's two tensors (``codes``, then ``params``: its scales and zero points) in one
    launch of the read kernel (``pdl``: its ``USE_GDC``), as a kernel a linear would that cost only
    its bytes; returns the programs' XORs, one a block of ``READ_BLOCK`` words."""
    if triton is None:
        raise RuntimeError("the read kernel needs Triton")
    a, b = _as_words(codes), _as_words(params)
    programs = triton.cdiv(a.numel(), READ_BLOCK) + triton.cdiv(b.numel(), READ_BLOCK)
    out = torch.empty(programs, dtype=torch.int32, device=a.device)
    options = {"launch_pdl": True} if pdl else {}  # sm_90 and later
    _read_kernel[(programs,)](
        a, a, out, a.numel(), 1, INT4_MAGIC, 0.5, BLOCK=READ_BLOCK, USE_GDC=pdl,
        src2=b, NUMEL2=b.numel(), SECOND=True, num_warps=4, **options,
    )  # fmt: skip
    return out


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def graph_time_us(calls: list, replays: int = 10) -> float:
    """Mean microseconds per call of ``calls`` (zero-argument functions) captured in one CUDA graph."""
    for fn in calls:  # compile, autotune, allocate
        fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * len(calls))


class Weights:
    """``copies`` random weights of one shape in every format, quantized as torch_wo stores them."""

    def __init__(self, n: int, k: int, copies: int, formats: set[str]):
        from quantcore_torch import kernels
        from quantcore_torch.packing import quantize_int4, quantize_int8

        self.n, self.k = n, k
        self.bf16, self.int8, self.int4, self.tinygemm, self.interleaved = [], [], [], [], []
        for _ in range(copies):
            w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
            if "bf16" in formats:
                self.bf16.append(w)
            if "int8" in formats:
                self.int8.append(quantize_int8(w))
            if "int4" in formats:
                packed, scale, zero = quantize_int4(w, GROUP)
                self.int4.append((packed, scale, zero))
                self.tinygemm.append(kernels.int4_tinygemm_layout(packed, scale, zero, k, GROUP))
                self.interleaved.append(kernels.int4_interleaved_layout(packed, scale, zero, k, GROUP))

    def nbytes(self, fmt: str) -> int:
        """The bytes one call reads in ``fmt`` (the stored tensors of one copy)."""
        first = {"bf16": self.bf16, "int8": self.int8, "int4": self.int4}[fmt][0]
        return tensor_bytes(*first) if isinstance(first, tuple) else tensor_bytes(first)


def forced(kernel, config: tuple, x: torch.Tensor, args: tuple, constexprs: dict):
    """A one-row kernel launched with one config, bypassing the autotuner."""
    import triton

    block_n, block_k, warps, *stages = config
    n = args[0].shape[0]
    y = x.new_empty((1, n))
    grid = (triton.cdiv(n, block_n), 1)

    def call():
        # The autotuner wraps the JIT function: ``.fn`` launches it with the config given here.
        kernel.fn[grid](
            x,
            *args[:-1],
            y,
            n,
            x.shape[-1],
            *args[-1],
            **constexprs,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=warps,
            num_stages=stages[0] if stages else 1,
        )
        return y

    return call


def dot_one_row(launcher, x: torch.Tensor, inputs: tuple, n: int, strides: tuple, constexprs: dict):
    """The several-rows ``tl.dot`` kernel (autotuned) on one row, its tile 16 rows with 15 masked:
    tensor cores doing the multiply-adds instead of the one-row kernels' CUDA-core reduction."""
    import triton

    y = x.new_empty((1, n))
    args = (*inputs, y, 1, n, x.shape[-1], *strides)
    key = ("one row on tl.dot", x.device.index, n, x.shape[-1], x.dtype, tuple(t.dtype for t in inputs))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), 1)

    def call():
        launcher(key, grid, args, {**constexprs, "BLOCK_M": 16})
        return y

    return call


def wide_int8_configs() -> list[tuple[int, int, int, int]]:
    """Candidate one-row int8 configs beyond ``INT8_ROW``: ``(BLOCK_N, BLOCK_K, num_warps, num_stages)``
    with 16 to 128 weight bytes a thread a step (one to eight 16-byte loads), pipelined or not."""
    configs = []
    for n in (1, 2, 4, 8):
        for k in (512, 1024, 2048, 4096):
            for warps in (1, 2, 4, 8):
                if 16 <= n * k // (32 * warps) <= 128:
                    configs += [(n, k, warps, stages) for stages in (1, 2)]
    return configs


def wide_int4_configs(k: int) -> list[tuple[int, int, int, bool]]:
    """Candidate interleaved int4 configs beyond ``INT4_INTERLEAVED`` for ``k`` inputs:
    ``(BLOCK_N, BLOCK_K, num_warps, PREFETCH)`` with 4 to 32 weight words a thread a tile (16 to
    128 bytes), ``BLOCK_K`` at most ``k``; prefetched (two tiles in registers) up to 16 words."""
    configs = []
    for n in (2, 4, 8, 16):
        for block_k in (512, 1024, 2048, 4096):
            for warps in (1, 2, 4, 8):
                words = n * block_k // 8 // (32 * warps)
                if 4 <= words <= 32 and block_k <= max(k, 512):
                    configs += [
                        (n, block_k, warps, prefetch) for prefetch in (False, True) if words <= 16 or not prefetch
                    ]
    return configs


def shape_cases(
    w: Weights,
    x: torch.Tensor,
    formats: set[str],
    wide: bool = False,
    dot: bool = False,
    wide_int4: bool = False,
) -> dict[str, tuple[str, list]]:
    """name -> (format whose bytes it moves, one call per weight copy). ``wide``: int8 over
    ``wide_int8_configs()`` instead of ``INT8_ROW``. ``dot``: also the ``tl.dot`` kernels on the
    one row (:func:`dot_one_row`). ``wide_int4``: the interleaved kernel over
    ``wide_int4_configs()`` instead of ``INT4_INTERLEAVED``."""
    from quantcore_torch import _triton, kernels

    cases: dict[str, tuple[str, list]] = {}
    if "bf16" in formats:
        cases["bf16 F.linear"] = ("bf16", [lambda w=w: F.linear(x, w) for w in w.bf16])
    if "int8" in formats:
        cases["int8 dispatch"] = (
            "int8",
            [lambda q=q, s=s: kernels.int8_weight_only_linear(x, q, s) for q, s in w.int8],
        )
        for cfg in wide_int8_configs() if wide else _triton.INT8_ROW:
            calls = [
                forced(_triton._int8_row_kernel, cfg, x, (q, s, s, (q.stride(0),)), {"HAS_BIAS": False})
                for q, s in w.int8
            ]
            cases[f"int8 {cfg}"] = ("int8", calls)
        if dot:
            cases["int8 tl.dot, one row"] = (
                "int8",
                [
                    dot_one_row(_triton._INT8.dot, x, (x, q, s, s), q.shape[0], (q.stride(0),), {"HAS_BIAS": False})
                    for q, s in w.int8
                ],
            )
    if "int4" in formats:
        for name, layouts in (("int4 tinygemm", w.tinygemm), ("int4 interleaved dispatch", w.interleaved)):
            cases[name] = (
                "int4",
                [
                    lambda p=p, s=s, z=z, t=t: kernels.int4_weight_only_linear(x, p, s, z, GROUP, None, t)
                    for (p, s, z), t in zip(w.int4, layouts, strict=True)
                ],
            )
        cases["int4 triton dispatch"] = (
            "int4",
            [lambda p=p, s=s, z=z: _triton.int4_mm(x, p, s, z, GROUP, None) for p, s, z in w.int4],
        )
        if dot:
            constexprs = {"GROUP": GROUP, "HAS_BIAS": False}
            calls = [
                dot_one_row(
                    _triton._INT4.dot, x, (x, p, s, z, s), p.shape[0], (p.stride(0), s.stride(0), w.k // 2), constexprs
                )
                for p, s, z in w.int4
            ]
            cases["int4 tl.dot, one row"] = ("int4", calls)
        byte_args = [(p, s, z, s, (p.stride(0), s.stride(0), w.k // 2)) for p, s, z in w.int4]
        # the interleaved kernel's scales and zero points: one tensor, the zeros by offset
        interleaved_args = []
        for t in w.interleaved:
            sz = t.scales_and_zeros
            interleaved_args.append(
                (t.weight, sz, sz, (t.weight.stride(0), sz.stride(1), sz.stride(0), _triton.INT4_MAGIC))
            )
        # Every one-row int4 config, forced: (label, kernel, table, per-copy arguments; the bias slot unused)
        for label, kernel, table, copies in (
            ("int4", _triton._int4_row_kernel, _triton.INT4_ROW, byte_args),
            (
                "int4 interleaved",
                _triton._int4_interleaved_kernel,
                wide_int4_configs(w.k) if wide_int4 else _triton.INT4_INTERLEAVED,
                interleaved_args,
            ),
        ):
            for cfg in table:
                if cfg[1] % GROUP:
                    continue
                constexprs = {"GROUP": GROUP, "HAS_BIAS": False, **({"PREFETCH": cfg[3]} if len(cfg) > 3 else {})}
                calls = [forced(kernel, cfg[:3], x, args, constexprs) for args in copies]
                cases[f"{label} {cfg}"] = ("int4", calls)
    return cases


def check(cases: dict, w: Weights, x: torch.Tensor) -> dict[str, float]:
    """Relative error of each case's first call against dequantize + F.linear in fp32."""
    from quantcore_torch.packing import dequantize_int4, dequantize_int8

    refs = {"bf16": F.linear(x.float(), w.bf16[0].float()) if w.bf16 else None}
    if w.int8:
        refs["int8"] = F.linear(x.float(), dequantize_int8(*w.int8[0], torch.float32))
    if w.int4:
        refs["int4"] = F.linear(x.float(), dequantize_int4(*w.int4[0], w.k, GROUP, torch.float32))
    errors = {}
    for name, (fmt, calls) in cases.items():
        out = calls[0]()
        errors[name] = ((out.float() - refs[fmt]).norm() / refs[fmt].norm()).item()
    return errors


def run_shapes(
    model: str,
    formats: set[str],
    stream_mib: int,
    bandwidth: float,
    fused: bool,
    wide: bool = False,
    dot: bool = False,
    only: list[str] | None = None,
    wide_int4: bool = False,
) -> list[dict]:
    rows = []
    for n, k in dict.fromkeys(bench_decode.llama_linears(model, fused)[1]):
        bytes_bf16 = 2 * n * k
        copies = max(4, -(-stream_mib * 2**20 // (bytes_bf16 if "bf16" in formats else n * k)))
        w = Weights(n, k, copies, formats)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        cases = shape_cases(w, x, formats, wide, dot, wide_int4)
        if only:
            kept = {name: case for name, case in cases.items() if any(word in name for word in only)}
            if not kept:
                raise SystemExit(f"--only {','.join(only)}: no case of {n}x{k} matches ({', '.join(cases)})")
            cases = kept
        errors = check(cases, w, x)
        row = dict(n=n, k=k, copies=copies, cases={})
        for name, (fmt, calls) in cases.items():
            try:
                us = graph_time_us(calls)
            except Exception as exc:  # a config this GPU cannot run (registers, shared memory)
                row["cases"][name] = dict(error=f"{type(exc).__name__}: {str(exc)[:160]}")
                continue
            share = w.nbytes(fmt) / (us * 1e-6) / bandwidth
            row["cases"][name] = dict(us=us, bandwidth_share=share, rel_err=errors.get(name))
            err = f" err {errors[name]:.1e}" if name in errors else ""
            print(f"[{n}x{k}] {name:28s} {us:7.2f} us  {100 * share:5.1f}% of copy{err}", flush=True)
        rows.append(row)
        del w, cases
        torch.cuda.empty_cache()
    return rows


STACK_METHODS = (
    "bf16",
    "int8",
    "int4-triton",
    "int4-tinygemm",
    "int4-interleaved",
    "int4-interleaved-pdl",
    "int4-interleaved-pdl-early",
    "int4-interleaved-pdl-early-onepass",
    "int4-interleaved-pdl-pre",
    "int4-interleaved-pdl-early-pre",
    "int4-interleaved-fold-pdl-early-pre",
    "int4-interleaved-l2",
    "int4-interleaved-pdl-early-l2",
    "int4-interleaved-pdl-early-pre-l2",
    "read",
    "read-pdl",
    "read-pdl-early",
    "read-pdl-early-l2",
    "read-x-pdl-early",
    "read-x4-pdl-early",
    "read-x16-pdl-early",
    "read-x16-r4-pdl-early",
    "read-x16-r8-pdl-early",
    "read-x16-r16-pdl-early",
    "read-math-pdl-early",
    "read-x-math-pdl-early",
)


def run_stack(model: str, bandwidth: float, fused: bool, methods=STACK_METHODS) -> dict:
    """Every linear of a decode step, each with its own weight, in one graph, per method.
    ``fused``: the quantized methods run the fused projections' shapes; bf16 runs transformers'."""
    result = {}
    for label in methods:
        # "-l2": every layer runs the same weights (one a shape, in L2 after the first replay), so
        # the stack times the kernels' own work and boundaries without HBM. "@...": pinned configs.
        name, _, spec = label.partition("@")
        method, in_l2 = name.removesuffix("-l2"), name.endswith("-l2")
        layers, shapes = bench_decode.llama_linears(model, fused and method != "bf16")
        calls, nbytes = [], 0
        xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes}
        made = {}
        fold = FoldedStack(layers, shapes) if "-fold" in method else None
        for layer in range(layers):
            for role, (n, k) in enumerate(shapes):
                if fold is not None:
                    made[n, k] = fold.call(layer, role, xs[k])
                elif (n, k) not in made or not in_l2:
                    made[n, k] = _stack_call(method, xs[k], n, k)
                calls.append(made[n, k][0])
                nbytes += made[n, k][1]
        ours = method.startswith("int4-interleaved")  # the read stacks launch themselves
        trigger = _trigger(method)
        with contextlib.ExitStack() as stack:
            if ours and trigger:
                stack.enter_context(bench_decode._programmatic(label, trigger, pre=method.endswith("-pre")))
            if method.endswith("-onepass"):
                stack.enter_context(bench_decode.pinned_configs(_one_pass_configs(shapes)))
            if spec:
                stack.enter_context(bench_decode.pinned_configs(bench_decode.pin_spec(spec, shapes)))
            us = graph_time_us(calls, replays=5) * len(calls)
        if hasattr(calls[-1], "check"):
            calls[-1].check()
        _stack_row(result, model, label, us, len(calls), nbytes, bandwidth)
        del calls, made
        torch.cuda.empty_cache()
    return result


def _trigger(method: str) -> str | None:
    """A stack method's programmatic trigger: ``early`` (``-pdl-early``), ``late`` (``-pdl``), or
    ``None`` (ordinary launches)."""
    return "early" if "-pdl-early" in method else "late" if "-pdl" in method else None


def _input_share(method: str) -> int | None:
    """A read stack's input loads: ``None`` without them (no ``-x``), else the read kernel's
    ``SHARE``: ``-x-`` 0, ``-x4-`` 2 (a window of a quarter of the pairs), ``-x16-`` 4."""
    found = re.search(r"-x(\d*)-", method)
    if found is None:
        return None
    ways = int(found[1] or 1)
    if ways & (ways - 1) or ways > READ_BLOCK:
        raise ValueError(f"{method}: -x takes a power of two up to {READ_BLOCK}, got {ways}")
    return ways.bit_length() - 1


def _reduce_ways(method: str) -> int:
    """A read probe's reduction across programs: ``-r8-`` 8 (``read_call``'s ``reduce``), else 0."""
    found = re.search(r"-r(\d+)-", method)
    return int(found[1]) if found else 0


def _stack_call(method: str, x: torch.Tensor, n: int, k: int):
    """A stack's call of ``method`` on a fresh random ``n x k`` weight, and the bytes it reads."""
    from quantcore_torch import kernels
    from quantcore_torch.packing import quantize_int4, quantize_int8

    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    if method == "bf16":
        return (lambda: F.linear(x, w)), tensor_bytes(w)
    if method == "int8":
        q, s = quantize_int8(w)
        return (lambda: kernels.int8_weight_only_linear(x, q, s)), tensor_bytes(q, s)
    p, s, z = quantize_int4(w, GROUP)
    nbytes = tensor_bytes(p, s, z)
    if method.startswith("read"):  # the int4 bytes, read (and with -x, -math, a part of the work)
        pdl = {None: 0, "late": 1, "early": 2}[_trigger(method)]
        share = _input_share(method)
        probe = read_call(nbytes, pdl, x, share is not None, "-math-" in method, share or 0, _reduce_ways(method))
        return probe, nbytes
    if method == "int4-triton":
        return (lambda: kernels._TRITON.int4_mm(x, p, s, z, GROUP, None)), nbytes
    if method == "int4-tinygemm":
        layout = kernels.int4_tinygemm_layout(p, s, z, k, GROUP)
    else:  # the interleaved stacks
        layout = kernels.int4_interleaved_layout(p, s, z, k, GROUP)
    if layout is None:
        raise RuntimeError(f"{method}: no layout for {n}x{k}")
    return (lambda: kernels.int4_weight_only_linear(x, p, s, z, GROUP, None, layout)), nbytes


class FoldedStack:
    """A fused stack's linears with a decoder layer's norms and residual adds in their kernels
    (``quantcore_torch._fold``): q+k+v and gate+up scale their sums by a norm's counter, o and
    down add the residual, write the next norm's input and add to its counter, as a folded layer
    would run them (counters per layer and norm, each cleared by the block after its reader).
    gate+up stays a plain projection, as in the other stacks: the fold's cost alone."""

    def __init__(self, layers: int, shapes: list[tuple[int, int]]) -> None:
        hidden = shapes[1][0]
        self.layers = layers
        self.attn = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in range(layers)]
        self.mlp = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in range(layers)]
        self.h = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
        self.gain = torch.rand(hidden, device="cuda", dtype=torch.bfloat16) + 0.5
        self.shapes = shapes

    def call(self, layer: int, role: int, x: torch.Tensor):
        from quantcore_torch import _fold, kernels
        from quantcore_torch.packing import quantize_int4

        n, k = self.shapes[role]
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        p, s, z = quantize_int4(w, GROUP)
        layout = kernels.int4_interleaved_layout(p, s, z, k, GROUP)
        weight = (layout.weight, layout.scales_and_zeros, GROUP, None)
        nbytes = tensor_bytes(p, s, z)
        if role in (0, 2):  # q+k+v, gate+up: a norm's counter scales the sums
            sq = (self.attn if role == 0 else self.mlp)[layer]
            return (lambda: _fold.int4_interleaved_norm_mm(x, *weight, sq, 1e-5)), nbytes
        if role == 1:  # o: the MLP's norm counted, the attention's (read by q+k+v) cleared
            sq, clear = self.mlp[layer], self.attn[layer]
        else:  # down: the next layer's attention norm counted, this MLP's cleared
            sq, clear = self.attn[(layer + 1) % self.layers], self.mlp[layer]
        return (lambda: _fold.int4_interleaved_residual_mm(x, *weight, self.h, self.gain, sq, clear)), nbytes


def _one_pass_configs(shapes: list[tuple[int, int]]) -> dict:
    """Configs that read a row's whole ``K`` in one tile (two rows a program, four for gate/up;
    two warps): under a programmatic launch each program then loads all of its weight before it
    waits."""
    return {(n, k): (4 if n > 4 * k else 2, triton.next_power_of_2(k), 2, False) for n, k in shapes}


def _stack_row(result: dict, model: str, method: str, us: float, calls: int, nbytes: int, bandwidth: float) -> None:
    """Record and print one stack's time against its floor."""
    floor = nbytes / bandwidth * 1e6
    # A list a method: --stack-methods may name one twice (A B A B, against drift).
    result.setdefault(method, []).append(dict(us_per_step=us, mib=nbytes / 2**20, floor_us=floor, share=floor / us))
    print(
        f"[stack {model}] {method:20s} {us:8.1f} us a step for {calls} linears, "
        f"{nbytes / 2**20:7.1f} MiB, floor {floor:6.1f} us ({100 * floor / us:4.1f}%)",
        flush=True,
    )


def _words(text: str) -> list[str]:
    """A comma-separated option's words, in order, blanks dropped."""
    return [word.strip() for word in text.split(",") if word.strip()]


def _listed(parser: argparse.ArgumentParser, option: str, text: str, known: tuple[str, ...]) -> list[str]:
    """``option``'s words (:func:`_words`), each one of ``known``; a parser error otherwise."""
    words = _words(text)
    if not words:
        parser.error(f"{option}: give at least one of {', '.join(known)}")
    if unknown := sorted({word for word in words if word.partition("@")[0] not in known}):
        parser.error(f"{option}: unknown {unknown}")
    return words


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama-1.1b", "llama-7b"), default="llama-1.1b")
    parser.add_argument(
        "--formats",
        default="bf16,int8,int4",
        help="the per-shape sweep's formats, comma-separated: bf16, int8, int4 (--stack runs all)",
    )
    parser.add_argument(
        "--stream-mib", type=_common.int_at_least(1), default=256, help="weight bytes a shape's graph streams"
    )
    parser.add_argument("--no-shapes", action="store_true", help="skip the per-shape config sweep")
    parser.add_argument("--stack", action="store_true", help="also time a whole step's linears per method")
    parser.add_argument(
        "--stack-methods",
        default=",".join(STACK_METHODS),
        help=f"--stack's methods, comma-separated, in order (one may repeat): {', '.join(STACK_METHODS)}",
    )
    parser.add_argument(
        "--fused", action="store_true", help="fused projections' shapes (q+k+v, gate+up) for the quantized formats"
    )
    parser.add_argument(
        "--wide-int8", action="store_true", help="sweep int8 over a wider grid of configs, num_stages included"
    )
    parser.add_argument(
        "--wide-int4",
        action="store_true",
        help="sweep the interleaved int4 kernel over a wider grid of configs (prefetch included)",
    )
    parser.add_argument(
        "--dot", action="store_true", help="also the tl.dot kernels on the one row (tensor cores, a 16-row tile)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="time only the per-shape cases whose name holds one of these comma-separated words "
        "(e.g. 'tinygemm,interleaved'); the check runs on them alone too",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    formats = set(_listed(parser, "--formats", args.formats, ("bf16", "int8", "int4")))
    stack_methods = _listed(parser, "--stack-methods", args.stack_methods, STACK_METHODS)
    for label in stack_methods:
        name, at, spec = label.partition("@")
        if at and not name.startswith("int4-interleaved"):
            parser.error(f"--stack-methods: {label}: only the interleaved stacks take @configs")
        if at:
            try:
                bench_decode.pin_spec(spec, bench_decode.llama_linears(args.model, args.fused)[1])
            except ValueError as exc:
                parser.error(f"--stack-methods: {exc}")
    if args.no_shapes and not args.stack:
        parser.error("--no-shapes without --stack leaves nothing to time")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    torch.manual_seed(0)
    bandwidth = bench_decode.copy_bandwidth("cuda")
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    report = dict(device=torch.cuda.get_device_name(), bandwidth=bandwidth, model=args.model, fused=args.fused)
    with torch.no_grad():
        if not args.no_shapes:
            only = _words(args.only)
            report["shapes"] = run_shapes(
                args.model,
                formats,
                args.stream_mib,
                bandwidth,
                args.fused,
                args.wide_int8,
                args.dot,
                only,
                args.wide_int4,
            )
        if args.stack:
            report["stack"] = run_stack(args.model, bandwidth, args.fused, stack_methods)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
