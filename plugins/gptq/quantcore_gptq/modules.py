"""``GPTQLinear``: a linear layer holding its weight in the GPTQ checkpoint format.

The buffers are the checkpoint's tensors (:mod:`quantcore_gptq.packing`), so ``state_dict()`` is
what transformers and GPTQModel read, and a Hub checkpoint's tensors load as they are. The forward
goes through :func:`gptq_matmul`, which picks the kernel:

- 4-bit layers whose ``g_idx`` is in natural order (GPTQ without act-order) have exactly the math of
  quantcore-torch's asymmetric group-wise int4 (``w = (q - zero) * scale``). For a few rows at a
  time (decoding), the weight is converted once into quantcore-torch's int4 format and kernel
  layout (CPU ``_weight_int4pack_mm_for_cpu``, CUDA tinygemm or Triton) and its fused matmul runs.
  The conversion is a cache beside the checkpoint's tensors, rebuilt when they move or change.
- Everything else (2, 3, 8 bits, act-order, many rows, a quantcore-torch without kernels) takes the
  reference path: dequantize the weight in the input's dtype, then ``F.linear``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from quantcore.layers import QuantizedLinear, linear_recomputing_weight

try:
    from quantcore_torch import kernels as int4_kernels
except ImportError:  # quantcore-torch from before its kernels module: the reference path only
    int4_kernels = None

from .gptq import GPTQResult
from .packing import pack_cols, pack_rows, packing_multiple, unpack_cols, unpack_rows, zeros_from_v1, zeros_to_v1

__all__ = ["GPTQLinear", "gptq_matmul"]

SCALE_DTYPE = torch.float16
"""The dtype GPTQ checkpoints store scales in."""


class GPTQLinear(QuantizedLinear):
    """``y = x @ W.T + b`` with ``W`` stored as GPTQ ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``.

    ``checkpoint_format`` says how ``qzeros`` is stored (``"gptq"``: v1, minus one; ``"gptq_v2"``).
    ``dtype`` (:attr:`weight_dtype`) is the float dtype of the bias and of the weight the layer
    was made from. The
    constructor allocates uninitialised storage (``device="meta"`` for a skeleton to load into);
    :meth:`from_result` builds one from a GPTQ run.

    It is an ``nn.Linear`` to other libraries (:class:`quantcore.layers.QuantizedLinear`), so PEFT's
    LoRA wraps it with a plain ``LoraConfig``; merging an adapter into it is refused (GPTQ needs
    calibration data to re-quantize).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        bias: bool,
        checkpoint_format: str = "gptq",
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        multiple = packing_multiple(bits)
        problems = []
        if in_features % multiple:
            problems.append(f"in_features {in_features} is not a multiple of {multiple}")
        if out_features % multiple:
            problems.append(f"out_features {out_features} is not a multiple of {multiple}")
        if problems:
            raise ValueError(f"the GPTQ format packs {bits}-bit codes in int32: " + "; ".join(problems))
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        self.weight_dtype = dtype
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        packed = in_features * bits // 32
        self.register_buffer("qweight", torch.empty(packed, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_result(
        cls, linear: nn.Linear, result: GPTQResult, *, bits: int, group_size: int, checkpoint_format: str
    ) -> GPTQLinear:
        """The layer for ``linear`` quantized as ``result`` says; ``linear``'s bias is shared."""
        module = cls(
            linear.in_features,
            linear.out_features,
            bits=bits,
            group_size=group_size,
            bias=linear.bias is not None,
            checkpoint_format=checkpoint_format,
            dtype=linear.weight.dtype,
            device="meta",
        )
        module.qweight = pack_rows(result.codes.t(), bits)
        qzeros = pack_cols(result.zeros, bits)
        module.qzeros = zeros_to_v1(qzeros, bits) if checkpoint_format == "gptq" else qzeros
        # own copies: layers quantized together share the result's storage, and a checkpoint would
        # then save their tensors once as tied
        module.scales = result.scales.to(SCALE_DTYPE).clone()
        module.g_idx = result.g_idx.to(torch.int32).clone()
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def zero_points(self) -> torch.Tensor:
        """int32 ``[groups, out_features]``: the zero points as they are (v1 storage undone)."""
        qzeros = zeros_from_v1(self.qzeros, self.bits) if self.checkpoint_format == "gptq" else self.qzeros
        return unpack_cols(qzeros, self.bits, self.out_features)

    def codes(self) -> torch.Tensor:
        """int32 ``[in_features, out_features]``: the weight codes, unpacked."""
        return unpack_rows(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Same as :meth:`dequantized_weight` (the :class:`~quantcore.layers.QuantizedLinear` API)."""
        return self.dequantized_weight(dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out_features, in_features]`` float weight, in ``dtype`` (default: :attr:`weight_dtype`)."""
        g_idx = self.g_idx.long()
        zeros = self.zero_points()[g_idx]
        scales = self.scales.float()[g_idx]
        weight = (self.codes() - zeros).float() * scales
        return weight.t().to(dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # Gradients flow through this frozen layer (LoRA adapters before it): the fused kernel has
            # no backward, so recompute the weight in the backward instead of keeping it.
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return linear_recomputing_weight(x, self, x.dtype, bias)
        return gptq_matmul(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}"
        )


def gptq_matmul(module: GPTQLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` for a :class:`GPTQLinear`: the fused int4 kernel where it applies, else the
    reference path (see the module docstring)."""
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if int4_kernels is not None and module.bits == 4 and 0 < rows <= _kernel_rows(x.device):
        compiling = torch.compiler.is_compiling()
        runtime = _compiled_runtime(module, x.dtype) if compiling else _int4_runtime(module, x.dtype)
        if runtime is not None:
            return int4_kernels.int4_weight_only_linear(
                x, runtime.packed, runtime.scale, runtime.zero, runtime.group_size, bias, runtime.layout
            )
    return F.linear(x, module.dequantized_weight(x.dtype), bias)


def _kernel_rows(device: torch.device) -> int:
    """Rows up to which quantcore-torch's int4 kernels run on ``device`` (its ``SMALL_BATCH`` where
    an older quantcore-torch has no per-device limit)."""
    rows = getattr(int4_kernels, "int4_kernel_rows", None)
    return rows(device) if rows is not None else int4_kernels.SMALL_BATCH


def reference_matmul(module: GPTQLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` through dequantize + ``F.linear`` alone: what the kernels are tested against."""
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, module.dequantized_weight(x.dtype), bias)


class _Int4Runtime(NamedTuple):
    """A 4-bit GPTQ weight in quantcore-torch's int4 format and kernel layout, for one device and dtype."""

    key: tuple[Any, ...]
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int
    layout: Any


def _compiled_runtime(module: GPTQLinear, dtype: torch.dtype) -> _Int4Runtime | None:
    """Under ``torch.compile``: the converted weight an eager call built, if it fits ``dtype`` and the device.

    Checking that the buffers did not change compares data pointers, which dynamo cannot trace; the
    compiled graph guards on the cached conversion instead. Without one (no eager forward ran in this
    dtype), the graph takes the dequantize path: correct, only slower.
    """
    cached = module.__dict__.get("_int4")
    if cached is None or cached[1] is None:
        return None
    key = cached[0]
    return cached[1] if key[1] == module.qweight.device and key[2] == dtype else None


def _int4_runtime(module: GPTQLinear, dtype: torch.dtype) -> _Int4Runtime | None:
    """The converted weight, built on first use and whenever the buffers moved, changed or the dtype did;
    ``None`` when ``g_idx`` is not in natural order (act-order)."""
    assert int4_kernels is not None
    qweight = module.qweight
    key = (qweight.data_ptr(), qweight.device, dtype, module.qzeros.data_ptr(), module.scales.data_ptr())
    cached = module.__dict__.get("_int4")
    if cached is not None and cached[0] == key:
        return cached[1]
    size = module.in_features if module.group_size == -1 else module.group_size
    natural = torch.arange(module.in_features, device=qweight.device, dtype=torch.int32) // size
    runtime = None
    if torch.equal(module.g_idx, natural):
        codes = module.codes().t().to(torch.uint8)  # [out, in], in quantcore-torch's packing: low nibble first
        packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        scale = module.scales.t().to(dtype).contiguous()
        zero = module.zero_points().t().to(dtype).contiguous()
        layout = None
        if qweight.device.type == "cpu":
            layout = int4_kernels.int4_cpu_layout(packed, scale, zero, module.in_features, size, dtype)
        elif qweight.is_cuda:
            layout = int4_kernels.int4_cuda_layout(packed, scale, zero, module.in_features, size, dtype)
        runtime = _Int4Runtime(key, packed, scale, zero, size, layout)
    module.__dict__["_int4"] = (key, runtime)
    return runtime
