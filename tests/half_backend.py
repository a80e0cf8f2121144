"""A tiny but real backend used by the core tests: weights stored in float16.

It exists so the core's tests do not depend on bitsandbytes; the ``make_plugin`` factory builds
plugins around it under any quant_method, and ``FailingQuantizer`` fails on a chosen module.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

import quantcore
from quantcore import Backend, QuantizationConfigMixin, Quantizer, config_field, define_config


@define_config
class HalfConfig(QuantizationConfigMixin):
    """Store linear weights in float16."""

    quant_method: ClassVar[str] = "half"
    skip_modules_field: ClassVar[str] = "modules_to_not_convert"
    modules_to_not_convert: list[str] | None = config_field(default=None, help="Modules kept in float.")
    fail_on: str | None = config_field(default=None, help="Test knob: raise when quantizing this module.")


class HalfLinear(nn.Module):
    """A linear layer whose weight is stored in float16 and computed in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.detach().to(torch.float16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


class HalfQuantizer(Quantizer):
    """Quantizer of the ``half`` backend."""

    produces = (HalfLinear,)

    def describe(self) -> str:
        return f"{self.config.quant_method} fp16"

    def quantized_nbytes(self, module: nn.Module) -> int:
        bias = module.bias.numel() * module.bias.element_size() if module.bias is not None else 0
        return module.weight.numel() * 2 + bias

    def create_quantized_module(self, module: nn.Module, name: str) -> nn.Module:
        if self.config.fail_on == name:
            raise RuntimeError("failing on purpose")
        return HalfLinear(module.weight, module.bias)

    @classmethod
    def dequantize_module(cls, module: nn.Module) -> nn.Module:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight.float())
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone())
        return linear


def make_plugin(
    method: str = "half", requires: tuple[str, ...] = (), hint: str | None = None, config_files: tuple[str, ...] = ()
) -> type:
    """A plugin class registering the half backend under ``method``."""
    config = (
        HalfConfig
        if method == "half"
        else define_config(
            type(f"HalfConfig_{method}", (HalfConfig,), {"quant_method": method, "__module__": __name__})
        )
    )

    class Plugin:
        @quantcore.hookimpl
        def register_backends(register):
            register(
                Backend(
                    method,
                    config,
                    HalfQuantizer,
                    requires=requires,
                    install_hint=hint,
                    description="float16 weights (tests)",
                    config_files=config_files,
                )
            )

    Plugin.__name__ = f"plugin_{method}"
    return Plugin
