"""``BitsAndBytesConfig``: the same fields, defaults and meaning as transformers' config of that name.

A dict written by transformers (``to_dict()``, ``to_diff_dict()``, a checkpoint's
``quantization_config``) loads here and means the same; our :meth:`~BitsAndBytesConfig.to_dict`
loads in transformers. Where transformers is lax on purpose we are strict: an unknown key or
``bnb_4bit_quant_type="nf5"`` is an error naming the field, and ``to_dict()`` writes no private keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import attrs
import torch

from quantcore import ConfigError, QuantizationConfigMixin, config_field, define_config

__all__ = ["QUANT_STORAGE_DTYPES", "BitsAndBytesConfig"]

QUANT_STORAGE_DTYPES = (torch.float16, torch.float32, torch.int8, torch.uint8, torch.float64, torch.bfloat16)
"""The storage dtypes transformers accepts for the packed 4-bit weight."""

# transformers' to_dict() writes its properties' backing attributes next to the public keys.
_PRIVATE_KEYS = {"_load_in_4bit": "load_in_4bit", "_load_in_8bit": "load_in_8bit"}


def _dtype_or(default: torch.dtype) -> Any:
    """Field converter: ``None`` -> ``default``, a dtype name -> the dtype; anything else is kept
    as it is for the config's checks to report."""

    def convert(value: Any) -> Any:
        if value is None:
            return default
        if isinstance(value, str):
            found = getattr(torch, value.removeprefix("torch."), None)
            return found if isinstance(found, torch.dtype) else value
        return value

    return convert


def _dtype_field(default: torch.dtype, help: str, choices: Iterable[torch.dtype] | None = None) -> Any:
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return attrs.field(default=default, converter=_dtype_or(default), metadata=metadata)


@define_config
class BitsAndBytesConfig(QuantizationConfigMixin):
    """bitsandbytes quantization: LLM.int8() (``load_in_8bit``) or 4-bit FP4/NF4 (``load_in_4bit``).

    >>> BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").quantization_method()
    'nf4'
    """

    quant_method: ClassVar[str] = "bitsandbytes"
    skip_modules_field: ClassVar[str] = "llm_int8_skip_modules"

    load_in_8bit: bool = config_field(
        default=False, help="Quantize linear layers to 8 bits with LLM.int8() (bitsandbytes Linear8bitLt)."
    )
    load_in_4bit: bool = config_field(
        default=False, help="Quantize linear layers to 4 bits, FP4 or NF4 (bitsandbytes Linear4bit)."
    )
    llm_int8_threshold: float = config_field(
        default=6.0,
        help="LLM.int8() outlier threshold: activation columns with a magnitude above it are multiplied "
        "in 16-bit instead of int8 (0 turns the decomposition off).",
    )
    llm_int8_skip_modules: list[str] | None = config_field(
        default=None,
        help="Names or patterns of modules to keep in their original dtype (null: only the default "
        "skips, such as the output head).",
    )
    llm_int8_enable_fp32_cpu_offload: bool = config_field(
        default=False,
        help="Allow a device map that puts some modules on the CPU or disk; those stay unquantized in "
        "float32 (see quantcore_bnb.offload).",
    )
    llm_int8_has_fp16_weight: bool = config_field(
        default=False,
        help="Keep LLM.int8() layers' main weights in 16-bit and quantize them at every forward (for fine-tuning).",
    )
    bnb_4bit_compute_dtype: torch.dtype = _dtype_field(
        torch.float32,
        help="The dtype 4-bit layers compute in, inputs being cast to it (None picks float32).",
    )
    bnb_4bit_quant_type: Literal["fp4", "nf4"] = config_field(
        default="fp4", help="The 4-bit data type: 'fp4' (4-bit float) or 'nf4' (4-bit NormalFloat)."
    )
    bnb_4bit_use_double_quant: bool = config_field(
        default=False,
        help="Quantize the 4-bit layers' per-block scales again (8-bit, blocks of 256), saving about "
        "0.37 bits per weight.",
    )
    bnb_4bit_quant_storage: torch.dtype = _dtype_field(
        torch.uint8,
        help="The dtype the packed 4-bit weights are stored in (None picks uint8).",
        choices=QUANT_STORAGE_DTYPES,
    )

    def validate(self) -> Iterable[tuple[str, str]]:
        """``load_in_8bit`` and ``load_in_4bit`` exclude each other."""
        if self.load_in_8bit and self.load_in_4bit:
            yield ("load_in_4bit", "load_in_4bit and load_in_8bit are both true; choose one")

    @classmethod
    def normalize_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Fold transformers' private ``_load_in_4bit``/``_load_in_8bit`` keys into the public ones.

        A private key alone stands for the public one; a private key that contradicts the public
        one is an error (transformers would silently believe the public key).
        """
        problems = []
        for private, public in _PRIVATE_KEYS.items():
            if private not in data:
                continue
            value = data.pop(private)
            if public not in data:
                data[public] = value
            elif data[public] != value or type(data[public]) is not type(value):
                problems.append((private, f"is {value!r} but {public} is {data[public]!r}; drop one of them"))
        if problems:
            raise ConfigError(problems, title=f"invalid {cls.__name__}")
        return data

    def is_quantizable(self) -> bool:
        """Whether the config quantizes anything (8-bit or 4-bit)."""
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self) -> str | None:
        """``"llm_int8"``, ``"fp4"``, ``"nf4"``, or ``None`` when nothing is quantized."""
        if self.load_in_8bit:
            return "llm_int8"
        if self.load_in_4bit:
            return self.bnb_4bit_quant_type
        return None
