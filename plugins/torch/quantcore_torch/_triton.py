"""Triton kernels for small-batch weight-only matmuls on CUDA (decode), reading the stored tensors.

Imported by :mod:`quantcore_torch.kernels` only where CUDA and Triton exist. Each kernel computes
``y[m, n] = sum_k x[m, k] * w[n, k] + bias[n]`` with ``w`` dequantized in registers, tile by tile,
so the weight crosses memory once in its quantized size. Each format has two kernels:

- one row (``M == 1``, batch-1 decode): a reduction in fp32 over tiles of a few output rows and
  a long stretch of K, so that a weight streamed from HBM keeps every SM busy; codes become
  floats through bit operations, not conversion instructions (see :func:`_int8_to_float`). The
  int4 one reads the input two values at a time as 32-bit words (even K); a second int4 one
  (:func:`_int4_interleaved_kernel`) reads a copy of the weight in its own layout (32-bit words
  whose codes meet contiguous runs of the input), a LOP3 and a multiply-add a weight;
- more rows (or int4 with odd K): ``tl.dot`` on the dequantized tile, cast to the activation
  dtype first exactly as the reference path rounds it.

Their configs were chosen on an H200 with ``bench/bench_gemv.py``, which times each one on
weights streamed from HBM as a decode step reads them (not from L2, as a layer timed alone is).

Calls go through :class:`_Launcher`: a shape's first call autotunes (Triton times the configs
once), later calls hand the arguments straight to the compiled kernel of the chosen config, as
inductor's generated code does, at the cost of Triton's C launcher. The general path (the custom
op layer, then the autotuner) cost about 130 µs a call on an H200 host, against about 25 µs for a
bf16 ``F.linear``, which made every eager decode step slower than bf16's.

With ``TORCHINDUCTOR_ENABLE_PDL=1`` (inductor's programmatic launches; ``QUANTCORE_TRITON_PDL``
overrides it for these kernels alone), the one-row kernels (and the decode attention's) captured
in a CUDA graph launch programmatically on Hopper and later, their first weight tile loaded
before they wait on the kernel before (see ``PDL``; ``PDL_TRIGGER`` for when the next may launch;
``PDL_PRE`` to dequantize that tile before the wait too).

Under ``torch.compile`` they are the custom ops ``quantcore_torch::int8_mm`` and
``quantcore_torch::int4_mm``: opaque to inductor, which calls them as they are, so a compiled model
runs the very kernels (config included) that eager code runs, and CUDA graphs capture the launches.
(Registered as ``triton_op``\\ s instead, inductor re-autotuned the kernels itself and chose
configs that made the compiled int8 step's linears 1.9x slower than the same kernels run eagerly.)
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._settings import choice

__all__ = [
    "dequantize_int4",
    "dequantize_int8",
    "int4_interleaved_gate_up_mm",
    "int4_interleaved_mm",
    "int4_interleaved_qkv_rope",
    "int4_mm",
    "int8_gate_up_mm",
    "int8_glu_mm",
    "int8_mm",
    "int8_qkv_rope",
]


# One row (batch-1 decode) is a reduction: each program owns BLOCK_N output rows and streams their
# weight. The weight of a decode step (hundreds of MiB) comes from HBM, not L2, so a program must
# keep many bytes in flight: few rows (many programs), long K tiles. (BLOCK_N, BLOCK_K, num_warps);
# for int4, BLOCK_K counts input columns (a whole number of groups). More rows run ``tl.dot``,
# which needs tiles of 16 at least: (BLOCK_N, BLOCK_K or GROUPS_PER_BLOCK, num_warps).
INT8_ROW = [
    (2, 512, 1),
    (2, 1024, 1),  # the H100's fastest on three of a 1.1B Llama's four int8 shapes (2-8 %)
    (2, 1024, 2),
    (2, 2048, 4),
    (2, 4096, 8),
    (4, 1024, 4),
    (4, 2048, 4),
    (4, 2048, 8),
    (4, 4096, 8),
    (8, 1024, 4),
    (8, 2048, 8),
    (16, 1024, 8),
]
INT4_ROW = [
    (2, 1024, 2),
    (2, 2048, 4),
    (2, 4096, 8),
    (4, 1024, 4),
    (4, 2048, 4),
    (4, 2048, 8),
    (4, 4096, 8),
    (8, 512, 4),
    (8, 1024, 4),
    (8, 2048, 8),
    (16, 256, 4),
    (16, 512, 4),
    (16, 1024, 8),
    (32, 256, 8),
]
_INT8_DOT = [(16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 4)]
_INT4_DOT = [(16, 1, 4), (16, 2, 4), (32, 1, 4), (32, 2, 4), (64, 1, 4), (64, 2, 4)]


def _configs(table: list, inner: str, stages: int = 1, extra: tuple[str, ...] = ()) -> list[triton.Config]:
    """``(BLOCK_N, inner, num_warps, *extra)`` rows as configs (``extra`` names the constexprs of the
    rows' trailing values); the ``tl.dot`` kernels pipeline their loads (3 stages)."""
    configs = [
        triton.Config({"BLOCK_N": n, inner: k, **dict(zip(extra, rest, strict=True))}, num_warps=w, num_stages=stages)
        for n, k, w, *rest in table
    ]
    # Triton's CPU interpreter (how kernels can be checked without a GPU) cannot time configs;
    # the autotuner skips timing when there is one.
    return configs[:1] if os.environ.get("TRITON_INTERPRET") == "1" else configs


def _prune_groups(configs, named_args, **kwargs):
    """int4 one-row tiles hold whole groups: drop those shorter than one group (or not a multiple of it)."""
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    kept = [c for c in configs if c.kwargs["BLOCK_K"] >= group and c.kwargs["BLOCK_K"] % group == 0]
    return kept or [triton.Config({"BLOCK_N": 8, "BLOCK_K": group}, num_warps=4, num_stages=1)]


# Integer-to-float conversion instructions run at an eighth of the rate of fused multiply-adds
# (16 a clock per SM on Hopper), which made the one-row kernels compute-bound: one a weight byte
# for int8, two for int4. These helpers build the float from its bits instead: a code c in
# 0..255 or'ed into the mantissa of 2**23 is the float 2**23 + c, exactly, and one subtraction
# leaves c. Bit operations and float adds run at the full rate.
_MAGIC = tl.constexpr(0x4B000000)  # the bits of 2.0**23


@triton.jit
def _int8_to_float(w):
    """int8 codes as fp32: the byte, its sign bit flipped (``c + 128``), in 2**23's mantissa."""
    u = w.to(tl.uint8, bitcast=True).to(tl.int32)
    return (u ^ (_MAGIC | 0x80)).to(tl.float32, bitcast=True) - 8388736.0  # 2**23 + 128


@triton.jit
def _nibbles_to_float(byte):
    """A byte's two int4 codes (low nibble first) as fp32."""
    u = byte.to(tl.int32)
    lo = ((u & 0x0F) | _MAGIC).to(tl.float32, bitcast=True) - 8388608.0
    hi = ((u >> 4) | _MAGIC).to(tl.float32, bitcast=True) - 8388608.0
    return lo, hi


@triton.jit
def _pair_to_float(pair, BF16: tl.constexpr):
    """The two fp16 / bf16 values of a 32-bit word (the even column in the low half) as fp32."""
    if BF16:  # a bf16 is the top half of an fp32
        return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
    else:
        lo = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _group_params(s_ptr, z_ptr, rn, g, stride_sn, mask):
    """The scales and zero points of rows ``rn`` and groups ``g`` (``[BLOCK_N, len(g)]``), as fp32."""
    offsets = rn[:, None] * stride_sn + g[None, :]
    s = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _store_row(out, b_ptr, y_ptr, rn, n_mask, HAS_BIAS: tl.constexpr):
    """A one-row kernel's epilogue: ``y[rn] = out + bias[rn]`` in the output's dtype."""
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, out.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _store_rows(out, b_ptr, y_ptr, rm, rn, m_mask, n_mask, N, HAS_BIAS: tl.constexpr):
    """A several-row kernel's epilogue: ``y[rm, rn] = out + bias[rn]`` (``y`` contiguous, ``N`` wide)."""
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_rows(N, BLOCK_N: tl.constexpr, GATE_UP: tl.constexpr):
    """A one-row kernel's output rows (weight rows) and the mask of those that exist. ``GATE_UP``:
    the weight's ``N`` rows are a gated MLP's gate (the first ``N // 2``) then up projections, and
    a tile takes ``BLOCK_N // 2`` of each, alternating gate ``j``, up ``j`` (see :func:`_store_gate_up`)."""
    r = tl.arange(0, BLOCK_N)
    if GATE_UP:
        half = N // 2
        j = tl.program_id(0) * (BLOCK_N // 2) + r // 2
        return j + (r % 2) * half, j < half
    else:
        rn = tl.program_id(0) * BLOCK_N + r
        return rn, rn < N


@triton.jit
def _silu(x, dtype):
    """``silu(x)`` of fp32 ``x`` rounded to ``dtype``, as PyTorch's kernel computes it for fp16 / bf16."""
    return (x / (1.0 + tl.exp(-x))).to(dtype).to(tl.float32)


@triton.jit
def _store_gate_up(out, b_ptr, y_ptr, rn, n_mask, N, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A one-row kernel's epilogue on a gated MLP's gate/up rows (:func:`_tile_rows`):
    ``y[j] = silu(gate[j]) * up[j]``, each projection's output, the activation and the product
    rounded to ``y``'s dtype as the unfused projections and eager PyTorch round them."""
    dtype = y_ptr.dtype.element_ty
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    gate, up = tl.split(tl.reshape(out.to(dtype).to(tl.float32), (BLOCK_N // 2, 2)))
    j = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(y_ptr + j, (_silu(gate, dtype) * up).to(dtype), mask=j < N // 2)


@triton.jit
def _row_input(x_ptr, kk, K, GLU: tl.constexpr):
    """A one-row kernel's input at columns ``kk`` as fp32. ``GLU``: ``x`` holds ``2K`` values, a gated
    MLP's gate then up halves, and the input is ``silu(gate) * up``, each rounded to the input's
    dtype as eager PyTorch rounds ``act_fn(gate) * up`` (the activation's kernel, folded in here)."""
    if GLU:
        g = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
        u = tl.load(x_ptr + K + kk, mask=kk < K, other=0.0)
        return (_silu(g.to(tl.float32), g.dtype) * u.to(tl.float32)).to(g.dtype).to(tl.float32)
    else:
        return tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)


# A programmatic launch's two points (see ``PDL``), by ``USE_GDC``: 0, an ordinary launch; 1, the
# kernel waits for the one before and lets the next one launch once its own work is done; 2
# (``PDL_TRIGGER = "early"``), it lets the next one launch as soon as its wait returns, so that the
# next kernel's programs are resident and issue their weight loads while this one computes.
@triton.jit
def _gdc_wait(USE_GDC: tl.constexpr):
    """Wait for the kernel before to complete and flush (its outputs are this kernel's inputs)."""
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        if USE_GDC == 2:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gdc_done(USE_GDC: tl.constexpr):
    """The late trigger: the next kernel may launch (it still waits for this one to complete)."""
    if USE_GDC == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _int8_rows(
    x_ptr, w_ptr, s_ptr, rn, n_mask, K, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr, GLU: tl.constexpr,
):  # fmt: skip
    """The int8 one-row kernels' sums: ``scale[n] * sum_k x[k] * w[n, k]`` in fp32 for the rows
    ``rn`` (``n_mask``: those that exist), a ``[BLOCK_N, BLOCK_K]`` tile a step, reduced once at
    the end; the next kernel may launch after them (``USE_GDC``'s late trigger)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if USE_GDC:  # programmatic launch: the first weight tile loads before the wait
            w = tl.load(
                w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_mask[:, None] & (kk[None, :] < K), other=0
            )
            if k0 == 0:
                _gdc_wait(USE_GDC)
            xk = _row_input(x_ptr, kk, K, GLU)
        else:  # the input first, the order these configs were tuned with
            xk = _row_input(x_ptr, kk, K, GLU)
            w = tl.load(
                w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_mask[:, None] & (kk[None, :] < K), other=0
            )
        acc += _int8_to_float(w) * xk[None, :]
    _gdc_done(USE_GDC)
    return tl.sum(acc, axis=1) * tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)


@triton.autotune(configs=_configs(INT8_ROW, "BLOCK_K"), key=["N", "K", "GLU", "GATE_UP"])
@triton.jit
def _int8_row_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_GDC: tl.constexpr = False,
    GLU: tl.constexpr = False,
    GATE_UP: tl.constexpr = False,
):
    """``y[n] = scale[n] * sum_k x[k] * w[n, k] + bias[n]`` for one row ``x``: a ``[BLOCK_N, BLOCK_K]``
    int8 tile a step, products summed in fp32 and reduced once at the end. ``USE_GDC``: launched as a
    programmatic dependent launch (see ``PDL``). ``GLU``: ``x`` is a gated MLP's gate and up halves
    (see :func:`_row_input`). ``GATE_UP``: the weight is a gated MLP's gate and up projections
    stacked, and ``y`` (``N // 2`` wide) gets ``silu(gate) * up`` (see :func:`_store_gate_up`)."""
    rn, n_mask = _tile_rows(N, BLOCK_N, GATE_UP)
    out = _int8_rows(x_ptr, w_ptr, s_ptr, rn, n_mask, K, stride_wn, BLOCK_N, BLOCK_K, USE_GDC, GLU)
    if GATE_UP:
        _store_gate_up(out, b_ptr, y_ptr, rn, n_mask, N, BLOCK_N, HAS_BIAS)
    else:
        _store_row(out, b_ptr, y_ptr, rn, n_mask, HAS_BIAS)


@triton.autotune(
    configs=_configs(INT4_ROW, "BLOCK_K"),
    key=["N", "K", "GROUP"],
    prune_configs_by={"early_config_prune": _prune_groups},
)
@triton.jit
def _int4_row_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    row_bytes,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    """``y[n] = sum_k scale[n, g] * (q[n, k] * x[k] - zero[n, g] * x[k]) + bias[n]``, ``g = k // GROUP``,
    for one row ``x`` of even length, 4-byte aligned.

    A step reads a ``[BLOCK_N, BLOCK_K // GROUP, GROUP // 2]`` tile of bytes: a byte's two codes
    multiply the even and the odd input, read together as one 32-bit word (two fp16 / bf16
    values, unpacked by bit shifts), and the group's scale and zero point broadcast along the
    group. The products accumulate per element in fp32; the one reduction is at the end.
    """
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    HALF_G: tl.constexpr = GROUP // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rg = tl.arange(0, GROUPS)
    rj = tl.arange(0, HALF_G)
    half = row_bytes  # K // 2; an argument, so that Triton knows its divisibility (see _int4_dequantize_kernel)
    groups = (K + GROUP - 1) // GROUP
    pairs = x_ptr.to(tl.pointer_type(tl.int32))
    acc = tl.zeros((BLOCK_N, GROUPS, HALF_G), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP + rg
        col = g[:, None] * HALF_G + rj[None, :]  # [GROUPS, HALF_G]: byte columns, input pairs
        col_mask = col < half
        byte = tl.load(
            w_ptr + rn[:, None, None] * stride_wn + col[None, :, :],
            mask=n_mask[:, None, None] & col_mask[None, :, :],
            other=0,
        )
        if USE_GDC:  # noqa: SIM102 - programmatic launch: the first weight tile loads before the wait
            if k0 == 0:
                _gdc_wait(USE_GDC)
        xe, xo = _pair_to_float(tl.load(pairs + col, mask=col_mask, other=0), x_ptr.dtype.element_ty == tl.bfloat16)
        s, z = _group_params(s_ptr, z_ptr, rn, g, stride_sn, n_mask[:, None] & (g < groups)[None, :])
        lo, hi = _nibbles_to_float(byte)
        t = lo * xe[None, :, :] + hi * xo[None, :, :] - z[:, :, None] * (xe + xo)[None, :, :]
        acc += s[:, :, None] * t
    _gdc_done(USE_GDC)
    _store_row(tl.sum(tl.sum(acc, axis=2), axis=1), b_ptr, y_ptr, rn, n_mask, HAS_BIAS)


# The interleaved int4 layout (see :func:`_int4_interleaved_kernel`): (BLOCK_N, BLOCK_K, num_warps,
# PREFETCH), BLOCK_K a whole number of groups; PREFETCH loads the next weight tile before the
# current one's arithmetic. Each was the fastest, or within 3 % of it, on at least one shape of a
# 1.1B or a 7B Llama's fused linears, weights streamed from HBM on an H100 (bench/bench_gemv.py:
# 18 configs timed, then 80 with --wide-int4; docs/benchmarks.md). Few configs: the autotuner
# times them one call at a time, which ranks them differently, so every one it can pick must be
# good streamed.
INT4_INTERLEAVED = [
    (4, 2048, 4, False),  # 1.1B: 2048x2048, 2560x2048, 2048x5632
    (8, 1024, 4, False),  # 1.1B 11264x2048; 7B 12288x4096, 22016x4096
    (8, 1024, 4, True),  # 7B 4096x4096
    (4, 2048, 2, False),  # 7B 4096x11008, 4096x4096
    (8, 1024, 1, False),  # 7B 12288x4096
    (2, 2048, 2, False),  # 1.1B 2560x2048, 2048x2048, 2048x5632 (the wide sweep)
    (4, 1024, 1, False),  # 7B 22016x4096 (the wide sweep)
]


def _switch(environ, name: str) -> bool | None:
    """The ``0`` / ``1`` environment setting ``name``, or ``None`` where it is unset or blank."""
    value = choice(name, ("0", "1"), None, environ)
    return None if value is None else value == "1"


# The config of INT4_INTERLEAVED each fused linear of a 1.1B and a 7B Llama ran fastest with on an
# H100, its weight streamed from HBM as a decode step reads it (the tenth run's sweep,
# bench/bench_gemv.py --wide-int4): by (N, K), the rows of the stack and its inputs. The autotuner
# times a layer alone, its weight in L2, and its picks cost up to 4 us a layer more at 2048x5632
# in that sweep, and differ from call to call: one fold's 1.1B step measured 1.018 ms in one call
# and 1.139 ms in the next. These shapes run their pinned config with no timing; others autotune.
# A fifth field, True, sets SPREAD (a program's rows in each thread's registers, its input loaded
# once): 1.1B's down with it took 412 to 415 us of the 88-linear stack against 428 (two-row
# programs), and a decode step 0.670 ms against 0.683, the same tokens (H100, one call each).
INT4_INTERLEAVED_PINNED: dict[str, dict[tuple[int, int], tuple]] = {
    "H100": {
        (2560, 2048): (2, 2048, 2, False),  # 1.1B q/k/v
        (2048, 2048): (2, 2048, 2, False),  # 1.1B o
        (11264, 2048): (8, 1024, 4, False),  # 1.1B gate/up
        (2048, 5632): (8, 2048, 8, False, True),  # 1.1B down, SPREAD (the twenty-fourth run)
        (12288, 4096): (8, 1024, 1, False),  # 7B q/k/v
        (4096, 4096): (4, 2048, 2, False),  # 7B o
        (22016, 4096): (4, 1024, 1, False),  # 7B gate/up
        (4096, 11008): (4, 2048, 2, False),  # 7B down
    }
}


def pinned_setting(environ=os.environ) -> bool:
    """``QUANTCORE_TRITON_PINNED``: on unless ``0``, which autotunes every shape (to compare)."""
    return _switch(environ, "QUANTCORE_TRITON_PINNED") is not False


PINNED = pinned_setting()


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _pinned(n: int, k: int, device: torch.device) -> triton.Config | None:
    """The pinned interleaved config of an ``n x k`` weight on ``device``, or ``None`` (autotune)."""
    if not PINNED or device.type != "cuda":
        return None
    name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
    for card, shapes in INT4_INTERLEAVED_PINNED.items():
        if card in name and (n, k) in shapes:
            block_n, block_k, warps, prefetch, *spread = shapes[n, k]
            config = {"BLOCK_N": block_n, "BLOCK_K": block_k, "PREFETCH": prefetch}
            if spread and spread[0]:  # a fifth field: the rows in each thread's registers
                config["SPREAD"] = True
            return triton.Config(config, num_warps=warps, num_stages=1)
    return None


def _prune_interleaved(configs, named_args, **kwargs):
    """The interleaved kernels' configs: those that hold whole groups (see :func:`_prune_groups`),
    or the one pinned for the weight's shape on this card (:data:`INT4_INTERLEAVED_PINNED`)."""
    kept = _prune_groups(configs, named_args, **kwargs)
    x = named_args.get("x_ptr")
    pinned = _pinned(named_args["N"], named_args["K"], x.device) if isinstance(x, torch.Tensor) else None
    if pinned is not None and pinned.kwargs["BLOCK_K"] % kwargs.get("GROUP", named_args.get("GROUP")) == 0:
        return [pinned]
    return kept


# The bits of 2.0**23, an argument of the interleaved kernel: a constant would make ``(w & m) | c``
# two logic instructions (ptxas takes one immediate a LOP3); a value known only at run time sits in
# a register and the pair becomes one LOP3.
INT4_MAGIC = 0x4B000000


@triton.jit
def _offset_nibble(magic, word, SHIFT: tl.constexpr):
    """The code in bits ``SHIFT .. SHIFT+3`` of ``word`` masked in place into the mantissa of
    ``2**(23 - SHIFT)`` (``magic``'s exponent less ``SHIFT``): the float ``2**(23 - SHIFT) + code``,
    exactly, its offset left for the caller to take off a sum (one LOP3 a code, no add)."""
    return ((word & (0xF << SHIFT)) | (magic - (SHIFT << 23))).to(tl.float32, bitcast=True)


@triton.jit
def _interleaved_params(sz_ptr, rn, n_mask, g, groups, stride_sn, zero_offset):
    """The scales and zero points of groups ``g`` of rows ``rn``, ``[len(g), len(rn)]`` in fp32."""
    params = rn[None, :] * stride_sn + g[:, None]
    params_mask = n_mask[None, :] & (g < groups)[:, None]
    s = tl.load(sz_ptr + params, mask=params_mask, other=0.0).to(tl.float32)
    z = tl.load(sz_ptr + zero_offset + params, mask=params_mask, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _interleaved_input_tile(pairs, g, rj, mask, GROUP: tl.constexpr, BF16: tl.constexpr):
    """The eight inputs a tile's words (groups ``g``, words ``rj`` of a group) meet, each
    ``[len(g), len(rj)]`` in fp32: byte ``i`` of a word meets inputs ``2i`` and ``2i + 1`` of its
    pair run (``x_{2i}``, ``x_{2i+1}``), four runs of 32-bit pairs loaded like the words."""
    pair = pairs + g[:, None] * (GROUP // 2) + rj[None, :]  # byte i's pair: + i * WPG
    return _pair_runs(pair, mask, GROUP // 8, BF16)


@triton.jit
def _pair_runs(pair, mask, WPG: tl.constexpr, BF16: tl.constexpr):
    """The eight inputs the words at ``pair``'s places meet (fp32, ``pair``'s shape each): four
    32-bit pairs, ``WPG`` (a group's words a row) apart, the first at ``pair``."""
    x0, x1 = _pair_to_float(tl.load(pair, mask=mask, other=0), BF16)
    x2, x3 = _pair_to_float(tl.load(pair + WPG, mask=mask, other=0), BF16)
    x4, x5 = _pair_to_float(tl.load(pair + 2 * WPG, mask=mask, other=0), BF16)
    x6, x7 = _pair_to_float(tl.load(pair + 3 * WPG, mask=mask, other=0), BF16)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _before_the_wait(ptr, never, w0, w1, w2, w3, w4, w5, w6, w7):
    """Make the compilers compute ``w0 .. w7`` before ``griddepcontrol.wait``: a store of their
    bits' XOR that never happens (``never`` false at run time, unknown when compiling) and that
    no compiler moves past the wait, as neither moves memory accesses across it. Otherwise both
    sink the arithmetic to its first use after the wait (LLVM) or hoist the wait above it (ptxas).
    Three LOP3s and a predicated-off store a thread's element."""
    bits = (w0.to(tl.int32, bitcast=True) ^ w1.to(tl.int32, bitcast=True)) ^ (
        w2.to(tl.int32, bitcast=True) ^ w3.to(tl.int32, bitcast=True)
    )
    bits ^= (w4.to(tl.int32, bitcast=True) ^ w5.to(tl.int32, bitcast=True)) ^ (
        w6.to(tl.int32, bitcast=True) ^ w7.to(tl.int32, bitcast=True)
    )
    tl.store(ptr, bits.to(tl.uint32, bitcast=True), mask=never)


@triton.jit
def _dequantized_tile(word, s3, z3, magic):
    """A tile's words as the fp32 weights ``s * (q - z)`` they hold, in the order of the inputs
    they meet (:func:`_interleaved_input_tile`), ``s3`` and ``z3`` the scales and zero points
    broadcast to the words' shape: a LOP3 and one fused multiply-add a weight,
    ``(M + q) * s - (M + z) * s`` rounded once (``M`` the code's offset, its product with ``s``
    rounded before). None of it needs the input: under a programmatic launch it runs before the
    wait, and only the products are left after it."""
    c12 = -(2048.0 + z3) * s3  # codes at bit 12: offset 2**11
    c16 = -(128.0 + z3) * s3  # codes at bit 16: offset 2**7
    left8 = (word << 8) | (word >> 24)
    right8 = (word >> 8) | (word << 24)
    half = (word >> 16) | (word << 16)
    w0 = _offset_nibble(magic, half, 16) * s3 + c16
    w1 = _offset_nibble(magic, left8, 12) * s3 + c12
    w2 = _offset_nibble(magic, left8, 16) * s3 + c16
    w3 = _offset_nibble(magic, word, 12) * s3 + c12
    w4 = _offset_nibble(magic, word, 16) * s3 + c16
    w5 = _offset_nibble(magic, right8, 12) * s3 + c12
    w6 = _offset_nibble(magic, right8, 16) * s3 + c16
    w7 = _offset_nibble(magic, half, 12) * s3 + c12
    return w0, w1, w2, w3, w4, w5, w6, w7


@triton.jit
def _tile_products(w0, w1, w2, w3, w4, w5, w6, w7, x0, x1, x2, x3, x4, x5, x6, x7):
    """A dequantized tile's products with its inputs (broadcast to the words' shape), summed in
    input order: one fused multiply-add a weight."""
    acc = w0 * x0
    acc += w1 * x1
    acc += w2 * x2
    acc += w3 * x3
    acc += w4 * x4
    acc += w5 * x5
    acc += w6 * x6
    acc += w7 * x7
    return acc


@triton.jit
def _interleaved_rows(
    x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, USE_GDC: tl.constexpr,
    PRE: tl.constexpr, early_ptr, EARLY: tl.constexpr,
):  # fmt: skip
    """The interleaved int4 one-row kernels' sums (see :func:`_int4_interleaved_kernel`): the fp32
    dot products of the input with the weight rows ``rn`` (``n_mask``: those that exist), and
    :func:`_early_load`'s value. ``PRE`` (with ``USE_GDC``): the first tile dequantized before the
    wait (:func:`_dequantized_tile`)."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    WPG: tl.constexpr = GROUP // 8  # words a group, a row
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    rg = tl.arange(0, GROUPS)
    rj = tl.arange(0, WPG)
    words = K // 8
    groups = K // GROUP
    w32 = w_ptr.to(tl.pointer_type(tl.uint32))
    pairs = x_ptr.to(tl.pointer_type(tl.int32))
    row = rn[None, :, None] * stride_wn
    first = rg[:, None] * WPG + rj[None, :]  # [GROUPS, WPG]: word index in a row, the first tile
    if PRE:  # the first tile's products alone after the wait; the loop takes the rest
        start: tl.constexpr = BLOCK_K
        first_mask = first < words
        word = tl.load(w32 + row + first[:, None, :], mask=n_mask[None, :, None] & first_mask[:, None, :], other=0)
        s, z = _interleaved_params(sz_ptr, rn, n_mask, rg, groups, stride_sn, zero_offset)
        w0, w1, w2, w3, w4, w5, w6, w7 = _dequantized_tile(word, s[:, :, None], z[:, :, None], magic)
        if USE_GDC:  # computed before the wait, not sunk past it to their uses
            _before_the_wait(w32 + row + first[:, None, :], K < 0, w0, w1, w2, w3, w4, w5, w6, w7)
        _gdc_wait(USE_GDC)
        early = _early_load(early_ptr, EARLY)
        x0, x1, x2, x3, x4, x5, x6, x7 = _interleaved_input_tile(pairs, rg, rj, first_mask, GROUP, BF16)
        acc = _tile_products(
            w0, w1, w2, w3, w4, w5, w6, w7,
            x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :],
            x4[:, None, :], x5[:, None, :], x6[:, None, :], x7[:, None, :],
        )  # fmt: skip
    else:
        start: tl.constexpr = 0
        acc = tl.zeros((GROUPS, BLOCK_N, WPG), dtype=tl.float32)
        if not USE_GDC:  # no wait: stream order
            early = _early_load(early_ptr, EARLY)
    if PREFETCH:
        ahead = first + start // 8
        word = tl.load(w32 + row + ahead[:, None, :], mask=n_mask[None, :, None] & (ahead < words)[:, None, :], other=0)
    for k0 in range(start, K, BLOCK_K):
        g = k0 // GROUP + rg
        col = first + k0 // 8
        col_mask = col < words
        if PREFETCH:  # the next tile's loads in flight during this one's arithmetic
            ahead = col + BLOCK_K // 8
            upcoming = tl.load(
                w32 + row + ahead[:, None, :], mask=n_mask[None, :, None] & (ahead < words)[:, None, :], other=0
            )
        else:
            word = tl.load(w32 + row + col[:, None, :], mask=n_mask[None, :, None] & col_mask[:, None, :], other=0)
        if USE_GDC:  # programmatic launch: the first tile's words, scales and zero points load before the wait
            s, z = _interleaved_params(sz_ptr, rn, n_mask, g, groups, stride_sn, zero_offset)
            if k0 == 0:
                _gdc_wait(USE_GDC)
        x0, x1, x2, x3, x4, x5, x6, x7 = _interleaved_input_tile(pairs, g, rj, col_mask, GROUP, BF16)
        even = (x0 + x2) + (x4 + x6)  # codes at bit 16: offset 2**7
        odd = (x1 + x3) + (x5 + x7)  # codes at bit 12: offset 2**11
        if not USE_GDC:
            s, z = _interleaved_params(sz_ptr, rn, n_mask, g, groups, stride_sn, zero_offset)
        # The sum starts at -(z * sum_i x_i + sum_i M_i x_i): no subtraction after it.
        t = z[:, :, None] * (-(even + odd))[:, None, :] - (odd * 2048.0 + even * 128.0)[:, None, :]
        left8 = (word << 8) | (word >> 24)
        right8 = (word >> 8) | (word << 24)
        half = (word >> 16) | (word << 16)
        t += _offset_nibble(magic, word, 12) * x3[:, None, :]
        t += _offset_nibble(magic, word, 16) * x4[:, None, :]
        t += _offset_nibble(magic, left8, 12) * x1[:, None, :]
        t += _offset_nibble(magic, left8, 16) * x2[:, None, :]
        t += _offset_nibble(magic, right8, 12) * x5[:, None, :]
        t += _offset_nibble(magic, right8, 16) * x6[:, None, :]
        t += _offset_nibble(magic, half, 12) * x7[:, None, :]
        t += _offset_nibble(magic, half, 16) * x0[:, None, :]
        acc += s[:, :, None] * t
        if PREFETCH:
            word = upcoming
    _gdc_done(USE_GDC)
    if not PRE and USE_GDC:  # the wait was in the loop
        early = _early_load(early_ptr, EARLY)
    return tl.sum(tl.sum(acc, axis=2), axis=0), early


@triton.jit
def _norm_scaled(out, sq, K, eps):
    """Sums ``out`` of a folded RMS norm's input ``g * h`` scaled by ``rsqrt(sum(h**2) / K + eps)``,
    ``sum(h**2)`` the counter's fixed point ``sq`` (units of 2**-24, :mod:`._fold`)."""
    return out * tl.math.rsqrt(sq.to(tl.float32) * (1.0 / 16777216.0) / K + eps)


@triton.jit
def _early_load(ptr, EARLY: tl.constexpr):
    """``ptr[0]`` with ``EARLY`` (else 0), loaded as soon as the kernel may read what the kernel
    before wrote: right after the wait, with the first input loads, where a load after the sums
    would add a round trip to every program's end (a norm's counter, :mod:`._fold`)."""
    if EARLY:  # noqa: SIM108 - a constexpr branch: Triton compiles only the one taken
        value = tl.load(ptr)
    else:
        value = 0
    return value


@triton.jit
def _spread_positions(POS: tl.constexpr):
    """The word of a tile each of its ``POS`` positions takes: position ``p`` word
    ``(p % 2) * (POS // 2) + p // 2``. The compiler cannot prove these contiguous, so it gives a
    thread one word a row of a tile (not four, as it does to the contiguous words of
    :func:`_interleaved_rows`), and the threads and warps go along the positions: a tile's rows
    sit in each thread's registers. A warp's 32 positions are two runs of 16 words: its loads stay
    coalesced."""
    p = tl.arange(0, POS)
    return (p % 2) * (POS // 2) + p // 2


@triton.jit
def _spread_tile(
    x_ptr, w_ptr, sz_ptr, row, params_row, n_mask, k0, words, zero_offset, POS: tl.constexpr, WPG: tl.constexpr
):
    """A :func:`_spread_rows` tile from ``k0`` on: its words ``[POS, BLOCK_N]`` and their pointers,
    their scales and zero points (fp32), the input pairs of its positions (``[POS]`` pointers) and
    their mask."""
    col = _spread_positions(POS) + k0 // 8
    col_mask = col < words
    mask = col_mask[:, None] & n_mask[None, :]
    g = col // WPG
    at = w_ptr.to(tl.pointer_type(tl.uint32)) + row + col[:, None]
    word = tl.load(at, mask=mask, other=0)
    params = params_row + g[:, None]
    s = tl.load(sz_ptr + params, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(sz_ptr + zero_offset + params, mask=mask, other=0.0).to(tl.float32)
    # byte i of word (g, j) meets the input pair g * GROUP // 2 + i * WPG + j
    pair = x_ptr.to(tl.pointer_type(tl.int32)) + g * (4 * WPG) + col % WPG
    return word, at, s, z, pair, col_mask


@triton.jit
def _spread_rows(
    x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr, PRE: tl.constexpr,
    early_ptr, EARLY: tl.constexpr,
):  # fmt: skip
    """:func:`_interleaved_rows` with a tile's rows in each thread's registers (``SPREAD``): tiles
    of ``[BLOCK_K // 8, BLOCK_N]`` words, positions along the threads (:func:`_spread_positions`).
    A thread loads the eight inputs of its position once and uses them for every row of the
    program, and no warp loads an input another warp of the program loads: a program of ``BLOCK_N``
    rows pulls in the input once, where ``BLOCK_N // 2`` programs of two rows pull it in as many
    times. The arithmetic a weight is :func:`_interleaved_rows`' (a LOP3 and a multiply-add);
    ``PRE`` dequantizes the first tile before the wait, as there."""
    WPG: tl.constexpr = GROUP // 8  # words a group, a row
    POS: tl.constexpr = BLOCK_K // 8  # words a row, a tile
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    words = K // 8
    row = rn[None, :] * stride_wn
    params_row = rn[None, :] * stride_sn
    if PRE:  # the first tile's weights before the wait, its products alone after it
        start: tl.constexpr = BLOCK_K
        word, at, s, z, pair, col_mask = _spread_tile(
            x_ptr, w_ptr, sz_ptr, row, params_row, n_mask, 0, words, zero_offset, POS, WPG
        )
        w0, w1, w2, w3, w4, w5, w6, w7 = _dequantized_tile(word, s, z, magic)
        if USE_GDC:
            _before_the_wait(at, K < 0, w0, w1, w2, w3, w4, w5, w6, w7)
        _gdc_wait(USE_GDC)
        early = _early_load(early_ptr, EARLY)
        x0, x1, x2, x3, x4, x5, x6, x7 = _pair_runs(pair, col_mask, WPG, BF16)
        acc = _tile_products(
            w0, w1, w2, w3, w4, w5, w6, w7,
            x0[:, None], x1[:, None], x2[:, None], x3[:, None], x4[:, None], x5[:, None], x6[:, None], x7[:, None],
        )  # fmt: skip
    else:
        start: tl.constexpr = 0
        acc = tl.zeros((POS, BLOCK_N), dtype=tl.float32)
        if not USE_GDC:  # no wait: stream order
            early = _early_load(early_ptr, EARLY)
    for k0 in range(start, K, BLOCK_K):
        word, _, s, z, pair, col_mask = _spread_tile(
            x_ptr, w_ptr, sz_ptr, row, params_row, n_mask, k0, words, zero_offset, POS, WPG
        )
        if k0 == 0:
            _gdc_wait(USE_GDC)
        x0, x1, x2, x3, x4, x5, x6, x7 = _pair_runs(pair, col_mask, WPG, BF16)
        even = (x0 + x2) + (x4 + x6)  # codes at bit 16: offset 2**7
        odd = (x1 + x3) + (x5 + x7)  # codes at bit 12: offset 2**11
        t = z * (-(even + odd))[:, None] - (odd * 2048.0 + even * 128.0)[:, None]
        left8 = (word << 8) | (word >> 24)
        right8 = (word >> 8) | (word << 24)
        half = (word >> 16) | (word << 16)
        t += _offset_nibble(magic, word, 12) * x3[:, None]
        t += _offset_nibble(magic, word, 16) * x4[:, None]
        t += _offset_nibble(magic, left8, 12) * x1[:, None]
        t += _offset_nibble(magic, left8, 16) * x2[:, None]
        t += _offset_nibble(magic, right8, 12) * x5[:, None]
        t += _offset_nibble(magic, right8, 16) * x6[:, None]
        t += _offset_nibble(magic, half, 12) * x7[:, None]
        t += _offset_nibble(magic, half, 16) * x0[:, None]
        acc += s * t
    _gdc_done(USE_GDC)
    if not PRE and USE_GDC:  # the wait was in the loop
        early = _early_load(early_ptr, EARLY)
    return tl.sum(acc, axis=0), early


@triton.jit
def _rows(
    x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, USE_GDC: tl.constexpr,
    PRE: tl.constexpr, SPREAD: tl.constexpr, early_ptr, EARLY: tl.constexpr,
):  # fmt: skip
    """The interleaved kernels' sums: :func:`_spread_rows` with ``SPREAD``, else
    :func:`_interleaved_rows`; and :func:`_early_load`'s value (``early_ptr``, ``EARLY``)."""
    if SPREAD:
        out, early = _spread_rows(
            x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
            GROUP, BLOCK_N, BLOCK_K, USE_GDC, PRE, early_ptr, EARLY,
        )  # fmt: skip
    else:
        out, early = _interleaved_rows(
            x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
            GROUP, BLOCK_N, BLOCK_K, PREFETCH, USE_GDC, PRE, early_ptr, EARLY,
        )  # fmt: skip
    return out, early


def interleaved_autotune(key: list[str], restore_value: list[str] | None = None):
    """The interleaved int4 kernels' autotuner: :data:`INT4_INTERLEAVED`'s configs, pruned to the
    pinned one where there is one (:func:`_prune_interleaved`), timed by ``key``; ``restore_value``:
    arguments the kernel adds to, put back after each timing run (Triton times even a single
    config left by the pins, running the kernel many times)."""
    return triton.autotune(
        configs=_configs(INT4_INTERLEAVED, "BLOCK_K", extra=("PREFETCH",)),
        key=key,
        prune_configs_by={"early_config_prune": _prune_interleaved},
        restore_value=restore_value,
    )


@interleaved_autotune(["N", "K", "GROUP", "GATE_UP"])
@triton.jit
def _int4_interleaved_kernel(
    x_ptr,
    w_ptr,
    sz_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    zero_offset,
    magic,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    USE_GDC: tl.constexpr = False,
    GATE_UP: tl.constexpr = False,
    PRE: tl.constexpr = False,
    SPREAD: tl.constexpr = False,
):
    """The int4 one-row kernel on the interleaved layout (``kernels.interleave_int4``): ``K`` a
    multiple of ``GROUP`` (a power of two, 8 or more), ``x`` 4-byte aligned, ``stride_wn`` in words;
    the scales at ``sz_ptr`` (row stride ``stride_sn``), the zero points ``zero_offset`` elements
    after them (one ``[2, N, groups]`` tensor: no per-call views).

    Word ``j`` of a row's group ``g`` holds, in its byte ``i``, the columns
    ``g * GROUP + i * GROUP // 4 + 2j`` (low nibble) and ``+ 1`` (high nibble): the input pairs a
    tile's words need are four contiguous runs, each loaded like the words themselves, so the
    input lands in the registers of the threads that use it, shared by the rows a thread holds
    (where the warps split K, every row of the tile; no shared-memory shuffle then either).

    Every code is masked in place (after a byte rotation) at bit 12 or 16 of a float's mantissa:
    ``2**11 + q`` or ``2**7 + q`` with one LOP3. The offsets are taken off once a word and row,
    with the zero point, where the sum starts: ``s * (-(z * sum_i x_i + sum_i M_i x_i) + sum_i
    (M_i + q_i) x_i)``. A weight costs a LOP3 and a multiply-add. The offsets cost precision: the
    sums carry 1e-5 to 4e-5 of their size in fp32 rounding, well below the rounding of the
    reference path's fp16 / bf16 weight. ``PREFETCH``: the next weight tile loads before this
    one's arithmetic (registers for two tiles). ``GATE_UP``: the weight is a gated MLP's gate and
    up projections stacked, and ``y`` (``N // 2`` wide) gets ``silu(gate) * up`` (see
    :func:`_store_gate_up`).
    """
    rn, n_mask = _tile_rows(N, BLOCK_N, GATE_UP)
    out, _ = _rows(
        x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
        GROUP, BLOCK_N, BLOCK_K, PREFETCH, USE_GDC, PRE, SPREAD, x_ptr, False,
    )  # fmt: skip
    if GATE_UP:
        _store_gate_up(out, b_ptr, y_ptr, rn, n_mask, N, BLOCK_N, HAS_BIAS)
    else:
        _store_row(out, b_ptr, y_ptr, rn, n_mask, HAS_BIAS)


@triton.jit
def _rope_tile_rows(N, ROTATED, HALF: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_int4_interleaved_rope_kernel`'s rows: the first ``ROTATED // BLOCK_N`` programs
    take ``BLOCK_N // 2`` rotary pairs each (rows ``d`` and ``d + HALF`` of a head, alternating),
    the others ``BLOCK_N`` plain rows from ``ROTATED`` on; and the mask of those that exist."""
    r = tl.arange(0, BLOCK_N)
    pid = tl.program_id(0)
    rotated_tiles = ROTATED // BLOCK_N
    j = pid * (BLOCK_N // 2) + r // 2  # the pair
    paired = (j // HALF) * (2 * HALF) + j % HALF + (r % 2) * HALF
    plain = ROTATED + (pid - rotated_tiles) * BLOCK_N + r
    rn = tl.where(pid < rotated_tiles, paired, plain)
    return rn, rn < N


@triton.jit
def _round(x, dtype):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _store_qkv_rope(
    out, b_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, rn, n_mask, NQ, ROTATED, cache_len,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """:func:`_int4_interleaved_rope_kernel`'s epilogue: q and k rows rotated, as transformers'
    ``apply_rotary_pos_emb`` rotates them in eager PyTorch (each product and the sum rounded to the
    output's dtype), q to ``q_ptr``, k and v into the cache at position ``pos_ptr[0]``."""
    dtype = q_ptr.dtype.element_ty
    HEAD: tl.constexpr = 2 * HALF
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    out = _round(out, dtype)  # the projection's output, as the unfused layer writes it
    pos = tl.load(pos_ptr).to(tl.int64)
    inside = (pos >= 0) & (pos < cache_len)  # a full cache is left as it is, never written past
    if tl.program_id(0) < ROTATED // BLOCK_N:
        a, b = tl.split(tl.reshape(out, (BLOCK_N // 2, 2)))  # dims d and d + HALF of a head
        row, _ = tl.split(tl.reshape(rn, (BLOCK_N // 2, 2)))
        d = row % HEAD
        c1 = tl.load(cos_ptr + d).to(tl.float32)
        c2 = tl.load(cos_ptr + d + HALF).to(tl.float32)
        s1 = tl.load(sin_ptr + d).to(tl.float32)
        s2 = tl.load(sin_ptr + d + HALF).to(tl.float32)
        # q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-q2, q1)
        first = _round(_round(a * c1, dtype) - _round(b * s1, dtype), dtype).to(dtype)
        second = _round(_round(b * c2, dtype) + _round(a * s2, dtype), dtype).to(dtype)
        is_q = row < NQ
        kv = (row - NQ).to(tl.int64)
        k_at = (kv // HEAD) * cache_len * HEAD + pos * HEAD + kv % HEAD
        tl.store(q_ptr + row, first, mask=is_q)
        tl.store(q_ptr + row + HALF, second, mask=is_q)
        tl.store(k_ptr + k_at, first, mask=(row >= NQ) & inside)
        tl.store(k_ptr + k_at + HALF, second, mask=(row >= NQ) & inside)
    else:
        v = (rn - ROTATED).to(tl.int64)
        tl.store(v_ptr + (v // HEAD) * cache_len * HEAD + pos * HEAD + v % HEAD, out.to(dtype), mask=n_mask & inside)


@interleaved_autotune(["N", "K", "GROUP", "NQ", "ROTATED"])
@triton.jit
def _int4_interleaved_rope_kernel(
    x_ptr,
    w_ptr,
    sz_ptr,
    b_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    N,
    K,
    stride_wn,
    stride_sn,
    zero_offset,
    magic,
    NQ,
    ROTATED,
    cache_len,
    sq_ptr,
    eps,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    USE_GDC: tl.constexpr = False,
    PRE: tl.constexpr = False,
    SPREAD: tl.constexpr = False,
    NORM: tl.constexpr = False,
):
    """An attention's q, k and v projections stacked (``NQ`` q rows, then k's, then v's, ``N`` in
    all; ``ROTATED``: q's and k's) on the interleaved int4 layout (see
    :func:`_int4_interleaved_kernel`), for one token: q and k rotated by the rotary embedding
    ``cos_ptr`` / ``sin_ptr`` (``2 * HALF`` values, a head's), q written to ``q_ptr``, k and v
    into a static cache's ``[1, heads, cache_len, 2 * HALF]`` tensors at the position
    ``pos_ptr[0]`` (none where it is past the cache): the rotation and the cache writes of a decode
    step in the projection's epilogue. ``NORM``: the input is ``g * h`` and the sums are scaled by
    the RMS norm's ``rsqrt(sum(h**2) / K + eps)``, ``sum(h**2)`` in fixed point at ``sq_ptr``
    (:mod:`._fold`); without it ``sq_ptr`` and ``eps`` are not read."""
    rn, n_mask = _rope_tile_rows(N, ROTATED, HALF, BLOCK_N)
    out, sq = _rows(
        x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
        GROUP, BLOCK_N, BLOCK_K, PREFETCH, USE_GDC, PRE, SPREAD, sq_ptr, NORM,
    )  # fmt: skip
    if NORM:
        out = _norm_scaled(out, sq, K, eps)
    _store_qkv_rope(
        out, b_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, rn, n_mask, NQ, ROTATED, cache_len,
        HALF, BLOCK_N, HAS_BIAS,
    )  # fmt: skip


@triton.autotune(configs=_configs(INT8_ROW, "BLOCK_K"), key=["N", "K", "NQ", "ROTATED"])
@triton.jit
def _int8_rope_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, N, K, stride_wn, NQ, ROTATED,
    cache_len, sq_ptr, eps, HAS_BIAS: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr = False, NORM: tl.constexpr = False,
):  # fmt: skip
    """:func:`_int4_interleaved_rope_kernel` on an int8 weight (``w [N, K]``, ``scale [N]``, the
    stacked q/k/v rows of :func:`_int8_row_kernel`'s storage): the sums of the int8 one-row
    kernel, then the same epilogue (q and k rotated, q written out, k and v into the static cache
    at ``pos_ptr[0]``). ``NORM``: the input is ``g * h``, the sums scaled by the RMS norm from the
    counter at ``sq_ptr`` (:mod:`._fold`); without it ``sq_ptr`` and ``eps`` are not read."""
    rn, n_mask = _rope_tile_rows(N, ROTATED, HALF, BLOCK_N)
    out = _int8_rows(x_ptr, w_ptr, s_ptr, rn, n_mask, K, stride_wn, BLOCK_N, BLOCK_K, USE_GDC, False)
    if NORM:
        out = _norm_scaled(out, tl.load(sq_ptr), K, eps)
    _store_qkv_rope(
        out, b_ptr, q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, rn, n_mask, NQ, ROTATED, cache_len,
        HALF, BLOCK_N, HAS_BIAS,
    )  # fmt: skip


@triton.autotune(configs=_configs(_INT8_DOT, "BLOCK_K", stages=3), key=["M", "N", "K"])
@triton.jit
def _int8_dot_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Several rows: ``tl.dot`` on the int8 tile cast to the activation dtype (int8 codes are exact in
    fp16 / bf16), the scale applied to the fp32 sums."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        xt = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=n_mask[None, :] & (kk[:, None] < K), other=0)
        acc += tl.dot(xt, w.to(xt.dtype))
    out = acc * tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    _store_rows(out, b_ptr, y_ptr, rm, rn, m_mask, n_mask, N, HAS_BIAS)


@triton.autotune(configs=_configs(_INT4_DOT, "GROUPS_PER_BLOCK", stages=3), key=["M", "N", "K", "GROUP"])
@triton.jit
def _int4_dot_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_wn,
    stride_sn,
    row_bytes,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS_PER_BLOCK: tl.constexpr,
):
    """Several rows: the int4 tile dequantized in registers, rounded to the activation dtype as the
    reference path's weight is, then ``tl.dot``."""
    BLOCK_K: tl.constexpr = GROUP * GROUPS_PER_BLOCK
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = rn < N
    m_mask = rm < M
    rb = tl.arange(0, BLOCK_K // 2)
    rg = tl.arange(0, GROUPS_PER_BLOCK)
    rk = tl.arange(0, BLOCK_K)
    half = row_bytes  # (K + 1) // 2, as an argument: its bytes load 16 at a time (see _int4_dequantize_kernel)
    groups = (K + GROUP - 1) // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        bb = k0 // 2 + rb
        byte = tl.load(
            w_ptr + rn[:, None] * stride_wn + bb[None, :], mask=n_mask[:, None] & (bb[None, :] < half), other=0
        )
        lo, hi = _nibbles_to_float(byte)  # exact, without integer-to-float conversions
        codes = tl.interleave(lo, hi)  # [BLOCK_N, BLOCK_K], column 2j first
        gg = k0 // GROUP + rg
        s, z = _group_params(s_ptr, z_ptr, rn, gg, stride_sn, n_mask[:, None] & (gg[None, :] < groups))
        codes = tl.reshape(codes, (BLOCK_N, GROUPS_PER_BLOCK, GROUP))
        w = tl.reshape((codes - z[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))
        kk = k0 + rk
        xt = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0)
        acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
    _store_rows(acc, b_ptr, y_ptr, rm, rn, m_mask, n_mask, N, HAS_BIAS)


# Dequantizing for the prefill (more rows than the kernels above take, where one float matmul after
# one dequantize wins): one pass, the stored bytes in and the float weight out, against about 23
# bytes a weight moved by the same formula in PyTorch ops through fp32 temporaries. The arithmetic
# is the formula's, in fp32, rounded once: (q - zero) * scale for int4 (a subtraction then a
# product: nothing to contract into an FMA), q * scale for int8.
DEQUANT_BLOCK = (32, 128)  # (rows, columns) a program; int4 takes DEQUANT_INT4_COLUMNS columns


# int4's columns a program: whole groups (a power of two, 2 or more), the bytes read as whole rows of
# a tile, each byte giving two columns' codes, the scales and zero points once per group.
DEQUANT_INT4_COLUMNS = 256


@triton.jit
def _int4_dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, row_bytes,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):  # fmt: skip
    """``out[n, k] = (code[n, k] - zero[n, k // GROUP]) * scale[n, k // GROUP]`` (``out`` contiguous).

    A program reads a ``[BLOCK_N, GROUPS, GROUP // 2]`` tile of bytes (contiguous in each row), makes
    both codes of each byte (the low nibble is the even column), and stores them interleaved.
    ``row_bytes`` (``ceil(K / 2)``, an argument so that Triton knows its divisibility): the bytes'
    mask is constant over 16-byte runs, so they load 16 at a time (masked on ``2 * byte < K``, they
    loaded one by one: 32 one-byte loads a thread for a 32-row tile against 2 now, for sm_90).
    """
    HALF: tl.constexpr = GROUP // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rg = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    col = rg[None, :, None] * HALF + tl.arange(0, HALF)[None, None, :]  # byte columns: contiguous runs
    row_mask = rn < N
    byte_mask = row_mask[:, None, None] & (col < row_bytes)
    byte = tl.load(w_ptr + rn[:, None, None] * stride_wn + col, mask=byte_mask, other=0).to(tl.int32)
    group = rn[:, None] * stride_sn + rg[None, :]
    group_mask = row_mask[:, None] & (rg < tl.cdiv(K, GROUP))[None, :]
    s = tl.load(s_ptr + group, mask=group_mask, other=0.0).to(tl.float32)[:, :, None]
    z = tl.load(z_ptr + group, mask=group_mask, other=0.0).to(tl.float32)[:, :, None]
    low = ((byte & 0x0F).to(tl.float32) - z) * s
    high = ((byte >> 4).to(tl.float32) - z) * s
    w = tl.reshape(tl.join(low, high), (BLOCK_N, GROUPS * GROUP))
    rk = tl.program_id(1) * (GROUPS * GROUP) + tl.arange(0, GROUPS * GROUP)
    mask = row_mask[:, None] & (rk < K)[None, :]
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _int8_dequantize_kernel(
    w_ptr, s_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    """``out[n, k] = q[n, k] * scale[n]`` (``out`` contiguous)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    q = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    w = q * s[:, None]
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def _dequantize(launcher, inputs: tuple, strides: tuple, shape: tuple, dtype, block: tuple, constexprs: dict):
    """Run a dequantize kernel (``inputs..., out, N, K, strides...``) into a new contiguous ``out``,
    ``block = (rows, columns)`` a program; a kept kernel launches straight (see :class:`_Launcher`)."""
    n, k = shape
    out = torch.empty((n, k), dtype=dtype, device=inputs[0].device)
    args = (*inputs, out, n, k, *strides)
    # What the compiled kernel was specialized on: sizes, strides, dtypes, 16-byte alignment.
    key = (out.device.index, n, k, *strides, dtype, *constexprs.values())
    key += tuple((t.dtype, t.data_ptr() % 16 == 0) for t in inputs)
    if launcher.run_kept(key, args):
        return out
    grid = (triton.cdiv(n, block[0]), triton.cdiv(k, block[1]))
    _eager(launcher, key, out, lambda meta: grid, args, constexprs)
    return out


def int4_dequantize_takes(group_size: int) -> bool:
    """Whether :func:`_int4_dequantize_kernel` takes this group size: a power of two, 2 or more (its tile)."""
    return group_size >= 2 and not group_size & (group_size - 1)


def int4_dequantize_groups(group_size: int) -> int:
    """Groups a program of :func:`_int4_dequantize_kernel` takes; ``ValueError`` for a group size it
    does not take (:func:`int4_dequantize_takes`)."""
    if not int4_dequantize_takes(group_size):
        raise ValueError(f"the int4 dequantize kernel takes groups of a power of two, 2 or more, not {group_size}")
    return max(1, DEQUANT_INT4_COLUMNS // group_size)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int, dtype
) -> torch.Tensor:
    """:func:`quantcore_torch.packing.dequantize_int4` in one kernel: the same bits."""
    groups = int4_dequantize_groups(group_size)
    scale, zero = scale.contiguous(), zero.contiguous()
    block_n = DEQUANT_BLOCK[0]
    strides = (packed.stride(0), scale.stride(0), (in_features + 1) // 2)
    return _dequantize(
        _DEQUANTIZE.int4, (packed, scale, zero), strides, (packed.shape[0], in_features),
        dtype, (block_n, groups * group_size), {"GROUP": group_size, "BLOCK_N": block_n, "GROUPS": groups},
    )  # fmt: skip


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype) -> torch.Tensor:
    """:func:`quantcore_torch.packing.dequantize_int8` in one kernel: the same bits."""
    block_n, block_k = DEQUANT_BLOCK
    return _dequantize(
        _DEQUANTIZE.int8, (qweight, scale.contiguous()), (qweight.stride(0),), qweight.shape, dtype,
        DEQUANT_BLOCK, {"BLOCK_N": block_n, "BLOCK_K": block_k},
    )  # fmt: skip


def _launch_hooks_unset() -> bool:
    """Whether no Triton launch hook (a profiler's) is installed: the direct launch passes none."""
    runtime = _RUNTIME
    if runtime is None:
        return False
    return _no_hook(runtime.launch_enter_hook) and _no_hook(runtime.launch_exit_hook)


# Triton's runtime knobs (3.4+), where launch hooks are installed; None in older Tritons.
_RUNTIME = getattr(getattr(triton, "knobs", None), "runtime", None)


def _no_hook(hook) -> bool:
    # Triton 3.4 and older: None or a callable. Triton 3.5+: a HookChain, empty unless a hook was
    # added (its launch paths call it whatever it holds; an empty one does nothing).
    if hook is None:
        return True
    calls = getattr(hook, "calls", None)
    return isinstance(calls, list) and not calls


# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
# kernel before it in the stream finishes. The one-row kernels then load their first weight tile
# (the interleaved int4 ones its scales and zero points too) before ``gdc_wait`` (which waits for
# the kernel before to complete and flush) and read the input after it. Weights must not be written
# by the kernel just before, which holds inside a captured CUDA graph of a decode step (weights are
# written outside it) but not in eager code (loading or quantizing a weight, then a forward): so the
# launch is programmatic only while a CUDA graph is captured. It pays only beside inductor's own
# programmatic launches (``TORCHINDUCTOR_ENABLE_PDL=1``), whose kernels let the next one start
# early: on an H100, a compiled 1.1B Llama int8 decode step took 1.37 ms with ours alone against
# 1.33 ms without, 1.21-1.23 ms with both against 1.31 ms with inductor's alone
# (docs/benchmarks.md). So it follows inductor's setting, read from the environment once (a per-call
# read of inductor's config would cost eager calls about 2 us each). The q/k/v rotary kernel and the
# decode attention's two (quantcore_torch._attention) launch so too. With both settings an int4 1.1B
# Llama's folded step took 0.727 against 0.772 ms, but a 7B one's 2.557 against 2.489 ms (fifteenth
# run): off unless asked for. With the scales before the wait, the 1.1B step took 0.714 against
# 0.760 ms (eighteenth run).
def pdl_setting(environ=os.environ) -> bool:
    """``QUANTCORE_TRITON_PDL`` (``1`` or ``0``) where set, else inductor's ``TORCHINDUCTOR_ENABLE_PDL``."""
    ours = _switch(environ, "QUANTCORE_TRITON_PDL")
    return ours if ours is not None else environ.get("TORCHINDUCTOR_ENABLE_PDL", "0") == "1"


PDL = pdl_setting()


# One trigger everywhere had a best per model size: early with the first tile dequantized before
# the wait at 1.1B (1,453.8 against 1,403.0 tok/s late), late at 7B (422.5 against 407.8 early;
# twentieth run). auto picks per kernel and matched each: 1.1B 1,467.7 against 1,468.0, 7B 420.1
# against 415.8 late (twenty-first run, H100, the step in its own CUDA graph).
def pdl_trigger_setting(environ=os.environ) -> str:
    """``QUANTCORE_TRITON_PDL_TRIGGER``: where a programmatic kernel lets the next one launch,
    ``late`` (after its weight is read and summed), ``early`` (right after its wait), or ``auto``
    (the default): early, dequantizing its first tile before the wait, for an int4 kernel whose
    first tile fits :data:`PRE_WEIGHTS` (a 1.1B-class model's), early for the decode attention's,
    late for every other kernel (:func:`programmatic_choice`)."""
    return choice("QUANTCORE_TRITON_PDL_TRIGGER", ("auto", "late", "early"), "auto", environ)


PDL_TRIGGER = pdl_trigger_setting()


def programmatic_use_gdc(early_under_auto: bool = False) -> int:
    """The ``USE_GDC`` a programmatic variant compiles with under ``PDL_TRIGGER``: 2 (the next
    kernel launched right after the wait) for ``early``, 1 (after the kernel's work) for ``late``;
    under ``auto``, 2 where ``early_under_auto`` (see :func:`programmatic_choice`), else 1."""
    if PDL_TRIGGER == "auto":
        return 2 if early_under_auto else 1
    return 2 if PDL_TRIGGER == "early" else 1


def programmatic_choice(small_tile: bool, auto_early: bool = False) -> tuple[int, bool]:
    """A programmatic variant's ``USE_GDC`` and ``PRE``: ``small_tile``, an interleaved int4
    config whose first tile fits :func:`pre_fits`; ``auto_early``, a kernel that triggers early
    under ``auto`` whatever its tile (the decode attention's: 1.1B's step took 0.712-0.713 ms with
    them late, 0.686-0.687 early, the int4 kernels early with ``PRE`` both times; twenty-first
    run). Under ``auto`` an int4 kernel triggers early where it dequantizes before the wait."""
    pre = dequantizes_first(small_tile)
    return programmatic_use_gdc(auto_early or pre), pre


def dequantizes_first(small_tile: bool) -> bool:
    """Whether a programmatic interleaved int4 kernel dequantizes its first tile before the wait:
    only a tile within :data:`PRE_WEIGHTS` (``small_tile``), where ``QUANTCORE_TRITON_PDL_PRE=1``
    asks for it or, unset, under the ``auto`` trigger (which pairs it with the early trigger)."""
    return small_tile and (PDL_PRE is True or (PDL_PRE is None and PDL_TRIGGER == "auto"))


# With the early trigger, dequantizing the first tile before the wait took a compiled int4 1.1B
# Llama's step on an H100 from 0.719-0.721 ms (the late trigger without it) to 0.693-0.695 ms, but a
# 7B one's from 2.440 to 3.023 ms; with the late trigger it lost at 1.1B too (0.754 ms). The
# dequantized tile takes eight registers a word where the codes took one, so fewer programs wait
# beside the running kernel; 7B's pinned tiles spilled. The nineteenth run in docs/benchmarks.md;
# since the twentieth only for tiles within PRE_WEIGHTS, and since the twenty-first what the auto
# trigger does for those tiles.
def pdl_pre_setting(environ=os.environ) -> bool | None:
    """``QUANTCORE_TRITON_PDL_PRE``: whether a programmatic interleaved int4 kernel dequantizes its
    first weight tile before it waits (``1``), leaving only the input's products after the wait,
    where the tile fits :data:`PRE_WEIGHTS` (:func:`pre_fits`); ``0`` never; unset (``None``), as
    the trigger says: under ``auto`` yes, under ``late`` or ``early`` no. Its sums round otherwise
    than the plain launch's (a captured graph's logits differ from eager ones in the last bits)."""
    return _switch(environ, "QUANTCORE_TRITON_PDL_PRE")


PDL_PRE = pdl_pre_setting()

# The most weights a thread may hold in its first tile for PDL_PRE to apply: dequantized, a tile
# takes a register a weight where its codes took one a word of eight. Offline on sm_90, with the
# early trigger, 64 a thread (the 1.1B pins: 2x2048 on 2 warps, 8x1024 on 4) go from 67-70 to 94
# registers; 128 (7B's 4x2048 on 2 warps, 4x1024 on 1) from 93 to 229-234, and 256 (7B's q/k/v,
# 8x1024 on 1) from 153 to 253 (the cap is 255) with 93 spill stores (python bench/wait_split.py,
# then with --pre). That is what lost at 7B.
PRE_WEIGHTS = 64


def pre_fits(block_n: int, block_k: int, num_warps: int) -> bool:
    """Whether an interleaved config's first tile is small enough to dequantize before the wait
    (:data:`PRE_WEIGHTS` weights a thread at most); a larger one launches as without ``PDL_PRE``."""
    return block_n * block_k <= PRE_WEIGHTS * 32 * num_warps


# Every launcher, so that a changed PDL_TRIGGER can drop the programmatic variants built before.
_LAUNCHERS: list[_Launcher] = []


def forget_pdl_variants() -> None:
    """Drop every kept programmatic variant: the next call outside capture compiles it again
    (after ``PDL_TRIGGER`` changed)."""
    for launcher in _LAUNCHERS:
        launcher.compiled = {key: hit._replace(pdl=None) for key, hit in launcher.compiled.items()}


class _Entry(NamedTuple):
    """A key's compiled kernel, its grid and its constexpr arguments; ``pdl``: the same config
    compiled for programmatic dependent launch (``(kernel, constexprs)``), ``False`` where the GPU
    has none, ``None`` until built."""

    compiled: object
    grid0: int
    grid1: int
    tail: tuple
    pdl: tuple | bool | None = None


class _Launcher:
    """Launches an autotuned kernel from eager PyTorch at the cost of Triton's C launcher.

    The first call of a key (device, shapes, dtypes) goes through the autotuner, which times the
    configs once and returns the compiled kernel of the best; that kernel, its grid and the
    constexpr values are kept. Later calls pass the arguments straight to the compiled kernel's
    ``run``, in the kernel's parameter order, as ``JITFunction.run`` itself does after its
    argument binding. Where this Triton's compiled kernels do not look as expected, or a launch
    hook (a profiler) is installed, every call takes the autotuner's path.

    ``pdl``: the kernel takes ``USE_GDC`` (see ``PDL``). Its programmatic variant is compiled
    outside graph capture (the first call with ``PDL`` on), and launched while a graph is captured.
    """

    def __init__(self, kernel, pdl: bool = False, auto_early: bool = False) -> None:
        self.kernel = kernel
        self.compiled: dict[tuple, _Entry] = {}
        self.direct = os.environ.get("QUANTCORE_TRITON_DIRECT", "1") != "0"
        self.pdl = pdl
        self.auto_early = auto_early
        _LAUNCHERS.append(self)

    def run_kept(self, key: tuple, args: tuple) -> bool:
        """Launch ``key``'s kept kernel, if there is one, ``key[0]`` (its device) is the current
        device and nothing stands in the way (no launch hook; this Triton's launcher as expected):
        whether it launched.

        The eager fast path: a kept key costs a dict lookup, the stream and Triton's C launcher."""
        hit = self.compiled.get(key) if self.direct else None
        if hit is None or key[0] != torch._C._cuda_getDevice() or not _launch_hooks_unset():
            return False
        compiled, tail = self._variant(key, hit, args) if self.pdl_wanted else (hit.compiled, hit.tail)
        stream = torch._C._cuda_getCurrentRawStream(key[0])
        try:
            compiled.run(
                hit.grid0, hit.grid1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                *args, *tail,
            )  # fmt: skip
        except TypeError:  # this Triton's launcher takes other arguments (raised before launching)
            self.direct = False
            return False
        return True

    @property
    def pdl_wanted(self) -> bool:
        return self.pdl and PDL

    def __call__(self, key: tuple, grid, args: tuple, constexprs: dict) -> None:
        if self.run_kept(key, args):
            return
        hit = self.compiled.get(key) if self.direct else None
        compiled = self.kernel[grid](*args, **constexprs)
        if self.direct and hit is None:
            self._keep(key, grid, args, constexprs, compiled)
            if key in self.compiled:  # outside capture, the programmatic variant is built now
                self._variant(key, self.compiled[key], args)

    def _variant(self, key: tuple, hit: _Entry, args: tuple) -> tuple:
        """The kernel to launch and its constexprs: with ``PDL``, the programmatic variant while a
        CUDA graph is captured (compiled on a call outside capture, ready for the next capture)."""
        if self.pdl_wanted:
            if torch.cuda.is_current_stream_capturing():
                if hit.pdl:
                    return hit.pdl
            elif hit.pdl is None:
                self._keep_pdl(key, hit, args)
        return hit.compiled, hit.tail

    @property
    def jit(self):
        """The kernel's ``JITFunction`` (an autotuned kernel's ``fn``)."""
        return self.kernel.fn if isinstance(self.kernel, triton.runtime.Autotuner) else self.kernel

    def _keep(self, key: tuple, grid, args: tuple, constexprs: dict, compiled) -> None:
        try:
            tuned = self.kernel.best_config.kwargs if isinstance(self.kernel, triton.runtime.Autotuner) else {}
            meta = {**constexprs, **tuned}
            tail = self._tail(meta, args)
            grid0, grid1 = grid(meta)
            compiled = _ready(compiled)
        except Exception:  # another Triton: stay on the autotuner's path
            self.direct = False
            return
        self.compiled[key] = _Entry(compiled, grid0, grid1, tail)

    def _tail(self, meta: dict, args: tuple) -> tuple:
        """The constexpr arguments after ``args``, in the kernel's parameter order: ``meta``'s, or
        the kernel's defaults for those neither the call nor the config sets (``SPREAD``, which
        only a config sets)."""
        parameters = inspect.signature(self.jit.fn).parameters.values()
        defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        return tuple(meta[name] if name in meta else defaults[name] for name in self.jit.arg_names[len(args) :])

    def _keep_pdl(self, key: tuple, hit: _Entry, args: tuple) -> None:
        """Compile the kept config of ``key`` again with ``USE_GDC`` and a programmatic launch."""
        variant: tuple | bool = False
        if torch.cuda.get_device_capability(key[0])[0] >= 9:
            try:  # the kept kernel's config: its constexprs (tail) and its compile options
                names = self.jit.arg_names[len(args) :]
                meta = dict(zip(names, hit.tail, strict=True))
                kept = hit.compiled.metadata
                small = "PRE" in names and pre_fits(meta["BLOCK_N"], meta["BLOCK_K"], kept.num_warps)
                meta["USE_GDC"], pre = programmatic_choice(small, self.auto_early)
                if "PRE" in names:
                    meta["PRE"] = pre
                options = {"num_warps": kept.num_warps, "num_stages": kept.num_stages, "launch_pdl": True}
                compiled = self.jit.warmup(*args, grid=(hit.grid0, hit.grid1), **meta, **options)
                variant = (_ready(compiled), self._tail(meta, args))
            except Exception:  # this Triton cannot: launch as before
                variant = False
        self.compiled[key] = hit._replace(pdl=variant)


def _ready(compiled):
    """A compiled kernel with its CUDA handles loaded (checks it has what a direct launch needs)."""
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    compiled._init_handles()
    compiled.function, compiled.packed_metadata, compiled.run  # noqa: B018 - all three must exist
    return compiled


class _Kernels(NamedTuple):
    """A format's two kernels: ``row`` for one row of ``x`` (batch-1 decode), ``dot`` for more
    (and for one row the row kernel cannot take: odd K where ``row_needs_even_k``)."""

    row: _Launcher
    dot: _Launcher
    row_needs_even_k: bool
    row_constexprs: dict  # the one-row kernel's own constexprs, as a plain launch sets them


_INT8 = _Kernels(
    _Launcher(_int8_row_kernel, pdl=True),
    _Launcher(_int8_dot_kernel),
    row_needs_even_k=False,
    row_constexprs={"USE_GDC": False, "GLU": False, "GATE_UP": False},
)
# The int4 row kernel reads the input as 32-bit pairs (_int4_launch gives it an aligned one).
_INT4 = _Kernels(
    _Launcher(_int4_row_kernel, pdl=True),
    _Launcher(_int4_dot_kernel),
    row_needs_even_k=True,
    row_constexprs={"USE_GDC": False},
)


class _Dequantize(NamedTuple):
    """The dequantize kernels' launchers (the prefill path)."""

    int8: _Launcher
    int4: _Launcher


_DEQUANTIZE = _Dequantize(_Launcher(_int8_dequantize_kernel), _Launcher(_int4_dequantize_kernel))


def _launch(
    kernels: _Kernels,
    x: torch.Tensor,
    inputs: tuple,
    n: int,
    strides: tuple,
    key: tuple,
    constexprs: dict,
    glu: bool = False,
    gate_up: bool = False,
):
    """Run a format's kernel on ``x [..., K]`` (contiguous): the kernels share their output and size
    arguments (``inputs..., y, [M,] N, K, strides...``); the one-row kernel has no ``M``. ``glu``:
    ``x [..., 2K]`` holds a gated MLP's gate and up halves; ``gate_up``: the weight's rows are a
    gated MLP's gate then up projections and ``y`` gets ``silu(gate) * up`` (``N // 2`` wide): both
    for the one-row kernel (one row only)."""
    width = x.shape[-1]
    k = width // 2 if glu else width
    m = x.numel() // width
    if m == 1 and not (kernels.row_needs_even_k and k % 2):
        row = kernels.row_constexprs
        if glu or gate_up:
            row = {**row, "GLU": glu, "GATE_UP": gate_up}  # the int8 kernel's: the only one with them
        return _launch_row(kernels.row, x, inputs, n, k, strides, (*key, m), constexprs, row, gate_up)
    if glu or gate_up:
        raise ValueError(f"the gated {'input' if glu else 'output'} runs one row at a time, got {m} rows")
    y = x.new_empty((*x.shape[:-1], n))
    block_m = 16 if m <= 16 else 32
    args = (*inputs, y, m, n, k, *strides)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))

    _eager(kernels.dot, (*key, m), x, grid, args, {**constexprs, "BLOCK_M": block_m})  # key[0]: the device
    return y


def _launch_row(
    launcher: _Launcher,
    x: torch.Tensor,
    inputs: tuple,
    n: int,
    k: int,
    strides: tuple,
    key: tuple,
    constexprs: dict,
    row: dict,
    gate_up: bool = False,
) -> torch.Tensor:
    """One row through a one-row kernel (``inputs..., y, N, K, strides...``): the kept kernel
    launched straight (every call after a shape's first, on the current device), else the
    autotuner with ``constexprs`` and the kernel's own ``row`` constexprs (merged only then).
    ``gate_up``: ``y`` is ``N // 2`` wide (see :func:`_launch`)."""
    y = x.new_empty((*x.shape[:-1], n // 2 if gate_up else n))
    args = (*inputs, y, n, k, *strides)
    if not launcher.run_kept(key, args):
        _eager(launcher, key, x, _row_grid(n, gate_up), args, {**constexprs, **row})
    return y


def _row_grid(n: int, gate_up: bool):
    """A one-row kernel's grid for ``n`` weight rows: ``BLOCK_N`` of them a program, or with
    ``gate_up`` ``BLOCK_N // 2`` gate rows and as many up rows (see ``_tile_rows``)."""
    if gate_up:
        return lambda meta: (triton.cdiv(n // 2, meta["BLOCK_N"] // 2), 1)
    return lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), 1)


def _check_gate_up(n: int) -> None:
    if n % 2:
        raise ValueError(f"a gated MLP's stacked gate and up projections have an even number of rows, got {n}")


def _int8_launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    glu: bool = False,
    gate_up: bool = False,
):
    if gate_up:
        _check_gate_up(qweight.shape[0])
    inputs = (x, qweight, scale, scale if bias is None else bias)
    key = (*_key(x, qweight, scale, bias), glu, gate_up)
    constexprs = {"HAS_BIAS": bias is not None}
    return _launch(_INT8, x, inputs, qweight.shape[0], (qweight.stride(0),), key, constexprs, glu, gate_up)


def _int4_launch(x, packed, scale, zero, group_size: int, bias):
    k = x.shape[-1]
    if x.numel() == k and k % 2 == 0 and x.data_ptr() % 4:
        # The byte kernel reads the input as 32-bit pairs: an input off a 4-byte boundary gets
        # an aligned copy (not the several-row kernel, whose sums round differently).
        x = x.clone()
    inputs = (x, packed, scale, zero, scale if bias is None else bias)
    key = (*_key(x, packed, scale, bias), zero.dtype, zero.data_ptr() % 16 == 0, group_size)
    constexprs = {"GROUP": group_size, "HAS_BIAS": bias is not None}
    strides = (packed.stride(0), scale.stride(0), (k + 1) // 2)
    return _launch(_INT4, x, inputs, packed.shape[0], strides, key, constexprs)


_INT4_INTERLEAVED = _Launcher(_int4_interleaved_kernel, pdl=True)
# Its own constexprs, as a plain launch sets them, by GATE_UP.
_INTERLEAVED_ROW = {gate_up: {"USE_GDC": False, "GATE_UP": gate_up, "PRE": False} for gate_up in (False, True)}


def _interleaved_input(x, words, scales_and_zeros, group_size: int):
    """``x`` as the interleaved int4 kernels read it (4-byte aligned: they load the input as 32-bit
    pairs), after refusing a weight (``words``, ``scales_and_zeros [2, N, groups]``) it does not fit."""
    k = x.shape[-1]
    sz_shape = scales_and_zeros.shape
    if words.shape[1] * 8 != k or sz_shape[2] * group_size != k or sz_shape[1] != words.shape[0]:
        raise ValueError(
            f"an interleaved int4 weight of {words.shape[1] * 8} inputs and {tuple(sz_shape)} scales "
            f"and zero points does not fit an input of {k} features in groups of {group_size}"
        )
    return x.clone() if x.data_ptr() % 4 else x


def _int4_interleaved_launch(
    x, words, scales_and_zeros, group_size: int, bias, gate_up: bool = False,
    launcher: _Launcher | None = None, extra: tuple = (), tag: tuple = ("interleaved",),
):  # fmt: skip
    """One row ``x [..., K]`` (contiguous) through :func:`_int4_interleaved_kernel` (``gate_up``: see
    :func:`_launch`), or through ``launcher``'s kernel of the same parameters plus ``extra``
    arguments after ``magic`` (``tag`` tells its compiled kernels apart: ``._fold``'s norm kernel)."""
    k = x.shape[-1]
    x = _interleaved_input(x, words, scales_and_zeros, group_size)
    sz = scales_and_zeros
    n = words.shape[0]
    if gate_up:
        _check_gate_up(n)
    inputs = (x, words, sz, sz if bias is None else bias)
    strides = (words.stride(0), sz.stride(1), sz.stride(0), INT4_MAGIC, *extra)
    key = (*_key(x, words, sz, bias), group_size, *tag, gate_up)
    constexprs = {"GROUP": group_size, "HAS_BIAS": bias is not None}
    row = _INTERLEAVED_ROW[gate_up]
    return _launch_row(launcher or _INT4_INTERLEAVED, x, inputs, n, k, strides, key, constexprs, row, gate_up)


_INT4_INTERLEAVED_ROPE = _Launcher(_int4_interleaved_rope_kernel, pdl=True)


def qkv_rope_mismatch(x, n: int, cos, sin, keys, values, position, q_features: int) -> str | None:
    """Why :func:`int4_interleaved_qkv_rope` cannot take these (``n``: the weight's rows), or ``None``."""
    problems = []
    if x.numel() != x.shape[-1]:
        problems.append(f"one token, got an input of shape {tuple(x.shape)}")
    head = keys.shape[-1] if keys.dim() == 4 else 0
    if keys.dim() != 4 or keys.shape[0] != 1 or values.shape != keys.shape:
        shapes = f"{tuple(keys.shape)}, {tuple(values.shape)}"
        problems.append(f"keys and values of one shape [1, heads, length, head_dim], got {shapes}")
    elif head % 16 or q_features % head or q_features + 2 * keys.shape[1] * head != n:
        layout = f"q ({q_features}) then k and v ({keys.shape[1]} heads of {head})"
        problems.append(f"{n} stacked rows as {layout}, head_dim a multiple of 16")
    if not (keys.is_contiguous() and values.is_contiguous()) or keys.dtype != x.dtype or values.dtype != x.dtype:
        problems.append(f"contiguous keys and values in the input's dtype {x.dtype}")
    if head and (cos.numel() != head or sin.numel() != head):
        problems.append(f"cos and sin of one position ({head} values), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if position.numel() != 1 or position.dtype not in (torch.int32, torch.int64):
        problems.append(f"one integer position, got {tuple(position.shape)} {position.dtype}")
    return "the q/k/v rotary kernel needs " + "; ".join(problems) if problems else None


def check_counter(sq: torch.Tensor, x: torch.Tensor) -> None:
    """Refuse a folded norm's counter (:mod:`._fold`) that is not one int64 on ``x``'s device."""
    if sq.dtype != torch.int64 or sq.numel() != 1 or sq.device != x.device:
        raise ValueError(
            f"a norm's counter is one int64 on {x.device}, got {tuple(sq.shape)} {sq.dtype} on {sq.device}"
        )


def _int4_interleaved_rope_launch(
    x, words, sz, group_size: int, bias, cos, sin, keys, values, position, q_features, sq=None, eps: float = 0.0
):  # fmt: skip
    """One token through :func:`_int4_interleaved_rope_kernel`: returns q, writes k and v; ``sq``
    (a norm's counter, :mod:`._fold`): the kernel's ``NORM``, with ``eps``."""
    n = words.shape[0]
    problem = qkv_rope_mismatch(x, n, cos, sin, keys, values, position, q_features)
    if problem is not None:
        raise ValueError(problem)
    x = _interleaved_input(x, words, sz, group_size)
    weight = (words, sz, sz if bias is None else bias)
    strides = (words.stride(0), sz.stride(1), sz.stride(0), INT4_MAGIC)
    key = (*_key(x, words, sz, bias), group_size)
    constexprs = {"GROUP": group_size, "HAS_BIAS": bias is not None, "PRE": False}
    rope = (cos, sin, keys, values, position, q_features, sq, eps)
    return _rope_launch(_INT4_INTERLEAVED_ROPE, x, weight, n, strides, key, constexprs, *rope)


def _rope_launch(
    launcher, x, weight: tuple, n: int, strides: tuple, key: tuple, constexprs: dict,
    cos, sin, keys, values, position, q_features: int, sq, eps: float,
):  # fmt: skip
    """What the q/k/v rotary kernels' launches share, after their checks: ``x`` and the kernel's
    ``weight`` arguments, then q, the cache, cos, sin and the position; the sizes (``n``, K, the
    weight's ``strides``, q's rows, the rotated rows, the cache's length); the counter and
    ``eps``. ``key`` (the weight's part) and ``constexprs`` (the format's) are completed here."""
    cos, sin = cos.reshape(-1), sin.reshape(-1)
    cos, sin = (cos if cos.is_contiguous() else cos.contiguous()), (sin if sin.is_contiguous() else sin.contiguous())
    head = keys.shape[-1]
    rotated = q_features + keys.shape[1] * head
    q = x.new_empty((*x.shape[:-1], q_features))
    if sq is not None:
        check_counter(sq, x)
    inputs = (x, *weight, q, keys, values, cos, sin, position)
    sizes = (n, x.shape[-1], *strides, q_features, rotated, keys.shape[2])
    args = (*inputs, *sizes, position if sq is None else sq, float(eps))
    aligned = tuple(t.data_ptr() % 16 == 0 for t in (keys, values, cos, sin, position))
    norm = None if sq is None else sq.data_ptr() % 16 == 0
    key = (*key, "rope", q_features, *keys.shape, cos.dtype, position.dtype, *aligned, norm)
    if not launcher.run_kept(key, args):
        constexprs = {**constexprs, "HALF": head // 2, "USE_GDC": False, "NORM": sq is not None}
        _eager(launcher, key, x, _row_grid(n, False), args, constexprs)
    return q


_INT8_ROPE = _Launcher(_int8_rope_kernel, pdl=True)


def _int8_rope_launch(
    x, qweight, scale, bias, cos, sin, keys, values, position, q_features: int, sq=None, eps: float = 0.0
):  # fmt: skip
    """One token through :func:`_int8_rope_kernel`: returns q, writes k and v; ``sq`` (a norm's
    counter, :mod:`._fold`): the kernel's ``NORM``, with ``eps``."""
    n = qweight.shape[0]
    problem = qkv_rope_mismatch(x, n, cos, sin, keys, values, position, q_features)
    if problem is not None or (problem := int8_weight_mismatch(x, qweight, scale)) is not None:
        raise ValueError(problem)
    weight = (qweight, scale, scale if bias is None else bias)
    key = _key(x, qweight, scale, bias)
    constexprs = {"HAS_BIAS": bias is not None}
    rope = (cos, sin, keys, values, position, q_features, sq, eps)
    return _rope_launch(_INT8_ROPE, x, weight, n, (qweight.stride(0),), key, constexprs, *rope)


def int8_weight_mismatch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why an int8 weight (``qweight [N, K]``, a scale a row) does not fit the input ``x``, or ``None``."""
    if qweight.dim() != 2 or qweight.shape[1] != x.shape[-1] or scale.numel() != qweight.shape[0]:
        return (
            f"an int8 weight of {x.shape[-1]} inputs and a scale a row, got {tuple(qweight.shape)}, "
            f"{tuple(scale.shape)}"
        )
    return None


def _key(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """What a compiled kernel was specialized on (with ``M``): sizes, dtypes, the pointers' 16-byte alignment."""
    aligned = (x.data_ptr() % 16 == 0, weight.data_ptr() % 16 == 0, scale.data_ptr() % 16 == 0)
    if bias is not None:
        aligned += (bias.data_ptr() % 16 == 0, bias.dtype)
    return (x.device.index, *weight.shape, x.shape[-1], x.dtype, scale.dtype, *aligned)


def _eager(launcher: _Launcher, key: tuple, x: torch.Tensor, grid, args: tuple, constexprs: dict) -> None:
    # Triton launches on the current device: a layer placed on another GPU (device maps) switches to it.
    if x.device.index == torch.cuda.current_device():
        launcher(key, grid, args, constexprs)
    else:
        with torch.cuda.device(x.device):
            launcher(key, grid, args, constexprs)


# Flexible layout, for the ops whose inputs every layer of a step shares (cos and sin, the
# attention's mask): inductor hands them the buffers it has, so such an input is computed once a
# step. Under the default exact-strides constraint inductor copies each call's input, and a
# shared input of a few ops is recomputed for every layer, in a kernel of its own where the
# consumer is one of these ops.
_TAGS = (
    {"tags": (torch.Tag.flexible_layout,)}
    if hasattr(torch.Tag, "flexible_layout") and "tags" in inspect.signature(torch.library.custom_op).parameters
    else {}
)


@torch.library.custom_op("quantcore_torch::int8_mm", mutates_args=())
def _int8_mm_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _int8_launch(x.contiguous(), qweight, scale, bias)


@_int8_mm_op.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("quantcore_torch::int8_glu_mm", mutates_args=())
def _int8_glu_mm_op(
    h: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _int8_launch(h.contiguous(), qweight, scale, bias, glu=True)


@_int8_glu_mm_op.register_fake
def _(h, qweight, scale, bias):
    return h.new_empty((*h.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("quantcore_torch::int8_gate_up_mm", mutates_args=())
def _int8_gate_up_mm_op(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _int8_launch(x.contiguous(), qweight, scale, bias, gate_up=True)


@_int8_gate_up_mm_op.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))


@torch.library.custom_op("quantcore_torch::int4_mm", mutates_args=())
def _int4_mm_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return _int4_launch(x.contiguous(), packed, scale.contiguous(), zero.contiguous(), group_size, bias)


@_int4_mm_op.register_fake
def _(x, packed, scale, zero, group_size, bias):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("quantcore_torch::int4_interleaved_mm", mutates_args=())
def _int4_interleaved_mm_op(
    x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    return _int4_interleaved_launch(x.contiguous(), words, scales_and_zeros, group_size, bias)


@_int4_interleaved_mm_op.register_fake
def _(x, words, scales_and_zeros, group_size, bias):
    return x.new_empty((*x.shape[:-1], words.shape[0]))


@torch.library.custom_op("quantcore_torch::int4_interleaved_gate_up_mm", mutates_args=())
def _int4_interleaved_gate_up_mm_op(
    x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    return _int4_interleaved_launch(x.contiguous(), words, scales_and_zeros, group_size, bias, gate_up=True)


@_int4_interleaved_gate_up_mm_op.register_fake
def _(x, words, scales_and_zeros, group_size, bias):
    return x.new_empty((*x.shape[:-1], words.shape[0] // 2))


@torch.library.custom_op("quantcore_torch::int4_interleaved_qkv_rope", mutates_args=("keys", "values"), **_TAGS)
def _int4_interleaved_qkv_rope_op(
    x: torch.Tensor,
    words: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: torch.Tensor,
    q_features: int,
    sq: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    return _int4_interleaved_rope_launch(
        x.contiguous(), words, scales_and_zeros, group_size, bias, cos, sin, keys, values, position, q_features, sq, eps
    )


@_int4_interleaved_qkv_rope_op.register_fake
def _(x, words, scales_and_zeros, group_size, bias, cos, sin, keys, values, position, q_features, sq=None, eps=0.0):
    return x.new_empty((*x.shape[:-1], q_features))


@torch.library.custom_op("quantcore_torch::int8_qkv_rope", mutates_args=("keys", "values"), **_TAGS)
def _int8_qkv_rope_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: torch.Tensor,
    q_features: int,
    sq: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    return _int8_rope_launch(
        x.contiguous(), qweight, scale, bias, cos, sin, keys, values, position, q_features, sq, eps
    )


@_int8_qkv_rope_op.register_fake
def _(x, qweight, scale, bias, cos, sin, keys, values, position, q_features, sq=None, eps=0.0):
    return x.new_empty((*x.shape[:-1], q_features))


def int8_qkv_rope(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: torch.Tensor,
    q_features: int,
    sq: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """:func:`int4_interleaved_qkv_rope` on an int8 weight (``qweight [N, K]``, ``scale [N]``): the
    stacked q/k/v projections of one token with the rotary embedding and the static cache's
    writes in the kernel's epilogue; returns q rotated, writes k rotated and v at ``position[0]``.
    ``sq``: ``x`` is ``g * h`` and the sums take the RMS norm's scale from this counter."""
    if torch.compiler.is_compiling():
        return _int8_qkv_rope_op(x, qweight, scale, bias, cos, sin, keys, values, position, q_features, sq, eps)
    return _int8_rope_launch(
        x if x.is_contiguous() else x.contiguous(), qweight, scale, bias, cos, sin, keys, values, position,
        q_features, sq, eps,
    )  # fmt: skip


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ (qweight [N, K] * scale[:, None]).T + bias``, in ``x.dtype`` (fp16 / bf16).

    From eager code the kernel launches directly; under ``torch.compile`` this is the custom op.
    """
    if torch.compiler.is_compiling():
        return _int8_mm_op(x, qweight, scale, bias)
    return _int8_launch(x if x.is_contiguous() else x.contiguous(), qweight, scale, bias)


def int8_glu_mm(h: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(silu(gate) * up) @ (qweight [N, K] * scale[:, None]).T + bias`` for one row ``h [..., 2K]``
    holding ``gate`` then ``up`` (a fused gate/up projection's output): a gated MLP's activation
    folded into its down projection's kernel, one launch fewer. ``silu`` and the product round to
    ``h.dtype`` (fp16 / bf16) as eager PyTorch rounds them."""
    if torch.compiler.is_compiling():
        return _int8_glu_mm_op(h, qweight, scale, bias)
    return _int8_launch(h if h.is_contiguous() else h.contiguous(), qweight, scale, bias, glu=True)


def int8_gate_up_mm(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``silu(gate) * up`` for one row ``x`` and a gated MLP's gate and up projections stacked in
    ``qweight [N, K]`` (gate rows first): :func:`int8_mm`'s ``[..., N]`` output halved in the
    kernel's epilogue, ``[..., N // 2]``, rounded as the unfused projections and activation round."""
    if torch.compiler.is_compiling():
        return _int8_gate_up_mm_op(x, qweight, scale, bias)
    return _int8_launch(x if x.is_contiguous() else x.contiguous(), qweight, scale, bias, gate_up=True)


def int4_mm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x [..., K] @ W.T + bias`` with ``W = (q - zero) * scale`` from packed int4 codes, in ``x.dtype``."""
    if torch.compiler.is_compiling():
        return _int4_mm_op(x, packed, scale, zero, group_size, bias)
    # The kernel reads scales and zero points with one row stride (no copies for module buffers).
    if not scale.is_contiguous():
        scale = scale.contiguous()
    if not zero.is_contiguous():
        zero = zero.contiguous()
    return _int4_launch(x if x.is_contiguous() else x.contiguous(), packed, scale, zero, group_size, bias)


def int4_interleaved_mm(
    x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """One row ``x [..., K]`` (``K`` a multiple of ``group_size``) times an int4 weight in the
    interleaved layout (``words`` and ``scales_and_zeros [2, N, groups]``, contiguous:
    :func:`quantcore_torch.kernels.int4_interleaved_layout`), in ``x.dtype`` (fp16 / bf16)."""
    if torch.compiler.is_compiling():
        return _int4_interleaved_mm_op(x, words, scales_and_zeros, group_size, bias)
    return _int4_interleaved_launch(
        x if x.is_contiguous() else x.contiguous(), words, scales_and_zeros, group_size, bias
    )


def int4_interleaved_gate_up_mm(
    x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """:func:`int4_interleaved_mm` on a gated MLP's gate and up projections stacked (gate rows
    first), returning ``silu(gate) * up`` (``[..., N // 2]``) from the kernel's epilogue (see
    :func:`int8_gate_up_mm`)."""
    if torch.compiler.is_compiling():
        return _int4_interleaved_gate_up_mm_op(x, words, scales_and_zeros, group_size, bias)
    return _int4_interleaved_launch(
        x if x.is_contiguous() else x.contiguous(), words, scales_and_zeros, group_size, bias, gate_up=True
    )


def int4_interleaved_qkv_rope(
    x: torch.Tensor,
    words: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: torch.Tensor,
    q_features: int,
    sq: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """An attention's stacked q/k/v projections (:func:`int4_interleaved_mm`'s weight: ``q_features``
    q rows, then k's, then v's) for one token ``x``, with a decode step's rotary embedding and
    static-cache writes in the kernel's epilogue: returns q (``[..., q_features]``) rotated by
    ``cos`` and ``sin`` (one position's, a head's width), and writes k rotated and v into ``keys``
    and ``values`` (``[1, kv_heads, length, head_dim]``, contiguous) at ``position[0]``.
    The rotation rounds as transformers' ``apply_rotary_pos_emb`` does in eager PyTorch. ``sq``:
    ``x`` is ``g * h`` and the sums take the RMS norm's scale from this counter and ``eps``
    (:func:`quantcore_torch._fold.int4_interleaved_norm_mm`)."""
    if torch.compiler.is_compiling():
        return _int4_interleaved_qkv_rope_op(
            x, words, scales_and_zeros, group_size, bias, cos, sin, keys, values, position, q_features, sq, eps
        )
    return _int4_interleaved_rope_launch(
        x if x.is_contiguous() else x.contiguous(), words, scales_and_zeros, group_size, bias,
        cos, sin, keys, values, position, q_features, sq, eps,
    )  # fmt: skip
