"""``TorchWeightOnlyConfig``: the settings of the ``torch_wo`` backend, declared once per field."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from quantcore import QuantizationConfigMixin, config_field, define_config

__all__ = ["TorchWeightOnlyConfig"]


@define_config
class TorchWeightOnlyConfig(QuantizationConfigMixin):
    """Weight-only quantization of ``nn.Linear`` layers in plain PyTorch.

    ``bits=8``: symmetric int8, one scale per output channel. ``bits=4``: asymmetric int4, one scale
    and one zero point per ``group_size`` input columns, two values per byte. Activations stay in
    float; each forward runs a fused weight-only kernel where one fits (:mod:`quantcore_torch.kernels`)
    and dequantize + ``F.linear`` elsewhere.

    There are no cross-field rules: ``group_size`` is simply unused when ``bits=8``.
    """

    quant_method: ClassVar[str] = "torch_wo"
    skip_modules_field: ClassVar[str | None] = "modules_to_not_convert"

    bits: Literal[4, 8] = config_field(
        default=8,
        help="Bits per weight: 8 (per-channel symmetric int8) or 4 (group-wise asymmetric int4).",
    )
    group_size: int = config_field(
        default=128,
        choices=(32, 64, 128),
        help="Input columns sharing one int4 scale and zero point; smaller is more accurate and larger.",
    )
    compute_dtype: torch.dtype | None = config_field(
        default=None,
        choices=(None, torch.float16, torch.bfloat16, torch.float32, torch.float64),
        help="Dtype of the matmul; None uses the activation's dtype. Outputs keep the activation's dtype.",
    )
    modules_to_not_convert: list[str] | None = config_field(
        default=None,
        help="Module names or patterns to keep in float, in addition to the default skips.",
    )
