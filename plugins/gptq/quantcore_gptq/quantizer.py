"""``GPTQQuantizer``: the GPTQ backend's quantizer (sizes, skeletons, loading, dequantizing).

What it does with each block of the calibration engine is :mod:`quantcore_gptq.calibration`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantcore import Quantizer

from .calibration import calibration_batches, quantize_block
from .config import GPTQConfig
from .modules import SCALE_DTYPE, GPTQLinear
from .packing import packing_multiple

if TYPE_CHECKING:
    from quantcore.calibrate import CalibrationBlock

__all__ = ["GPTQQuantizer", "gptq_nbytes"]


def gptq_nbytes(out_features: int, in_features: int, *, bits: int, group_size: int) -> int:
    """Bytes of a :class:`GPTQLinear`'s weight tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    groups = 1 if group_size == -1 else -(-in_features // group_size)
    packed = in_features * out_features * bits // 8
    return packed + groups * out_features * bits // 8 + groups * out_features * SCALE_DTYPE.itemsize + 4 * in_features


class GPTQQuantizer(Quantizer):
    """Quantizes the linear layers of a model's repeated blocks with GPTQ."""

    config: GPTQConfig
    replaces = (nn.Linear,)
    produces = (GPTQLinear,)
    requires_calibration = True

    def describe(self) -> str:
        return self.config.describe()

    def can_replace(self, module: nn.Module) -> bool:
        if not super().can_replace(module) or not module.weight.is_floating_point():
            return False
        multiple = packing_multiple(self.config.bits)
        return module.in_features % multiple == 0 and module.out_features % multiple == 0

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if self.can_replace(module):
            return None
        if isinstance(module, nn.Linear) and module.weight.is_floating_point():
            multiple = packing_multiple(self.config.bits)
            return (
                f"{module.in_features}x{module.out_features} does not pack at {self.config.bits} bits "
                f"(both sizes must be multiples of {multiple})"
            )
        return super().unsupported_reason(module)

    def offload_policy(self) -> str:
        """Offloaded modules stay quantized: the packed tensors run (slowly) anywhere."""
        return "quantized"

    def quantized_nbytes(self, module: nn.Module) -> int:
        bias = module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
        sizes = gptq_nbytes(
            module.out_features, module.in_features, bits=self.config.bits, group_size=self.config.group_size
        )
        return sizes + bias

    def blocks_name(self) -> str | None:
        return self.config.block_name_to_quantize

    # ------------------------------------------------------------------ skeletons and checkpoints
    def create_quantized_module(self, module: nn.Module, name: str) -> GPTQLinear:
        """The skeleton a checkpoint loads into (``module`` on the meta device); GPTQ itself needs
        calibration, so a float module with real weights is refused."""
        if not module.weight.is_meta:
            raise ValueError(
                "GPTQ quantizes from calibration data: call quantcore.quantize(model, config, calibration=...) "
                "on a model with its float weights"
            )
        return GPTQLinear(
            module.in_features,
            module.out_features,
            bits=self.config.bits,
            group_size=self.config.group_size,
            bias=module.bias is not None,
            checkpoint_format=self.config.format,
            dtype=module.weight.dtype,
            device="meta",
        )

    def load_quantized_state(
        self, module: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> nn.Module:
        """Fill a skeleton with a checkpoint's tensors; float tensors take the skeleton's dtypes
        (Hub checkpoints store fp16 biases for bf16 models), packed ones must be int32."""
        expected = module.state_dict(keep_vars=True)
        problems = [f"{key}: missing" for key in expected if key not in state]
        problems += [f"{key}: unexpected" for key in state if key not in expected]
        converted: dict[str, torch.Tensor] = {}
        for key, want in expected.items():
            got = state.get(key)
            if got is None:
                continue
            if tuple(got.shape) != tuple(want.shape):
                problems.append(f"{key}: expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
            elif got.is_floating_point() != want.is_floating_point() or (
                not want.is_floating_point() and got.dtype != want.dtype
            ):
                problems.append(f"{key}: expected {want.dtype}, got {got.dtype}")
            else:
                converted[key] = got.to(want.dtype)
        if problems:
            raise ValueError(f"state does not fit GPTQLinear({module.extra_repr()}): " + "; ".join(problems))
        return super().load_quantized_state(module, converted, device)

    @classmethod
    def dequantize_module(cls, module: nn.Module) -> nn.Linear:
        assert isinstance(module, GPTQLinear)
        return module.to_linear()

    # ------------------------------------------------------------------ calibration
    def calibration_data(self, model: nn.Module) -> Iterable[Any] | None:
        """Token ids of ``config.dataset`` (a list of texts) through ``config.tokenizer``, one text per batch."""
        return calibration_batches(self.config)

    def quantize_block(self, block: CalibrationBlock) -> None:
        """GPTQ every target of ``block``, group by group (see :mod:`quantcore_gptq.calibration`)."""
        quantize_block(self.config, block)
