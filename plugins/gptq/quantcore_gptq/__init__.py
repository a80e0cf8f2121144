"""quantcore-gptq: GPTQ on quantcore's calibration engine (``quant_method="gptq"``).

Names are imported lazily, so that quantcore's plugin discovery (which imports
``quantcore_gptq.plugin``) loads only the config.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GPTQConfig": ".config",
    "GPTQLinear": ".modules",
    "GPTQQuantizer": ".quantizer",
    "gptq_quantize": ".gptq",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:
    from .config import GPTQConfig
    from .gptq import gptq_quantize
    from .modules import GPTQLinear
    from .quantizer import GPTQQuantizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantcore_gptq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
