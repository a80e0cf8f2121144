"""``TorchWeightOnlyQuantizer``: turns ``nn.Linear`` layers into :class:`WeightOnlyLinear` and back."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from quantcore import Quantizer

from .config import TorchWeightOnlyConfig
from .modules import WeightOnlyLinear

__all__ = ["TorchWeightOnlyQuantizer", "weight_only_nbytes"]


def weight_only_nbytes(out_features: int, in_features: int, *, bits: int, group_size: int, dtype: torch.dtype) -> int:
    """Bytes of a :class:`WeightOnlyLinear` weight (``qweight``, ``scale``, ``zero``), bias excluded."""
    if bits == 8:
        return out_features * in_features + out_features * dtype.itemsize
    groups = -(-in_features // group_size)
    return out_features * -(-in_features // 2) + 2 * out_features * groups * dtype.itemsize


class TorchWeightOnlyQuantizer(Quantizer):
    """Quantizes the weights of ``nn.Linear`` layers as :class:`TorchWeightOnlyConfig` says."""

    config: TorchWeightOnlyConfig
    replaces = (nn.Linear,)
    produces = (WeightOnlyLinear,)

    def describe(self) -> str:
        if self.config.bits == 8:
            return "torch_wo int8"
        return f"torch_wo int4 g{self.config.group_size}"

    def can_replace(self, module: nn.Module) -> bool:
        # Integer weights are already "quantized" by someone else: leave them alone. (Linears that
        # nn.MultiheadAttention reads directly are kept in float by the core's default rules.)
        return super().can_replace(module) and module.weight.is_floating_point()

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if self.can_replace(module):
            return None
        if isinstance(module, nn.Linear) and not module.weight.is_floating_point():
            return f"weight dtype {module.weight.dtype} is not floating point"
        return super().unsupported_reason(module)

    def offload_policy(self) -> str:
        """Offloaded modules are quantized too: the weights are plain tensors that run anywhere."""
        return "quantized"

    def quantized_nbytes(self, module: nn.Module) -> int:
        weight = weight_only_nbytes(
            module.out_features,
            module.in_features,
            bits=self.config.bits,
            group_size=self.config.group_size,
            dtype=module.weight.dtype,
        )
        bias = module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
        return weight + bias

    def create_quantized_module(self, module: nn.Module, name: str) -> WeightOnlyLinear:
        return WeightOnlyLinear.from_linear(
            module,
            bits=self.config.bits,
            group_size=self.config.group_size,
            compute_dtype=self.config.compute_dtype,
        )

    def load_quantized_state(
        self, module: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> nn.Module:
        # load_state_dict(assign=True) would take a tensor of the wrong dtype as it is; name every
        # mismatch at once instead, as the base class's contract asks (ValueError).
        expected = module.state_dict(keep_vars=True)
        problems = [f"{key}: missing" for key in expected if key not in state]
        problems += [f"{key}: unexpected" for key in state if key not in expected]
        for key, want in expected.items():
            got = state.get(key)
            if got is not None and (got.shape != want.shape or got.dtype != want.dtype):
                problems.append(f"{key}: expected {want.dtype} {tuple(want.shape)}, got {got.dtype} {tuple(got.shape)}")
        if problems:
            raise ValueError(f"state does not fit {module.extra_repr()}: " + "; ".join(problems))
        return super().load_quantized_state(module, state, device)

    @classmethod
    def dequantize_module(cls, module: nn.Module) -> nn.Linear:
        assert isinstance(module, WeightOnlyLinear)
        return module.to_linear()
