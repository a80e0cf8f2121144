"""Dispatch on ``quant_method``: a config dict to its backend's config class, a config to its quantizer.

It sits just above the registry, so the walk, the loaders and the user-facing entry points
(:mod:`quantcore.auto`, which re-exports both classes) can all turn a dict into a quantizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import QuantizationConfigMixin
from .errors import ConfigError
from .registry import get_backend

if TYPE_CHECKING:
    from .quantizer import Quantizer

__all__ = ["AutoQuantizationConfig", "AutoQuantizer"]


class AutoQuantizationConfig:
    """Builds the config class registered for a dict's ``quant_method``."""

    @staticmethod
    def config_class(quant_method: Any) -> type[QuantizationConfigMixin]:
        """The config class registered for ``quant_method`` (usable here or not)."""
        return get_backend(quant_method, require_usable=False).config_class

    @classmethod
    def from_dict(cls, config_dict: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """``{"quant_method": "bitsandbytes", ...}`` -> ``BitsAndBytesConfig(...)``.

        An unknown or missing method raises :class:`ConfigError` listing the installed methods.
        """
        if isinstance(config_dict, QuantizationConfigMixin):
            return config_dict
        if not isinstance(config_dict, Mapping):
            raise ConfigError([("", f"expected a JSON object (dict), got {type(config_dict).__name__}")])
        method = config_dict.get("quant_method", kwargs.get("quant_method"))
        return cls.config_class(method).from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_json_file(cls, path: Any) -> QuantizationConfigMixin:
        """Load a config JSON file (or a transformers ``config.json``'s ``quantization_config``)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError([("", f"{path}: not valid JSON ({exc})")]) from None
        if isinstance(data, dict) and "quant_method" not in data and "quantization_config" in data:
            data = data["quantization_config"]
        return cls.from_dict(data)


class AutoQuantizer:
    """Builds the quantizer of the backend a config belongs to."""

    @staticmethod
    def from_config(config: QuantizationConfigMixin | Mapping[str, Any], **overrides: Any) -> Quantizer:
        """``config`` (an instance or a dict) with ``overrides`` applied -> the backend's quantizer."""
        resolved: QuantizationConfigMixin
        if isinstance(config, QuantizationConfigMixin):
            resolved = config.copy(**overrides) if overrides else config
        else:
            resolved = AutoQuantizationConfig.from_dict(config, **overrides)
        backend = get_backend(resolved.quant_method)
        return backend.quantizer_class()(resolved)
