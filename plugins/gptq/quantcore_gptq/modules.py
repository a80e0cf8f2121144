"""``GPTQLinear``: a linear layer holding its weight in the GPTQ checkpoint format.

The buffers are the checkpoint's tensors (:mod:`quantcore_gptq.packing`), so ``state_dict()`` is
what transformers and GPTQModel read, and a Hub checkpoint's tensors load as they are. The forward
goes through :func:`gptq_matmul`, the one place a faster kernel plugs in: today it dequantizes the
weight (any bits, any ``g_idx``) and calls ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gptq import GPTQResult
from .packing import pack_cols, pack_rows, packing_multiple, unpack_cols, unpack_rows, zeros_from_v1, zeros_to_v1

__all__ = ["GPTQLinear", "gptq_matmul"]

SCALE_DTYPE = torch.float16
"""The dtype GPTQ checkpoints store scales in."""


class GPTQLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as GPTQ ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``.

    ``checkpoint_format`` says how ``qzeros`` is stored (``"gptq"``: v1, minus one; ``"gptq_v2"``).
    ``dtype`` (:attr:`weight_dtype`) is the float dtype of the bias and of the weight the layer
    was made from. The
    constructor allocates uninitialised storage (``device="meta"`` for a skeleton to load into);
    :meth:`from_result` builds one from a GPTQ run.
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

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out_features, in_features]`` float weight, in ``dtype`` (default: :attr:`weight_dtype`)."""
        g_idx = self.g_idx.long()
        zeros = self.zero_points()[g_idx]
        scales = self.scales.float()[g_idx]
        weight = (self.codes() - zeros).float() * scales
        return weight.t().to(dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gptq_matmul(self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}"
        )


def gptq_matmul(module: GPTQLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` for a :class:`GPTQLinear`: the dispatch point for kernels.

    The reference path, correct for every bit width and ``g_idx``: dequantize in the input's dtype
    and ``F.linear``. A fused int4 kernel (quantcore-torch's, for ``bits=4`` with a trivially
    ordered ``g_idx``) is chosen here once it exists.
    """
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, module.dequantized_weight(x.dtype), bias)
