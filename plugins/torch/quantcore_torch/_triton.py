"""Triton kernels for small-batch weight-only matmuls on CUDA (decode), reading the stored tensors.

Imported by :mod:`quantcore_torch.kernels` only where CUDA and Triton exist. Each kernel computes
``y[m, n] = sum_k x[m, k] * w[n, k] + bias[n]`` with ``w`` dequantized in registers, tile by tile,
so the weight crosses memory once in its quantized size. One row (``M == 1``, batch-1 decode)
runs as a reduction over ``[BLOCK_N, BLOCK_K]`` tiles in fp32; more rows run ``tl.dot`` on the
dequantized tile, cast to the activation dtype first exactly as the reference path rounds it.

They are registered as ``torch.library.triton_op``\\ s (``quantcore_torch::int8_mm`` and
``quantcore_torch::int4_mm``), so ``torch.compile(fullgraph=True)`` traces them and CUDA graphs
capture them like any other kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["int4_mm", "int8_mm"]


def _configs(group: bool) -> list[triton.Config]:
    # Few configs, chosen for 1..32 rows: wide N tiles keep enough programs for small N (k/v
    # projections) in flight; BLOCK_K covers whole int4 groups.
    configs = []
    for block_n in (16, 32, 64):
        for block_k in (128, 256) if not group else (1, 2):
            for warps in (4,):
                meta = {"BLOCK_N": block_n, ("GROUPS_PER_BLOCK" if group else "BLOCK_K"): block_k}
                configs.append(triton.Config(meta, num_warps=warps, num_stages=3))
    # Triton's CPU interpreter (how the tests check these kernels without a GPU) cannot time
    # configs; the autotuner skips timing when there is one.
    return configs[:1] if os.environ.get("TRITON_INTERPRET") == "1" else configs


@triton.autotune(configs=_configs(group=False), key=["M", "N", "K"])
@triton.jit
def _int8_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xk = tl.load(x_ptr + pid_m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
            w = tl.load(
                w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_mask[:, None] & (kk[None, :] < K), other=0
            )
            acc += w.to(tl.float32) * xk[None, :]
        out = tl.sum(acc, axis=1)
        scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        out = out * scale
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_m * stride_ym + rn, out.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xt = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0
            )
            w = tl.load(
                w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=n_mask[None, :] & (kk[:, None] < K), other=0
            )
            # int8 codes are exact in fp16 / bf16; the scale is applied to the fp32 sum.
            acc += tl.dot(xt, w.to(xt.dtype))
        scale = tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        out = acc * scale[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(group=True), key=["M", "N", "K"])
@triton.jit
def _int4_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS_PER_BLOCK: tl.constexpr,
):
    BLOCK_K: tl.constexpr = GROUP * GROUPS_PER_BLOCK
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rb = tl.arange(0, HALF_K)
    rg = tl.arange(0, GROUPS_PER_BLOCK)
    rk = tl.arange(0, BLOCK_K)
    half = (K + 1) // 2
    groups = (K + GROUP - 1) // GROUP
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        bb = k0 // 2 + rb
        byte = tl.load(
            w_ptr + rn[:, None] * stride_wn + bb[None, :], mask=n_mask[:, None] & (bb[None, :] < half), other=0
        )
        codes = tl.interleave(byte & 0x0F, byte >> 4).to(tl.float32)  # [BLOCK_N, BLOCK_K], column 2j first
        gg = k0 // GROUP + rg
        g_mask = n_mask[:, None] & (gg[None, :] < groups)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + gg[None, :], mask=g_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * stride_sn + gg[None, :], mask=g_mask, other=0.0).to(tl.float32)
        codes = tl.reshape(codes, (BLOCK_N, GROUPS_PER_BLOCK, GROUP))
        w = tl.reshape((codes - z[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))
        kk = k0 + rk
        if BLOCK_M == 1:
            xk = tl.load(x_ptr + pid_m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
            acc += w * xk[None, :]
        else:
            xt = tl.load(
                x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < K), other=0.0
            )
            # The dequantized tile rounds to the activation dtype, as the reference path's weight does.
            acc += tl.dot(xt, tl.trans(w.to(xt.dtype)))
    if BLOCK_M == 1:
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + pid_m * stride_ym + rn, out.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:
        out = acc
        if HAS_BIAS:
            out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=mask)


def _block_m(m: int) -> int:
    return 1 if m == 1 else 16 if m <= 16 else 32


@triton_op("quantcore_torch::int8_mm", mutates_args=())
def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ (qweight [N, K] * scale[:, None]).T + bias``, in ``x.dtype`` (fp16 / bf16, contiguous)."""
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = _block_m(m)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))

    wrap_triton(_int8_kernel)[grid](
        x,
        qweight,
        scale,
        bias if bias is not None else scale,
        y,
        m,
        n,
        k,
        x.stride(0),
        qweight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
    )
    return y


@triton_op("quantcore_torch::int4_mm", mutates_args=())
def int4_mm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x [M, K] @ W.T + bias`` with ``W = (q - zero) * scale`` from packed int4 codes, in ``x.dtype``."""
    m, k = x.shape
    n = packed.shape[0]
    # The kernel reads scales and zero points with one row stride (no copies for module buffers).
    scale, zero = scale.contiguous(), zero.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = _block_m(m)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))

    wrap_triton(_int4_kernel)[grid](
        x,
        packed,
        scale,
        zero,
        bias if bias is not None else scale,
        y,
        m,
        n,
        k,
        x.stride(0),
        packed.stride(0),
        scale.stride(0),
        y.stride(0),
        GROUP=group_size,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
    )
    return y
