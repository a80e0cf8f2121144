"""Triton kernels for small-batch weight-only matmuls on CUDA (decode), reading the stored tensors.

Imported by :mod:`quantcore_torch.kernels` only where CUDA and Triton exist. Each kernel computes
``y[m, n] = sum_k x[m, k] * w[n, k] + bias[n]`` with ``w`` dequantized in registers, tile by tile,
so the weight crosses memory once in its quantized size. One row (``M == 1``, batch-1 decode)
runs as a reduction over ``[BLOCK_N, BLOCK_K]`` tiles in fp32; more rows run ``tl.dot`` on the
dequantized tile, cast to the activation dtype first exactly as the reference path rounds it.

Calls go through :class:`_Launcher`: a shape's first call autotunes (Triton times the configs
once), later calls hand the arguments straight to the compiled kernel of the chosen config, as
inductor's generated code does, at the cost of Triton's C launcher. The general path (the custom
op layer, then the autotuner) cost about 130 µs a call on an H200 host, against about 25 µs for a
bf16 ``F.linear``, which made every eager decode step slower than bf16's.

Under ``torch.compile`` they are the custom ops ``quantcore_torch::int8_mm`` and
``quantcore_torch::int4_mm``: opaque to inductor, which calls them as they are, so a compiled model
runs the very kernels (config included) that eager code runs, and CUDA graphs capture the launches.
(Registered as ``triton_op``\\ s instead, inductor re-autotuned the kernels itself and chose
configs that made the compiled int8 step's linears 1.9x slower than the same kernels run eagerly.)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["int4_mm", "int8_mm"]


# (BLOCK_N, BLOCK_K or GROUPS_PER_BLOCK, num_warps). One row (batch-1 decode) is a reduction that
# must spread a weight of a few MiB over every SM: narrow N tiles, long K tiles. More rows run
# ``tl.dot``, which needs tiles of 16 at least.
_INT8_ROW = [(8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (8, 1024, 4), (16, 1024, 8), (32, 512, 8)]
_INT8_DOT = [(16, 128, 4), (16, 256, 4), (32, 128, 4), (32, 256, 4), (64, 128, 4), (64, 256, 4)]
_INT4_ROW = [(8, 1, 4), (16, 1, 4), (8, 2, 4), (16, 2, 4), (32, 1, 4), (32, 2, 8), (16, 4, 8)]
_INT4_DOT = [(16, 1, 4), (16, 2, 4), (32, 1, 4), (32, 2, 4), (64, 1, 4), (64, 2, 4)]


def _configs(row: list, dot: list, group: bool) -> list[triton.Config]:
    inner = "GROUPS_PER_BLOCK" if group else "BLOCK_K"
    configs = [triton.Config({"BLOCK_N": n, inner: k}, num_warps=warps, num_stages=3) for n, k, warps in (*row, *dot)]
    # Triton's CPU interpreter (how the tests check these kernels without a GPU) cannot time
    # configs; the autotuner skips timing when there is one.
    # A ``tl.dot`` config serves one row too.
    return configs[len(row) : len(row) + 1] if os.environ.get("TRITON_INTERPRET") == "1" else configs


def _prune(row: list):
    """Keep the one-row configs for ``M == 1`` and the ``tl.dot`` ones otherwise."""

    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        return configs[: len(row)] if named_args["M"] == 1 else configs[len(row) :]

    return prune


@triton.autotune(
    configs=_configs(_INT8_ROW, _INT8_DOT, group=False),
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune(_INT8_ROW)},
)
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


@triton.autotune(
    configs=_configs(_INT4_ROW, _INT4_DOT, group=True),
    key=["M", "N", "K"],
    prune_configs_by={"early_config_prune": _prune(_INT4_ROW)},
)
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


def _launch_hooks_unset() -> bool:
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    return runtime is not None and runtime.launch_enter_hook is None and runtime.launch_exit_hook is None


class _Launcher:
    """Launches an autotuned kernel from eager PyTorch at the cost of Triton's C launcher.

    The first call of a key (device, shapes, dtypes) goes through the autotuner, which times the
    configs once and returns the compiled kernel of the best; that kernel, its grid and the
    constexpr values are kept. Later calls pass the arguments straight to the compiled kernel's
    ``run``, in the kernel's parameter order, as ``JITFunction.run`` itself does after its
    argument binding. Where this Triton's compiled kernels do not look as expected, or a launch
    hook (a profiler) is installed, every call takes the autotuner's path.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: dict[tuple, tuple] = {}
        self.direct = os.environ.get("QUANTCORE_TRITON_DIRECT", "1") != "0"

    def __call__(self, key: tuple, grid, args: tuple, constexprs: dict) -> None:
        hit = self.compiled.get(key) if self.direct else None
        if hit is not None and _launch_hooks_unset():
            compiled, grid0, grid1, tail = hit
            stream = torch._C._cuda_getCurrentRawStream(key[0])
            try:
                compiled.run(
                    grid0, grid1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail
                )
                return
            except TypeError:  # this Triton's launcher takes other arguments (raised before launching)
                self.direct = False
        compiled = self.kernel[grid](*args, **constexprs)
        if self.direct and hit is None:
            self._keep(key, grid, args, constexprs, compiled)

    def _keep(self, key: tuple, grid, args: tuple, constexprs: dict, compiled) -> None:
        try:
            config = self.kernel.best_config
            meta = {**constexprs, **config.kwargs}
            names = self.kernel.fn.arg_names
            tail = tuple(meta[name] for name in names[len(args) :])
            grid0, grid1 = grid(meta)
            if hasattr(compiled, "result"):
                compiled = compiled.result()
            compiled._init_handles()
            compiled.function, compiled.packed_metadata, compiled.run  # noqa: B018 - all three must exist
        except Exception:  # another Triton: stay on the autotuner's path
            self.direct = False
            return
        self.compiled[key] = (compiled, grid0, grid1, tail)


_INT8 = _Launcher(_int8_kernel)
_INT4 = _Launcher(_int4_kernel)


def _launch(launcher: _Launcher, x: torch.Tensor, inputs: tuple, n: int, strides: tuple, key: tuple, constexprs: dict):
    """Run ``launcher``'s kernel on ``x [..., K]``: the kernels share their output, size and stride
    arguments (``inputs..., y, M, N, K, stride_xm, strides..., stride_ym``) and their grid."""
    k = x.shape[-1]
    m = x.numel() // k
    y = x.new_empty((*x.shape[:-1], n))
    block_m = _block_m(m)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))

    args = (*inputs, y, m, n, k, k, *strides, n)
    _eager(launcher, (*key, m), x, grid, args, {**constexprs, "BLOCK_M": block_m})  # key[0]: the device
    return y


def _int8_launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    inputs = (x, qweight, scale, scale if bias is None else bias)
    key = _key(x, qweight, scale, bias)
    return _launch(_INT8, x, inputs, qweight.shape[0], (qweight.stride(0),), key, {"HAS_BIAS": bias is not None})


def _int4_launch(x, packed, scale, zero, group_size: int, bias):
    inputs = (x, packed, scale, zero, scale if bias is None else bias)
    key = (*_key(x, packed, scale, bias), zero.dtype, zero.data_ptr() % 16 == 0, group_size)
    constexprs = {"GROUP": group_size, "HAS_BIAS": bias is not None}
    return _launch(_INT4, x, inputs, packed.shape[0], (packed.stride(0), scale.stride(0)), key, constexprs)


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


@torch.library.custom_op("quantcore_torch::int8_mm", mutates_args=())
def _int8_mm_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _int8_launch(x.contiguous(), qweight, scale, bias)


@_int8_mm_op.register_fake
def _(x, qweight, scale, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


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


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., K] @ (qweight [N, K] * scale[:, None]).T + bias``, in ``x.dtype`` (fp16 / bf16).

    From eager code the kernel launches directly; under ``torch.compile`` this is the custom op.
    """
    if torch.compiler.is_compiling():
        return _int8_mm_op(x, qweight, scale, bias)
    return _int8_launch(x if x.is_contiguous() else x.contiguous(), qweight, scale, bias)


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
