"""The two weight formats, as plain tensor functions (any device, the meta device included).

int8, symmetric per output channel::

    scale[o] = max(|w[o, :]|) / 127            (stored in the weight's float dtype)
    q[o, i]  = clamp(round(w[o, i] / scale[o]), -127, 127)          int8
    w'[o, i] = q[o, i] * scale[o]

int4, asymmetric per group of ``group_size`` input columns (``g = i // group_size``)::

    lo, hi   = min(min(w[o, group]), 0), max(max(w[o, group]), 0)
    scale[o, g] = (hi - lo) / 15               (stored in the weight's float dtype)
    zero[o, g]  = -lo / scale[o, g]            (in [0, 15]: the code that stands for 0.0; fractional)
    q[o, i]  = clamp(round(w[o, i] / scale[o, g] + zero[o, g]), 0, 15)  4 bits
    w'[o, i] = (q[o, i] - zero[o, g]) * scale[o, g]

Two int4 codes share a byte: column ``2j`` in the low nibble, ``2j + 1`` in the high one. When
``in_features`` is odd the last high nibble is 0 and unused. When ``in_features`` is not a multiple
of ``group_size`` the last group is shorter: its scale and zero point come from its real columns
only (nothing is padded in storage). Codes are always computed from the *stored* (rounded) scale and
zero point, so quantizing and dequantizing agree exactly. An all-zero row or group gets scale 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "dequantize_int4",
    "dequantize_int8",
    "int4_shapes",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "unpack_int4",
]

INT8_MAX = 127
INT4_MAX = 15


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` codes in 0..15 -> ``[rows, ceil(cols / 2)]`` uint8, two codes per byte."""
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[rows, ceil(cols / 2)]`` uint8 -> ``[rows, cols]`` uint8 codes."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)[..., :cols]


def int4_shapes(out_features: int, in_features: int, group_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(packed weight shape, scale/zero shape)`` of an int4 ``[out_features, in_features]`` weight."""
    return (out_features, -(-in_features // 2)), (out_features, -(-in_features // group_size))


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero row or group (or a scale that underflowed in fp16) would divide by zero; any
    # positive scale represents it exactly, since its codes then all stand for 0.0.
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float weight -> ``(qweight int8 [out, in], scale [out] in the weight's dtype)``."""
    w = weight.detach().float()
    scale = _nonzero((w.abs().amax(dim=1) / INT8_MAX).to(weight.dtype))
    q = torch.round(w / scale.float()[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight an int8 ``qweight`` and its per-row ``scale`` stand for, in ``dtype``:
    ``q * scale`` computed in fp32, rounded once to ``dtype``."""
    if scale.dtype == dtype and dtype in _ONE_PASS:
        # The same bits in one pass, without fp32 temporaries. In fp32 it is the same operation. In
        # fp16 / bf16 a code is exact and its product with a scale (at most 8 + 11 significant
        # bits) is exact in fp32: the half-precision multiplication (the exact product, rounded
        # once) gives what the line below gives. About 15x faster for a 5632x2048 weight on a CPU.
        return qweight.to(dtype) * scale[:, None]
    return (qweight.float() * scale.float()[:, None]).to(dtype)


# Dtypes whose product of an int8 code and a scale of that dtype equals the fp32 product rounded.
_ONE_PASS = (torch.float16, torch.bfloat16, torch.float32)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, groups, group_size]``; the last group is filled up with its last column."""
    out_features, in_features = w.shape
    missing = -in_features % group_size
    if missing:
        # Repeating a real value leaves the last group's min and max as they are.
        w = torch.cat((w, w[:, -1:].expand(out_features, missing)), dim=1)
    return w.reshape(out_features, -1, group_size)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[out, in]`` float weight -> ``(packed uint8, scale, zero)``; see the module docstring."""
    out_features, in_features = weight.shape
    w = _grouped(weight.detach().float(), group_size)
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    scale = _nonzero(((hi - lo) / INT4_MAX).to(weight.dtype))
    zero = (-lo / scale.float()).clamp_(0, INT4_MAX).to(weight.dtype)
    codes = torch.round(w / scale.float()[..., None] + zero.float()[..., None]).clamp_(0, INT4_MAX)
    codes = codes.reshape(out_features, -1)[:, :in_features]
    return pack_int4(codes), scale, zero


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    in_features: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The float ``[out, in_features]`` weight that packed int4 codes stand for, in ``dtype``:
    ``(q - zero) * scale`` computed in fp32, rounded once to ``dtype``."""
    out_features, groups = scale.shape
    out = torch.empty((out_features, groups * group_size), dtype=dtype, device=packed.device)
    # On the CPU, a block of rows at a time: the fp32 temporaries stay small enough to be reused
    # from the heap and to stay in cache, where whole-weight ones are fresh pages every call (a
    # 2048x2048 weight took 12.6 ms whole, against 1.5 ms for its operations on reused memory).
    step = out_features
    if packed.device.type == "cpu" and not torch.compiler.is_compiling():
        step = max(1, _CPU_BLOCK // out.shape[1])
    for start in range(0, out_features, step):
        rows = slice(start, start + step)
        _dequantize_int4_rows(packed[rows], scale[rows], zero[rows], in_features, group_size, out[rows])
    return out if out.shape[1] == in_features else out[:, :in_features].contiguous()


# Weights in a block of rows of the CPU's int4 dequantize: 2 MiB of fp32 temporaries (the best of
# 64 KiB to 4 MiB blocks on a 1.1B Llama's shapes and SmolLM2's on a 2-core x86 box).
_CPU_BLOCK = 1 << 19


def _dequantize_int4_rows(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int, out: torch.Tensor
) -> None:
    """:func:`dequantize_int4` of some rows into ``out`` (``[rows, groups * group_size]``, contiguous)."""
    rows, groups = scale.shape
    # (q - zero) * scale in fp32, rounded once to dtype: the codes written straight into one fp32
    # temporary (low nibbles to the even columns, high to the odd), changed in place, and the
    # product written straight into the output (PyTorch computes it in fp32, then casts). Columns
    # past in_features (an odd one's high nibble, a short last group) are cut by the caller.
    pairs = packed.shape[1]
    w = torch.empty((rows, groups * group_size // 2, 2), dtype=torch.float32, device=packed.device)
    if pairs < w.shape[1]:
        w[:, pairs:] = 0
    w[:, :pairs, 0] = packed & 0x0F
    w[:, :pairs, 1] = packed >> 4
    w = w.view(rows, groups, group_size)
    w.sub_(zero.float()[..., None])
    torch.mul(w, scale.float()[..., None], out=out.view(rows, groups, group_size))
