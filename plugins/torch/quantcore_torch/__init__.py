"""quantcore-torch: the pure-PyTorch weight-only backend of quantcore (``quant_method="torch_wo"``).

Names are imported lazily, so that quantcore's plugin discovery (which imports
``quantcore_torch.plugin``) loads only the config.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "FusionReport": ".fusion",
    "TorchWeightOnlyConfig": ".config",
    "WeightOnlyLinear": ".modules",
    "TorchWeightOnlyQuantizer": ".quantizer",
    "weight_only_nbytes": ".quantizer",
    "fuse_projections": ".fusion",
    "unfuse_projections": ".fusion",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:
    from .config import TorchWeightOnlyConfig
    from .fusion import FusionReport, fuse_projections, unfuse_projections
    from .modules import WeightOnlyLinear
    from .quantizer import TorchWeightOnlyQuantizer, weight_only_nbytes


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantcore_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
