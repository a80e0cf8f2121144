"""quantcore's bitsandbytes backend: ``BitsAndBytesConfig`` and ``BitsAndBytesQuantizer``.

``import quantcore_bnb`` works without bitsandbytes installed; bitsandbytes is imported when the
quantizer is first used (``quantcore.quantize(model, {"quant_method": "bitsandbytes", ...})``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import BitsAndBytesConfig
from .offload import keep_in_fp32

__all__ = ["BitsAndBytesConfig", "BitsAndBytesQuantizer", "keep_in_fp32"]

if TYPE_CHECKING:
    from .quantizer import BitsAndBytesQuantizer


def __getattr__(name: str) -> Any:
    if name == "BitsAndBytesQuantizer":
        from .quantizer import BitsAndBytesQuantizer

        return BitsAndBytesQuantizer
    raise AttributeError(f"module 'quantcore_bnb' has no attribute {name!r}")
