"""quantcore: a plugin-based, multi-backend quantization framework for PyTorch models.

Names are imported lazily: ``import quantcore`` loads no plugin and no backend package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": ".errors",
    "QuantcoreError": ".errors",
    "PluginError": ".errors",
    "BackendUnavailableError": ".errors",
    "QuantizationError": ".errors",
    "QuantizationVetoed": ".errors",
    "CheckpointError": ".errors",
    "QuantizationConfigMixin": ".config",
    "define_config": ".config",
    "config_field": ".config",
    "converter": ".converter",
    "hookimpl": ".hookspecs",
    "hookspec": ".hookspecs",
    "register_plugin": ".plugins",
    "unregister_plugin": ".plugins",
    "disable_plugins": ".plugins",
    "enable_plugins": ".plugins",
    "reset_plugins": ".plugins",
    "list_plugins": ".plugins",
    "get_plugin_manager": ".plugins",
    "Backend": ".registry",
    "BackendInfo": ".registry",
    "available_backends": ".registry",
    "get_backend": ".registry",
    "Quantizer": ".quantizer",
    "QuantizedLinear": ".layers",
    "QuantizationReport": ".report",
    "ModuleRecord": ".report",
    "AutoQuantizationConfig": ".auto",
    "AutoQuantizer": ".auto",
    "quantize": ".auto",
    "dequantize": ".auto",
    "compile_pattern": ".match",
    "QuantizationState": ".state",
    "get_quantization_state": ".state",
    "save_quantized": ".checkpoint",
    "load_quantized": ".checkpoint",
    "from_pretrained": ".loading",
    "empty_weights": ".loading",
}

__all__ = [*sorted(_EXPORTS), "__version__"]

if TYPE_CHECKING:
    from .auto import AutoQuantizationConfig, AutoQuantizer, dequantize, quantize
    from .checkpoint import load_quantized, save_quantized
    from .config import QuantizationConfigMixin, config_field, define_config
    from .converter import converter
    from .errors import (
        BackendUnavailableError,
        CheckpointError,
        ConfigError,
        PluginError,
        QuantcoreError,
        QuantizationError,
        QuantizationVetoed,
    )
    from .hookspecs import hookimpl, hookspec
    from .layers import QuantizedLinear
    from .loading import empty_weights, from_pretrained
    from .match import compile_pattern
    from .plugins import (
        disable_plugins,
        enable_plugins,
        get_plugin_manager,
        list_plugins,
        register_plugin,
        reset_plugins,
        unregister_plugin,
    )
    from .quantizer import Quantizer
    from .registry import Backend, BackendInfo, available_backends, get_backend
    from .report import ModuleRecord, QuantizationReport
    from .state import QuantizationState, get_quantization_state


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
