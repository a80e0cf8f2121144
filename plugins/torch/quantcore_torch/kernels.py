"""Fused weight-only matmuls: ``y = x @ W.T + b`` with ``W`` read in int8 or int4, never written out in float.

The public functions take the activation ``x`` (``[..., in_features]``, already in the compute
dtype) and the weight in the storage format of :mod:`quantcore_torch.packing`, and pick the
fastest valid path for where the tensors live:

===========  =================================================  ========================================
format       CPU                                                CUDA (``M`` = rows of ``x``)
===========  =================================================  ========================================
int8         ``torch._weight_int8pack_mm`` (the stored int8     Triton kernel on the stored tensors for
             weight as it is; fp32 / fp16 / bf16;              ``M <= SMALL_BATCH``, fp16 / bf16
             ``in_features % 64 == 0``; ``M <= SMALL_BATCH``)
int4         ``torch._weight_int4pack_mm_for_cpu`` on a         ``M == 1``: Triton kernel on
             kernel layout built by :func:`int4_cpu_layout`     :func:`int4_interleaved_layout`, fp16 /
             (``out_features % 16 == 0``, a kernel group of     bf16; ``M <= SMALL_BATCH``: Triton
             32..256 columns dividing ``in_features``;          ``tl.dot`` kernel on the stored tensors.
             ``M <= CPU_INT4_ROWS``)                            ``INT4_CUDA_KERNEL == "tinygemm"`` (or
                                                                no interleaved layout): tinygemm on
                                                                :func:`int4_tinygemm_layout` for bf16
===========  =================================================  ========================================

A gated MLP's activation can run inside a kernel at batch-1 decode, one launch fewer a layer:
in its stacked gate and up projections' kernel, which writes ``silu(gate) * up`` instead of both
halves (:func:`int8_gate_up_linear`, :func:`int4_gate_up_linear` on the interleaved layout), or
in its int8 down projection's, which reads both halves and makes ``silu(gate) * up`` as it loads
them (:func:`int8_gated_linear`).

Everything else (odd shapes, fp32 activations on CUDA, large-batch prefill where a float matmul
after one dequantize wins, other devices, float64) dequantizes, then runs ``F.linear``: the
function :func:`int8_reference_linear` / :func:`int4_reference_linear` compute, with the weight
made by one Triton kernel on CUDA (:func:`dequantized_int8` / :func:`dequantized_int4`, the same
bits as :mod:`~quantcore_torch.packing`'s PyTorch ops). Every path computes the same
function within float rounding; the tests check each one against the reference.

Why the int4 CPU kernel needs its own layout while CUDA's Triton kernels read the stored tensors:
``_weight_int4pack_mm_for_cpu`` wants its weights reordered in blocks and scales and zero points
interleaved as ``[groups, out, 2]`` with ``w = (q - 8) * scale + zero'``; our format stores
``w = (q - zero) * scale``, so ``zero' = (8 - zero) * scale``. The conversion is exact in fp32 and
rounds once to the compute dtype. :mod:`quantcore_torch.modules` keeps such a layout as a
non-persistent cache, rebuilt whenever the module is built, loaded or moved; checkpoints hold only
the storage format.

For other backends whose weights use the same asymmetric group-wise int4 scheme
(``w = (q - zero) * scale``, two codes per byte, low nibble first): call
:func:`int4_weight_only_linear` with their packed codes, scales and zero points.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._settings import choice
from .packing import dequantize_int4, dequantize_int8

__all__ = [
    "CPU_INT4_ROWS",
    "INT4_CUDA_KERNELS",
    "INTERLEAVED_GROUPS",
    "SMALL_BATCH",
    "Int4Layout",
    "decode_attention",
    "dequantized_int4",
    "dequantized_int8",
    "gated_input",
    "int4_cpu_layout",
    "int4_cuda_kernel_setting",
    "int4_cuda_layout",
    "int4_gate_up_linear",
    "int4_interleaved_layout",
    "int4_kernel_group",
    "int4_kernel_rows",
    "int4_norm_linear",
    "int4_qkv_rope_linear",
    "int4_reference_linear",
    "int4_residual_linear",
    "int4_tinygemm_layout",
    "int4_weight_only_linear",
    "int8_gate_up_linear",
    "int8_gated_linear",
    "int8_norm_fold_takes",
    "int8_norm_linear",
    "int8_qkv_rope_linear",
    "int8_reference_linear",
    "int8_residual_linear",
    "int8_weight_only_linear",
    "interleave_int4",
    "norm_fold_takes",
    "triton_available",
]

#: Rows of ``x`` up to which the CUDA kernels (and the CPU int8 kernel) run; above it (prefill) one
#: dequantize + a float matmul wins.
SMALL_BATCH = 32

#: Rows of ``x`` up to which the CPU int4 kernel runs: on a 2-core x86 box it beat dequantize +
#: ``F.linear`` by 5 to 45 % through 64 rows on SmolLM2's and a 1.1B Llama's shapes, and lost from
#: 96 (docs/benchmarks.md); the CPU int8 kernel's crossover is about 33 rows.
CPU_INT4_ROWS = 64


def int4_kernel_rows(device: torch.device) -> int:
    """Rows of ``x`` up to which :func:`int4_weight_only_linear` runs a kernel on ``device`` (above
    them it dequantizes, then runs ``F.linear``)."""
    return CPU_INT4_ROWS if device.type == "cpu" else SMALL_BATCH


#: The kernel the CUDA int4 path uses: ``"interleaved"`` (the default: one row through the Triton
#: kernel on :func:`interleave_int4`'s layout, a second copy of the packed weight; fp16 and bf16;
#: more rows read the stored tensors; where the layout can't be built, tinygemm's for bf16),
#: ``"tinygemm"`` (``torch._weight_int4pack_mm``, bf16 only, a second copy in its layout; fp16 takes
#: the Triton kernels) or ``"triton"`` (the stored tensors only, no extra memory). On an H100 the
#: interleaved kernels beat tinygemm at batch 1 (a 7B Llama 6 % faster) and batch 16 (a 1.1B Llama
#: 5,141 against 4,768 tok/s), and only they take the fused gate/up activation and the rotary fold.
INT4_CUDA_KERNELS = ("tinygemm", "interleaved", "triton")


def int4_cuda_kernel_setting(environ=os.environ) -> str:
    """``QUANTCORE_INT4_CUDA_KERNEL`` (one of :data:`INT4_CUDA_KERNELS`), ``"interleaved"`` where unset."""
    return choice("QUANTCORE_INT4_CUDA_KERNEL", INT4_CUDA_KERNELS, "interleaved", environ)


INT4_CUDA_KERNEL = int4_cuda_kernel_setting()

_HALF = (torch.float16, torch.bfloat16)
_CPU_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# The group sizes the int4 kernels were written for (tinygemm's and the CPU kernel's).
_KERNEL_GROUPS = (256, 128, 64, 32)


def _load_triton():
    # Only where a CUDA device and Triton exist: the CPU wheel of torch ships without Triton.
    if not torch.cuda.is_available():
        return None
    try:
        from . import _triton
    except ImportError:
        return None
    return _triton


_TRITON = _load_triton()


def _load_attention():
    if _TRITON is None:
        return None
    from . import _attention

    return _attention


_ATTENTION = _load_attention()


def _load_fold():
    if _TRITON is None:
        return None
    from . import _fold

    return _fold


_FOLD = _load_fold()


def triton_available() -> bool:
    """Whether the CUDA Triton kernels can run here (a CUDA device and the ``triton`` package)."""
    return _TRITON is not None


class Int4Layout(NamedTuple):
    """An int4 weight in a kernel's layout: ``kind`` is ``"cpu"``, ``"tinygemm"`` or ``"interleaved"``."""

    kind: str
    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, in_features]``, contiguous (no reshape, no copy where it already is)."""
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x if x.is_contiguous() else x.contiguous()


def _unflat(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _float_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on a dequantized ``weight`` (in ``x.dtype``), the bias cast to it."""
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


# ----------------------------------------------------------------------------- int8
def int8_reference_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize the int8 weight to ``x.dtype``, then ``F.linear``: the path every kernel must match."""
    weight = dequantize_int8(qweight, scale, x.dtype)
    return _float_linear(x, weight, bias)


def dequantized_int8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`~quantcore_torch.packing.dequantize_int8` through the fastest path, the same bits: one
    Triton kernel for a CUDA weight in eager code (fp16 / bf16), PyTorch's ops elsewhere (inductor
    fuses those itself under ``torch.compile``)."""
    if _TRITON is not None and qweight.is_cuda and dtype in _HALF and not torch.compiler.is_compiling():
        return _TRITON.dequantize_int8(qweight, scale, dtype)
    return dequantize_int8(qweight, scale, dtype)


def int8_weight_only_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias`` in ``x.dtype``, through the fastest valid kernel.

    :param x: ``[..., in_features]`` activations, in the compute dtype.
    :param qweight: ``int8 [out_features, in_features]``, symmetric per output channel.
    :param scale: ``[out_features]`` per-row scales (any float dtype).
    :param bias: ``[out_features]`` or ``None``.
    """
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    # The CUDA kernel takes any leading dimensions as they are: an eager call costs one allocation
    # and one launch, as few dispatches as a bf16 F.linear.
    if _TRITON is not None and x.is_cuda and x.dtype in _HALF and 0 < rows <= SMALL_BATCH:
        return _TRITON.int8_mm(x, qweight, scale, bias)
    # The CPU kernel reads out of bounds (a crash, seen with torch 2.13) when in_features is not a
    # multiple of 16 and x has more than one row: keep it to whole 64-column blocks.
    if x.is_cpu and x.dtype in _CPU_FLOATS and rows <= SMALL_BATCH and k % 64 == 0:
        y = torch.ops.aten._weight_int8pack_mm(
            _flat(x), qweight, scale if scale.dtype == x.dtype else scale.to(x.dtype)
        )
        return _unflat(_add_bias(y, bias), x)
    return _float_linear(x, dequantized_int8(qweight, scale, x.dtype), bias)


def _check_gate_up(out_features: int) -> None:
    if out_features % 2:
        raise ValueError(
            f"a gated MLP's stacked gate and up projections have an even number of outputs, got {out_features}"
        )


def gated_input(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from ``h [..., 2K]`` holding a gated MLP's ``gate`` then ``up`` halves,
    computed as the MLP computes it (``act_fn(gate_proj(x)) * up_proj(x)``, each op rounding to
    ``h.dtype``): the input of its down projection."""
    _check_gate_up(h.shape[-1])
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def int8_gated_linear(
    h: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A gated MLP's down projection with its activation folded in: ``int8_weight_only_linear`` of
    :func:`gated_input` ``(h)``. One row on CUDA (batch-1 decode) runs it as one Triton kernel,
    which reads both halves and makes ``silu(gate) * up`` in registers (one launch fewer); any other
    input computes the activation first, then takes :func:`int8_weight_only_linear`'s path.

    :param h: ``[..., 2 * in_features]``: a fused gate/up projection's output, gate first.
    """
    if h.shape[-1] != 2 * qweight.shape[1]:
        raise ValueError(
            f"a gated input holds gate and up halves of {qweight.shape[1]} features each "
            f"({2 * qweight.shape[1]} in all), got {h.shape[-1]}"
        )
    if _TRITON is not None and h.is_cuda and h.dtype in _HALF and h.numel() == h.shape[-1]:
        return _TRITON.int8_glu_mm(h, qweight, scale, bias)
    return int8_weight_only_linear(gated_input(h), qweight, scale, bias)


def _one_half_row(x: torch.Tensor) -> bool:
    """Whether ``x`` is one CUDA row in fp16 / bf16 (what the gated epilogues take) and Triton is here."""
    return _TRITON is not None and x.is_cuda and x.dtype in _HALF and x.numel() == x.shape[-1] > 0


def int8_gate_up_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A gated MLP's gate and up projections stacked in one int8 weight (the gate's rows first),
    and its activation: :func:`gated_input` of :func:`int8_weight_only_linear`, ``[...,
    out_features // 2]``. One row on CUDA (batch-1 decode) runs as one Triton kernel that writes
    ``silu(gate) * up`` from its epilogue, each projection's output rounded first as the unfused
    ones are (one launch fewer, half the output written); any other input runs the projections,
    then the activation."""
    _check_gate_up(qweight.shape[0])
    if _one_half_row(x):
        return _TRITON.int8_gate_up_mm(x, qweight, scale, bias)
    return gated_input(int8_weight_only_linear(x, qweight, scale, bias))


def _rope_takes(x, n: int, cos, sin, keys, values, position, q_features: int) -> bool:
    """Whether a q/k/v rotary kernel takes these (``n``: the stacked weight's rows): one fp16 /
    bf16 row on CUDA, cos and sin in its dtype, the cache and the position on CUDA, and the shapes
    :func:`quantcore_torch._triton.qkv_rope_mismatch` accepts."""
    if not _one_half_row(x):
        return False
    if cos.dtype != x.dtype or sin.dtype != x.dtype or not (cos.is_cuda and keys.is_cuda and position.is_cuda):
        return False
    return _TRITON.qkv_rope_mismatch(x, n, cos, sin, keys, values, position, q_features) is None


def int8_qkv_rope_linear(
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
) -> torch.Tensor | None:
    """:func:`int4_qkv_rope_linear` on an int8 weight: an attention's q, k and v projections
    stacked (``q_features`` q rows, then k's, then v's) for one decode token, the rotary embedding
    and the static cache's writes in the kernel's epilogue. One fp16 / bf16 row on CUDA only
    (:func:`quantcore_torch._triton.int8_qkv_rope`); anything else returns ``None``, having
    written nothing. ``sq``, ``eps``: the RMS norm folded in, as there."""
    if qweight.shape[-1] != x.shape[-1]:
        return None
    if not _rope_takes(x, qweight.shape[0], cos, sin, keys, values, position, q_features):
        return None
    return _TRITON.int8_qkv_rope(x, qweight, scale, bias, cos, sin, keys, values, position, q_features, sq, eps)


# ----------------------------------------------------------------------------- int4
def int4_reference_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize the int4 weight to ``x.dtype``, then ``F.linear``: the path every kernel must match."""
    weight = dequantize_int4(packed, scale, zero, x.shape[-1], group_size, x.dtype)
    return _float_linear(x, weight, bias)


def dequantized_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`~quantcore_torch.packing.dequantize_int4` through the fastest path, the same bits (see
    :func:`dequantized_int8`)."""
    kernel = _TRITON is not None and packed.is_cuda and dtype in _HALF and _TRITON.int4_dequantize_takes(group_size)
    if kernel and not torch.compiler.is_compiling():
        return _TRITON.dequantize_int4(packed, scale, zero, in_features, group_size, dtype)
    return dequantize_int4(packed, scale, zero, in_features, group_size, dtype)


def int4_kernel_group(in_features: int, group_size: int) -> int | None:
    """The group size the int4 CPU / tinygemm kernels can run a layer with, or ``None``.

    Our last group may be shorter than ``group_size`` (``in_features`` not a multiple of it). The
    kernels want equal groups, so a group is split into equal parts that share its scale and zero
    point (the same weights exactly): SmolLM2's 576 inputs in groups of 128 run as groups of 64.
    """
    for g in _KERNEL_GROUPS:
        if g <= group_size and group_size % g == 0 and in_features % g == 0:
            return g
    return None


def _kernel_scales_and_zeros(
    scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int, kernel_group: int, dtype: torch.dtype
) -> torch.Tensor:
    # Ours: w = (q - zero) * scale. The kernels': w = (q - 8) * scale + zero', so zero' = (8 - zero) * scale.
    repeat = group_size // kernel_group
    groups = in_features // kernel_group
    s = scale.float().repeat_interleave(repeat, dim=1)[:, :groups]
    z = (8 - zero.float().repeat_interleave(repeat, dim=1)[:, :groups]) * s
    return torch.stack((s, z), dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4_cpu_layout(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int, dtype: torch.dtype
) -> Int4Layout | None:
    """The layout ``torch._weight_int4pack_mm_for_cpu`` takes, for activations in ``dtype``; ``None`` if it can't.

    :param packed: ``uint8 [out_features, ceil(in_features / 2)]``, low nibble first.
    :param scale: ``[out_features, groups]``; :param zero: the same shape (``w = (q - zero) * scale``).
    """
    out_features = packed.shape[0]
    kernel_group = int4_kernel_group(in_features, group_size)
    if packed.device.type != "cpu" or dtype not in _CPU_FLOATS or kernel_group is None or out_features % 16:
        return None
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)[:, :in_features].to(torch.int32)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    sz = _kernel_scales_and_zeros(scale, zero, in_features, group_size, kernel_group, dtype)
    return Int4Layout("cpu", weight, sz, kernel_group)


def int4_tinygemm_layout(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int
) -> Int4Layout | None:
    """The layout of tinygemm (``torch._weight_int4pack_mm``, CUDA, bf16 activations); ``None`` if it can't.

    tinygemm needs ``in_features`` a multiple of 16 times its inner k-tiles (2, 4 or 8) and of the
    kernel group, and ``out_features`` a multiple of 8 (torchao checks the same).
    """
    out_features = packed.shape[0]
    kernel_group = int4_kernel_group(in_features, group_size)
    inner_k_tiles = 8 if in_features % 128 == 0 else 4 if in_features % 64 == 0 else 2 if in_features % 32 == 0 else 0
    if not packed.is_cuda or kernel_group is None or not inner_k_tiles or out_features % 8:
        return None
    # tinygemm's packing wants the even column in the high nibble: ours has it in the low one.
    swapped = ((packed & 0x0F) << 4) | (packed >> 4)
    weight = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles)
    sz = _kernel_scales_and_zeros(scale, zero, in_features, group_size, kernel_group, torch.bfloat16)
    return Int4Layout("tinygemm", weight, sz, kernel_group)


def int4_cuda_layout(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int, dtype: torch.dtype
) -> Int4Layout | None:
    """The CUDA layout :data:`INT4_CUDA_KERNEL` asks for, for activations in ``dtype``; ``None`` where
    no kernel needs one (``"triton"``, fp16 with ``"tinygemm"``) or none can be built. Where the
    interleaved layout can't be built (no Triton, a group it does not take), bf16 takes tinygemm's."""
    layout = None
    if INT4_CUDA_KERNEL == "interleaved" and dtype in _HALF:
        layout = int4_interleaved_layout(packed, scale, zero, in_features, group_size)
    if layout is None and INT4_CUDA_KERNEL != "triton" and dtype == torch.bfloat16:
        layout = int4_tinygemm_layout(packed, scale, zero, in_features, group_size)
    return layout


#: Group sizes the interleaved layout takes (its kernel tiles whole groups of 32-bit words).
INTERLEAVED_GROUPS = (32, 64, 128, 256)


def interleave_int4(packed: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """Packed int4 codes (:mod:`~quantcore_torch.packing`'s layout) as the one-row Triton kernel's
    interleaved layout: ``int32 [out_features, in_features // 8]`` (any device).

    Word ``j`` of a row's group ``g`` holds, in its byte ``i``, the codes of columns
    ``g * group_size + i * group_size // 4 + 2j`` (low nibble) and ``+ 1`` (high nibble), so that
    the kernel reads the inputs of a word's bytes as four contiguous runs (see
    ``_triton._int4_interleaved_kernel``). ``in_features`` must be a multiple of ``group_size``,
    itself a multiple of 8.
    """
    if group_size % 8 or in_features % group_size:
        raise ValueError(
            f"the interleaved layout needs whole groups of a multiple of 8 columns, got in_features="
            f"{in_features}, group_size={group_size}"
        )
    n = packed.shape[0]
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)[:, :in_features].to(torch.int32)
    # [rows, group, byte i, word j, nibble h] -> [rows, group, word j, byte i, nibble h]
    codes = codes.view(n, in_features // group_size, 4, group_size // 8, 2).permute(0, 1, 3, 2, 4)
    codes = codes.reshape(n, in_features // 8, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return _or_fields(codes << shifts)  # the top nibble lands in the sign bit, as a uint32's would


def _or_fields(fields: torch.Tensor) -> torch.Tensor:
    """The bitwise or of ``fields [..., 8]`` (disjoint bit fields of int32 words) along the last dimension."""
    word = fields[..., 0]
    for i in range(1, fields.shape[-1]):
        word = word | fields[..., i]
    return word.contiguous()


def int4_interleaved_layout(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, in_features: int, group_size: int
) -> Int4Layout | None:
    """The layout of the one-row Triton kernel on interleaved words (CUDA, fp16 / bf16
    activations); ``None`` if it can't: the kernel needs whole groups of a size in
    :data:`INTERLEAVED_GROUPS` and Triton.

    ``scales_and_zeros`` is ``[2, out_features, groups]``: the stored scales and zero points
    (``w = (q - zero) * scale`` as stored, no conversion).
    """
    if _TRITON is None or not packed.is_cuda or group_size not in INTERLEAVED_GROUPS or in_features % group_size:
        return None
    words = interleave_int4(packed, in_features, group_size)
    sz = torch.stack((scale, zero.to(scale.dtype)))  # contiguous: the kernel finds the zero points by offset
    return Int4Layout("interleaved", words, sz, group_size)


def int4_weight_only_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    layout: Int4Layout | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` in ``x.dtype`` for ``W = (q - zero) * scale`` in int4 groups, through the fastest kernel.

    :param x: ``[..., in_features]`` activations, in the compute dtype.
    :param packed: ``uint8 [out_features, ceil(in_features / 2)]``: column ``2j`` in the low nibble.
    :param scale: ``[out_features, ceil(in_features / group_size)]`` scales.
    :param zero: zero points of the same shape, as floats (codes that stand for 0.0; may be fractional).
    :param group_size: input columns per scale and zero point (the last group may be shorter).
    :param bias: ``[out_features]`` or ``None``.
    :param layout: a kernel layout from :func:`int4_cpu_layout` / :func:`int4_tinygemm_layout` /
        :func:`int4_interleaved_layout` of the same weight, or ``None``. The CUDA Triton kernels on
        the stored tensors need none.
    """
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if x.is_cuda and 0 < rows <= SMALL_BATCH:
        if layout is not None and layout.kind == "tinygemm" and x.dtype == torch.bfloat16:
            x2 = x if x.dim() == 2 else x.reshape(rows, k)
            y = torch.ops.aten._weight_int4pack_mm(
                x2 if x2.is_contiguous() else x2.contiguous(), layout.weight, layout.group_size, layout.scales_and_zeros
            )
            y = _add_bias(y, bias)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
        if layout is not None and layout.kind == "interleaved" and rows == 1 and x.dtype in _HALF:
            return _TRITON.int4_interleaved_mm(x, layout.weight, layout.scales_and_zeros, layout.group_size, bias)
        # The Triton kernel tiles K by whole groups: a power of two from 16 to 256 columns.
        if _TRITON is not None and x.dtype in _HALF and group_size in (16, 32, 64, 128, 256):
            return _TRITON.int4_mm(x, packed, scale, zero, group_size, bias)
    cpu_kernel = layout is not None and layout.kind == "cpu" and layout.scales_and_zeros.dtype == x.dtype
    if cpu_kernel and x.is_cpu and rows <= CPU_INT4_ROWS:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            _flat(x), layout.weight, layout.group_size, layout.scales_and_zeros
        )
        return _unflat(_add_bias(y, bias), x)
    weight = dequantized_int4(packed, scale, zero, x.shape[-1], group_size, x.dtype)
    return _float_linear(x, weight, bias)


def int4_gate_up_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    layout: Int4Layout | None = None,
) -> torch.Tensor:
    """A gated MLP's gate and up projections stacked in one int4 weight (the gate's rows first),
    and its activation: :func:`gated_input` of :func:`int4_weight_only_linear`, ``[...,
    out_features // 2]`` (arguments as there). One row on CUDA with the interleaved ``layout``
    runs as one Triton kernel that writes ``silu(gate) * up`` from its epilogue (see
    :func:`int8_gate_up_linear`); any other input or layout runs the projections, then the
    activation."""
    _check_gate_up(packed.shape[0])
    if layout is not None and layout.kind == "interleaved" and _one_half_row(x):
        return _TRITON.int4_interleaved_gate_up_mm(x, layout.weight, layout.scales_and_zeros, layout.group_size, bias)
    return gated_input(int4_weight_only_linear(x, packed, scale, zero, group_size, bias, layout))


def int4_qkv_rope_linear(
    x: torch.Tensor,
    layout: Int4Layout | None,
    bias: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: torch.Tensor,
    q_features: int,
    sq: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor | None:
    """An attention's q, k and v projections stacked in one int4 weight (``q_features`` q rows,
    then k's, then v's) for one decode token, with the rotary embedding and the static cache's
    writes in the kernel's epilogue: q rotated (``[..., q_features]``), k rotated and v written
    into ``keys`` and ``values`` (``[1, kv_heads, length, head_dim]``) at ``position[0]``.
    One fp16 / bf16 row on CUDA with the interleaved ``layout`` only
    (:func:`quantcore_torch._triton.int4_interleaved_qkv_rope`); anything else returns ``None``,
    having written nothing, for the caller to run the projections and the rotation as they are.
    ``sq``: ``x`` is a norm's weight times the hidden state and the projections are of the RMS
    norm's output, the sum of squares in this counter (see :func:`int4_norm_linear`)."""
    if layout is None or layout.kind != "interleaved":
        return None
    if not _rope_takes(x, layout.weight.shape[0], cos, sin, keys, values, position, q_features):
        return None
    return _TRITON.int4_interleaved_qkv_rope(
        x, layout.weight, layout.scales_and_zeros, layout.group_size, bias, cos, sin, keys, values, position,
        q_features, sq, eps,
    )  # fmt: skip


def norm_fold_takes(x: torch.Tensor, layout: Int4Layout | None) -> bool:
    """Whether :func:`int4_norm_linear` and :func:`int4_residual_linear` run their kernels for
    ``x`` and a weight in ``layout``: one fp16 / bf16 row on CUDA, the interleaved layout."""
    return _FOLD is not None and layout is not None and layout.kind == "interleaved" and _one_half_row(x)


def int8_norm_fold_takes(x: torch.Tensor) -> bool:
    """Whether :func:`int8_norm_linear` and :func:`int8_residual_linear` run their kernels for
    ``x``: one fp16 / bf16 row on CUDA (Triton installed)."""
    return _FOLD is not None and _one_half_row(x)


def _check_fold(x: torch.Tensor, layout: Int4Layout | None) -> None:
    if not norm_fold_takes(x, layout):
        kind = None if layout is None else layout.kind
        raise ValueError(
            "a folded norm's kernels take one fp16 / bf16 row on CUDA and a weight in the interleaved "
            f"int4 layout (Triton installed); got {tuple(x.shape)} {x.dtype} on {x.device}, layout {kind}"
        )


def _check_int8_fold(x: torch.Tensor) -> None:
    if not int8_norm_fold_takes(x):
        raise ValueError(
            "a folded norm's int8 kernels take one fp16 / bf16 row on CUDA (Triton installed); "
            f"got {tuple(x.shape)} {x.dtype} on {x.device}"
        )


def int8_norm_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    sq: torch.Tensor,
    eps: float,
    gate_up: bool = False,
) -> torch.Tensor:
    """:func:`int4_norm_linear` on an int8 weight (``qweight [N, K]``, ``scale [N]``): ``rms_norm(h)
    @ W.T + bias`` from ``x = g * h`` and the counter ``sq``; ``gate_up``: ``silu(gate) * up``.
    Only where :func:`int8_norm_fold_takes`; raises ``ValueError`` elsewhere."""
    _check_int8_fold(x)
    return _FOLD.int8_norm_mm(x, qweight, scale, bias, sq, eps, gate_up)


def int8_residual_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    gain: torch.Tensor,
    sq: torch.Tensor,
    clear: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`int4_residual_linear` on an int8 weight: ``(y, gain * y)`` with ``y = h + x @ W.T +
    bias``, ``sum(y**2)`` added to ``sq``, ``clear`` zeroed. Only where
    :func:`int8_norm_fold_takes`; raises ``ValueError`` elsewhere."""
    _check_int8_fold(x)
    return _FOLD.int8_residual_mm(x, qweight, scale, bias, h, gain, sq, clear)


def int4_norm_linear(
    x: torch.Tensor,
    layout: Int4Layout | None,
    bias: torch.Tensor | None,
    sq: torch.Tensor,
    eps: float,
    gate_up: bool = False,
) -> torch.Tensor:
    """A block's first projection with its RMS norm folded in, for one decode token: ``x`` is
    ``g * h`` (the norm's weight times the hidden state, as :func:`int4_residual_linear` writes
    it), ``sq`` one int64 holding ``sum(h**2)`` in the kernels' fixed point
    (:func:`quantcore_torch.rms.sumsq_counter`), and the result is ``rms_norm(h) @ W.T + bias``:
    the sums scaled by ``rsqrt(sum(h**2) / in_features + eps)``. ``gate_up``: a gated MLP's
    stacked gate and up projections, ``silu(gate) * up``. Only where :func:`norm_fold_takes`;
    raises ``ValueError`` elsewhere (the caller checks first: there is no fallback for a counter)."""
    _check_fold(x, layout)
    if gate_up:
        _check_gate_up(layout.weight.shape[0])
    weight, sz = layout.weight, layout.scales_and_zeros
    return _FOLD.int4_interleaved_norm_mm(x, weight, sz, layout.group_size, bias, sq, eps, gate_up)


def int4_residual_linear(
    x: torch.Tensor,
    layout: Int4Layout | None,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    gain: torch.Tensor,
    sq: torch.Tensor,
    clear: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's last projection with the residual add and the next norm's input, for one decode
    token: ``(y, gain * y)`` with ``y = h + x @ W.T + bias``; ``sum(y**2)`` added to the counter
    ``sq`` (zero before), the counter ``clear`` set to zero
    (:func:`quantcore_torch._fold.int4_interleaved_residual_mm`). Only where
    :func:`norm_fold_takes`; raises ``ValueError`` elsewhere."""
    _check_fold(x, layout)
    return _FOLD.int4_interleaved_residual_mm(
        x, layout.weight, layout.scales_and_zeros, layout.group_size, bias, h, gain, sq, clear
    )


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    counter: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One decode token's attention on a static KV cache at batch 1, in two Triton kernels
    (:mod:`quantcore_torch._attention`): ``q`` (one token's heads, in order) against ``keys`` and
    ``values`` (``[1, kv_heads, length, head_dim]``, key/value heads shared by groups of q heads)
    under ``mask`` (``None`` or one row of ``length``, boolean or added), scaled by ``scale``;
    ``[1, 1, heads, head_dim]`` as transformers' attention functions return it. ``counter`` (the
    static cache layer's one-value token count, or ``None``): advanced by one in the second
    kernel, in the step's order after the attention's reads. On the CPU, without Triton or for
    inputs the kernels do not take, returns ``None`` (and leaves ``counter`` alone) for the caller
    to run its own attention."""
    if _ATTENTION is None or not (q.is_cuda and keys.is_cuda and (mask is None or mask.is_cuda)):
        return None
    if _ATTENTION.decode_attention_mismatch(q, keys, values, mask) is not None:
        return None
    if counter is not None and _ATTENTION.counter_mismatch(counter, q) is not None:
        return None
    return _ATTENTION.decode_attention(q, keys, values, mask, scale, counter)
