"""Method presets: short names (``nf4``, ``int4-torch``, ...) for whole quantization configs.

The command line's ``--method`` takes these names, and so does :func:`quantcore.demo.run`. Each is
a plain config dict, so this module names no backend class: ``resolve_method`` builds the config
through :class:`~quantcore.AutoQuantizationConfig`, which finds the backend by its plugin.
"""

from __future__ import annotations

from typing import Any

from .errors import QuantcoreError

__all__ = ["PRESETS", "UnknownPresetError", "resolve_method"]


class UnknownPresetError(QuantcoreError, LookupError):
    """A preset name that :data:`PRESETS` does not hold."""


#: ``--method`` shorthands: name -> (config dict, what it is).
PRESETS: dict[str, tuple[dict[str, Any], str]] = {
    "int8": ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes LLM.int8()"),
    "nf4": (
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "bitsandbytes 4-bit NormalFloat",
    ),
    "nf4-dq": (
        {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
        },
        "bitsandbytes NF4 with double-quantized scales",
    ),
    "fp4": (
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
        "bitsandbytes 4-bit float",
    ),
    "int8-torch": ({"quant_method": "torch_wo", "bits": 8}, "pure-PyTorch weight-only int8, per channel"),
    "int4-torch": ({"quant_method": "torch_wo", "bits": 4}, "pure-PyTorch weight-only int4, groups of 128"),
    # torchao (quantcore-torchao): the transformers 4.x string form, so the core names no torchao class.
    "int4-ao": (
        {
            "quant_method": "torchao",
            "quant_type": "int4_weight_only",
            "quant_type_kwargs": {"group_size": 128, "int4_packing_format": "tile_packed_to_4d"},
        },
        "torchao int4 weight-only, groups of 128, tinygemm kernel (CUDA)",
    ),
    "int8-ao": ({"quant_method": "torchao", "quant_type": "int8_weight_only"}, "torchao int8 weight-only, per channel"),
    "fp8-ao": (
        {
            "quant_method": "torchao",
            "quant_type": {
                "default": {
                    "_type": "Float8DynamicActivationFloat8WeightConfig",
                    "_version": 2,
                    "_data": {"granularity": {"_type": "PerRow", "_version": 1, "_data": {}}},
                }
            },
        },
        "torchao float8 weights and activations, per row (CUDA, compute capability 8.9+)",
    ),
    "fp8wo-ao": (
        {"quant_method": "torchao", "quant_type": "float8_weight_only"},
        "torchao float8 weight-only, per channel",
    ),
}


def resolve_method(name: str) -> Any:
    """A preset name -> its config (a :class:`~quantcore.QuantizationConfigMixin`)."""
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown --method {name!r}; choose one of {', '.join(PRESETS)} or pass --config FILE")
    # Imported here, not above: the command line reads PRESETS for --help without loading torch.
    from .auto import AutoQuantizationConfig

    return AutoQuantizationConfig.from_dict(PRESETS[name][0])
