"""quantcore-torchao: the torchao backend of quantcore (``quant_method="torchao"``).

Names are imported lazily, so that quantcore's plugin discovery (which imports
``quantcore_torchao.plugin``) loads only the config, and never torchao itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "TorchAoConfig": ".config",
    "parse_quant_type": ".config",
    "TorchAoEmbedding": ".modules",
    "TorchAoLinear": ".modules",
    "TorchAoQuantizer": ".quantizer",
    "config_for_module": ".quantizer",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:
    from .config import TorchAoConfig, parse_quant_type
    from .modules import TorchAoEmbedding, TorchAoLinear
    from .quantizer import TorchAoQuantizer, config_for_module


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantcore_torchao' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
