"""A decoder layer's RMS norms and residual adds in the interleaved int4 kernels, with no work a
weight for them: the kernels that end a block (``o_proj``, ``down_proj``) add the residual and
prepare the next norm's input, the kernels that start one (q/k/v, gate/up) scale their sums.

An RMS norm before a linear is ``W (g * h * r) = r * (W (g * h))``, with ``r = rsqrt(mean(h**2) +
eps)`` one scalar a token. So the kernel that writes ``h`` (the residual add) also writes
``g * h`` (the norm's weight applied) and adds its rows' share of ``sum(h**2)`` to one counter; the
next kernel reads ``g * h`` as its input, as it reads any input, and multiplies its sums by ``r``
from the counter. Neither kernel does anything more per input or per weight: an earlier fold
(the eleventh run in docs/benchmarks.md) applied the norm's weight and summed the squares in the
consumer's main loop, which cost as much as the launches it saved.

The counter is an int64 fixed-point sum (``SUMSQ_SCALE`` units of 2**-24): integer additions
commute, so the sum, and every output, is the same whatever order the programs add in (a float
atomic's would not be). The fixed point resolves 6e-8 and holds sums to 5e11, a hidden state of
7e5 in one feature. A counter must be zero when its block starts adding: the kernel that reads it
cannot clear it (its other programs may not have read it yet), so a later kernel, whose wait
follows the reader's end, clears it (``clear``).

The rounding is the unfused layer's where it can be: the projection's output, the residual sum
and ``g * h`` round to the activation's dtype as transformers' eager ops round them; ``r``
multiplies the fp32 sums instead of the input before the product, a difference within the
dtype's rounding. It imports where :mod:`._triton` does (Triton installed). A decoder layer runs
it through ``fuse_projections(norms=True)`` (:mod:`quantcore_torch.fusion`); a stack's first
layer makes its input and sum in PyTorch (:mod:`quantcore_torch.rms`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import (
    INT4_MAGIC,
    INT8_ROW,
    _check_gate_up,
    _configs,
    _int4_interleaved_launch,
    _int8_rows,
    _interleaved_input,
    _key,
    _launch_row,
    _Launcher,
    _norm_scaled,
    _rows,
    _store_gate_up,
    _store_row,
    _tile_rows,
    check_counter,
    int8_weight_mismatch,
    interleaved_autotune,
)
from .rms import SUMSQ_SCALE, sumsq_counter

__all__ = [
    "SUMSQ_SCALE",
    "int4_interleaved_norm_mm",
    "int4_interleaved_residual_mm",
    "int8_norm_mm",
    "int8_residual_mm",
    "sumsq_counter",
]


@triton.jit
def _store_residual(
    out, b_ptr, h, gain, y_ptr, xn_ptr, sq_ptr, clear_ptr, rn, n_mask, HAS_BIAS: tl.constexpr
):  # fmt: skip
    """The residual kernel's epilogue: ``y = h + (out + bias)`` (the projection's output and the
    sum rounded to ``y``'s dtype), ``xn = gain * y`` rounded so too, ``sum(y**2)`` of the program's
    rows added to ``sq_ptr`` in fixed point; the first program clears ``clear_ptr``."""
    dtype = y_ptr.dtype.element_ty
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    out = out.to(dtype).to(tl.float32)  # the projection's output, as the unfused layer writes it
    y = (h.to(tl.float32) + out).to(dtype)
    tl.store(y_ptr + rn, y, mask=n_mask)
    y = y.to(tl.float32)
    tl.store(xn_ptr + rn, (gain.to(tl.float32) * y).to(dtype), mask=n_mask)
    part = tl.sum(tl.where(n_mask, y * y, 0.0), axis=0)
    tl.atomic_add(sq_ptr, (part * 16777216.0).to(tl.int64), sem="relaxed")
    if tl.program_id(0) == 0:
        tl.store(clear_ptr, 0)


# The autotuner runs a kernel many times to time it (even a single config left by the pins):
# the counters are put back after, or each timing run's sums would add up in them.
@interleaved_autotune(["N", "K", "GROUP"], restore_value=["sq_ptr", "clear_ptr"])
@triton.jit
def _int4_interleaved_residual_kernel(
    x_ptr, w_ptr, sz_ptr, b_ptr, h_ptr, g_ptr, xn_ptr, sq_ptr, clear_ptr, y_ptr,
    N, K, stride_wn, stride_sn, zero_offset, magic,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr = False, USE_GDC: tl.constexpr = False, PRE: tl.constexpr = False,
    SPREAD: tl.constexpr = False,
):  # fmt: skip
    """The interleaved int4 kernel (``_triton._int4_interleaved_kernel``) of a block's last
    projection: ``y = h + x W^T`` and the next norm's input and sum of squares
    (:func:`_store_residual`). The residual ``h`` and the norm's weight load with the weight,
    before a programmatic launch's wait: ``h`` must not be written by the kernel just before
    (in a decoder layer, two or more kernels write between a block's residual and its end)."""
    rn, n_mask = _tile_rows(N, BLOCK_N, False)
    h = tl.load(h_ptr + rn, mask=n_mask, other=0.0)
    gain = tl.load(g_ptr + rn, mask=n_mask, other=0.0)
    out, _ = _rows(
        x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
        GROUP, BLOCK_N, BLOCK_K, PREFETCH, USE_GDC, PRE, SPREAD, x_ptr, False,
    )  # fmt: skip
    _store_residual(out, b_ptr, h, gain, y_ptr, xn_ptr, sq_ptr, clear_ptr, rn, n_mask, HAS_BIAS)


@interleaved_autotune(["N", "K", "GROUP", "GATE_UP"])
@triton.jit
def _int4_interleaved_norm_kernel(
    x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, N, K, stride_wn, stride_sn, zero_offset, magic, sq_ptr, eps,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr = False, USE_GDC: tl.constexpr = False, GATE_UP: tl.constexpr = False,
    PRE: tl.constexpr = False, SPREAD: tl.constexpr = False,
):  # fmt: skip
    """The interleaved int4 kernel of a block's first projection, its input ``g * h`` (written by
    :func:`_int4_interleaved_residual_kernel`): the sums times ``rsqrt(sum(h**2) / K + eps)``,
    the sum from ``sq_ptr`` (loaded with the first input, :func:`_triton._early_load`), before the
    bias and the epilogue (``GATE_UP``: ``silu(gate) * up``)."""
    rn, n_mask = _tile_rows(N, BLOCK_N, GATE_UP)
    out, sq = _rows(
        x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
        GROUP, BLOCK_N, BLOCK_K, PREFETCH, USE_GDC, PRE, SPREAD, sq_ptr, True,
    )  # fmt: skip
    out = _norm_scaled(out, sq, K, eps)
    if GATE_UP:
        _store_gate_up(out, b_ptr, y_ptr, rn, n_mask, N, BLOCK_N, HAS_BIAS)
    else:
        _store_row(out, b_ptr, y_ptr, rn, n_mask, HAS_BIAS)


@triton.autotune(
    configs=_configs(INT8_ROW, "BLOCK_K"), key=["N", "K"], restore_value=["sq_ptr", "clear_ptr"]
)  # the counters put back after each timing run, as for the int4 kernel
@triton.jit
def _int8_residual_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, h_ptr, g_ptr, xn_ptr, sq_ptr, clear_ptr, y_ptr, N, K, stride_wn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr = False,
):  # fmt: skip
    """:func:`_int4_interleaved_residual_kernel` on an int8 weight (``_triton._int8_row_kernel``'s
    sums): ``y = h + x W^T``, the next norm's input and its sum of squares (:func:`_store_residual`)."""
    rn, n_mask = _tile_rows(N, BLOCK_N, False)
    h = tl.load(h_ptr + rn, mask=n_mask, other=0.0)
    gain = tl.load(g_ptr + rn, mask=n_mask, other=0.0)
    out = _int8_rows(x_ptr, w_ptr, s_ptr, rn, n_mask, K, stride_wn, BLOCK_N, BLOCK_K, USE_GDC, False)
    _store_residual(out, b_ptr, h, gain, y_ptr, xn_ptr, sq_ptr, clear_ptr, rn, n_mask, HAS_BIAS)


@triton.autotune(configs=_configs(INT8_ROW, "BLOCK_K"), key=["N", "K", "GATE_UP"])
@triton.jit
def _int8_norm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, stride_wn, sq_ptr, eps,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr = False,
    GATE_UP: tl.constexpr = False,
):  # fmt: skip
    """:func:`_int4_interleaved_norm_kernel` on an int8 weight: the sums of ``g * h`` times
    ``rsqrt(sum(h**2) / K + eps)`` (the sum at ``sq_ptr``, read after the wait the sums start
    with), then the bias and the epilogue (``GATE_UP``: ``silu(gate) * up``)."""
    rn, n_mask = _tile_rows(N, BLOCK_N, GATE_UP)
    out = _int8_rows(x_ptr, w_ptr, s_ptr, rn, n_mask, K, stride_wn, BLOCK_N, BLOCK_K, USE_GDC, False)
    out = _norm_scaled(out, tl.load(sq_ptr), K, eps)
    if GATE_UP:
        _store_gate_up(out, b_ptr, y_ptr, rn, n_mask, N, BLOCK_N, HAS_BIAS)
    else:
        _store_row(out, b_ptr, y_ptr, rn, n_mask, HAS_BIAS)


_NORM = _Launcher(_int4_interleaved_norm_kernel, pdl=True)
_RESIDUAL = _Launcher(_int4_interleaved_residual_kernel, pdl=True)
_NORM8 = _Launcher(_int8_norm_kernel, pdl=True)
_RESIDUAL8 = _Launcher(_int8_residual_kernel, pdl=True)


def int4_interleaved_norm_mm(
    x: torch.Tensor, words, scales_and_zeros, group_size: int, bias, sq: torch.Tensor, eps: float, gate_up: bool = False
) -> torch.Tensor:
    """One token's ``g * h`` (``x``) through an interleaved int4 weight, as ``rms_norm(h) W^T``:
    the sums scaled by ``rsqrt(sum(h**2) / K + eps)``, ``sum(h**2)`` in ``sq``
    (:func:`sumsq_counter`). ``gate_up``: a gated MLP's stacked gate and up, ``silu(gate) * up``.
    Under ``torch.compile``, the custom op ``quantcore_torch::int4_interleaved_norm_mm``."""
    if torch.compiler.is_compiling():
        return _norm_op(x, words, scales_and_zeros, group_size, bias, sq, eps, gate_up)
    return _norm_launch(
        x if x.is_contiguous() else x.contiguous(), words, scales_and_zeros, group_size, bias, sq, eps, gate_up
    )


def _norm_launch(x, words, scales_and_zeros, group_size: int, bias, sq, eps: float, gate_up: bool) -> torch.Tensor:
    """:func:`int4_interleaved_norm_mm` for a contiguous ``x``: the interleaved kernel's launch,
    the counter and ``eps`` after its arguments."""
    check_counter(sq, x)
    tag = ("norm", sq.data_ptr() % 16 == 0)
    return _int4_interleaved_launch(
        x, words, scales_and_zeros, group_size, bias, gate_up, launcher=_NORM, extra=(sq, float(eps)), tag=tag
    )


def int4_interleaved_residual_mm(
    x: torch.Tensor, words, scales_and_zeros, group_size: int, bias, h: torch.Tensor, gain: torch.Tensor,
    sq: torch.Tensor, clear: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One token through an interleaved int4 weight ending a block: ``(y, gain * y)`` with
    ``y = h + x W^T`` (``h``, ``gain``: ``N`` values, the next norm's weight), ``sum(y**2)`` added
    to ``sq`` (zero before the block's first program adds), ``clear`` set to zero. Under
    ``torch.compile``, the custom op ``quantcore_torch::int4_interleaved_residual_mm`` (mutating
    ``sq`` and ``clear``)."""
    if torch.compiler.is_compiling():
        return _residual_op(x, words, scales_and_zeros, group_size, bias, h, gain, sq, clear)
    return _residual_launch(x, words, scales_and_zeros, group_size, bias, h, gain, sq, clear)


def _residual_launch(x, words, scales_and_zeros, group_size: int, bias, h, gain, sq, clear):
    check_counter(sq, x)
    check_counter(clear, x)
    k = x.shape[-1]
    n = words.shape[0]
    h, gain = _residual_operands(x, n, h, gain)
    x = _interleaved_input(x if x.is_contiguous() else x.contiguous(), words, scales_and_zeros, group_size)
    sz = scales_and_zeros
    xn = x.new_empty((*x.shape[:-1], n))
    inputs = (x, words, sz, sz if bias is None else bias, h, gain, xn, sq, clear)
    strides = (words.stride(0), sz.stride(1), sz.stride(0), INT4_MAGIC)
    aligned = tuple(t.data_ptr() % 16 == 0 for t in (h, gain, xn, sq, clear))
    key = (*_key(x, words, sz, bias), group_size, "residual", gain.dtype, *aligned)
    constexprs = {"GROUP": group_size, "HAS_BIAS": bias is not None}
    row = {"USE_GDC": False, "PRE": False}
    y = _launch_row(_RESIDUAL, x, inputs, n, k, strides, key, constexprs, row)
    return y, xn


def _residual_operands(x: torch.Tensor, n: int, h: torch.Tensor, gain: torch.Tensor) -> tuple:
    """The residual ``h`` and the next norm's weight ``gain`` flat and contiguous, after refusing
    any that is not ``n`` values on ``x``'s device (``h`` in ``x``'s dtype)."""
    if h.numel() != n or gain.numel() != n or h.dtype != x.dtype or h.device != x.device or gain.device != x.device:
        raise ValueError(
            f"the residual and the next norm's weight have the {n} outputs on {x.device}, the residual in "
            f"{x.dtype}; got {tuple(h.shape)} {h.dtype} on {h.device} and {tuple(gain.shape)} on {gain.device}"
        )
    return h.reshape(-1).contiguous(), gain.reshape(-1).contiguous()


@torch.library.custom_op("quantcore_torch::int4_interleaved_norm_mm", mutates_args=())
def _norm_op(
    x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None, sq: torch.Tensor, eps: float, gate_up: bool,
) -> torch.Tensor:  # fmt: skip
    return _norm_launch(x.contiguous(), words, scales_and_zeros, group_size, bias, sq, eps, gate_up)


@_norm_op.register_fake
def _(x, words, scales_and_zeros, group_size, bias, sq, eps, gate_up):
    return x.new_empty((*x.shape[:-1], words.shape[0] // 2 if gate_up else words.shape[0]))


@torch.library.custom_op("quantcore_torch::int4_interleaved_residual_mm", mutates_args=("sq", "clear"))
def _residual_op(
    x: torch.Tensor, words: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
    bias: torch.Tensor | None, h: torch.Tensor, gain: torch.Tensor, sq: torch.Tensor, clear: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return _residual_launch(x.contiguous(), words, scales_and_zeros, group_size, bias, h, gain, sq, clear)


@_residual_op.register_fake
def _(x, words, scales_and_zeros, group_size, bias, h, gain, sq, clear):
    shape = (*x.shape[:-1], words.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


def int8_norm_mm(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias, sq: torch.Tensor, eps: float,
    gate_up: bool = False,
) -> torch.Tensor:  # fmt: skip
    """:func:`int4_interleaved_norm_mm` on an int8 weight (``qweight [N, K]``, ``scale [N]``). Under
    ``torch.compile``, the custom op ``quantcore_torch::int8_norm_mm``."""
    if torch.compiler.is_compiling():
        return _norm8_op(x, qweight, scale, bias, sq, eps, gate_up)
    return _norm8_launch(x if x.is_contiguous() else x.contiguous(), qweight, scale, bias, sq, eps, gate_up)


def _check_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> None:
    problem = int8_weight_mismatch(x, qweight, scale)
    if problem is not None:
        raise ValueError(problem)


def _norm8_launch(x, qweight, scale, bias, sq, eps: float, gate_up: bool) -> torch.Tensor:
    check_counter(sq, x)
    _check_int8(x, qweight, scale)
    n, k = qweight.shape
    if gate_up:
        _check_gate_up(n)
    inputs = (x, qweight, scale, scale if bias is None else bias)
    key = (*_key(x, qweight, scale, bias), "norm8", gate_up, sq.data_ptr() % 16 == 0)
    strides = (qweight.stride(0), sq, float(eps))
    constexprs = {"HAS_BIAS": bias is not None}
    row = {"USE_GDC": False, "GATE_UP": gate_up}
    return _launch_row(_NORM8, x, inputs, n, k, strides, key, constexprs, row, gate_up)


def int8_residual_mm(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias, h: torch.Tensor, gain: torch.Tensor,
    sq: torch.Tensor, clear: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`int4_interleaved_residual_mm` on an int8 weight. Under ``torch.compile``, the custom
    op ``quantcore_torch::int8_residual_mm`` (mutating ``sq`` and ``clear``)."""
    if torch.compiler.is_compiling():
        return _residual8_op(x, qweight, scale, bias, h, gain, sq, clear)
    return _residual8_launch(x, qweight, scale, bias, h, gain, sq, clear)


def _residual8_launch(x, qweight, scale, bias, h, gain, sq, clear):
    x = x if x.is_contiguous() else x.contiguous()
    check_counter(sq, x)
    check_counter(clear, x)
    _check_int8(x, qweight, scale)
    n, k = qweight.shape
    h, gain = _residual_operands(x, n, h, gain)
    xn = x.new_empty((*x.shape[:-1], n))
    inputs = (x, qweight, scale, scale if bias is None else bias, h, gain, xn, sq, clear)
    aligned = tuple(t.data_ptr() % 16 == 0 for t in (h, gain, xn, sq, clear))
    key = (*_key(x, qweight, scale, bias), "residual8", gain.dtype, *aligned)
    constexprs = {"HAS_BIAS": bias is not None}
    y = _launch_row(_RESIDUAL8, x, inputs, n, k, (qweight.stride(0),), key, constexprs, {"USE_GDC": False})
    return y, xn


@torch.library.custom_op("quantcore_torch::int8_norm_mm", mutates_args=())
def _norm8_op(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, sq: torch.Tensor,
    eps: float, gate_up: bool,
) -> torch.Tensor:  # fmt: skip
    return _norm8_launch(x.contiguous(), qweight, scale, bias, sq, eps, gate_up)


@_norm8_op.register_fake
def _(x, qweight, scale, bias, sq, eps, gate_up):
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2 if gate_up else qweight.shape[0]))


@torch.library.custom_op("quantcore_torch::int8_residual_mm", mutates_args=("sq", "clear"))
def _residual8_op(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor,
    gain: torch.Tensor, sq: torch.Tensor, clear: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return _residual8_launch(x.contiguous(), qweight, scale, bias, h, gain, sq, clear)


@_residual8_op.register_fake
def _(x, qweight, scale, bias, h, gain, sq, clear):
    shape = (*x.shape[:-1], qweight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)
