"""``QuantizationState``: what a quantize call did to a model, kept on the model for saving and loading."""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from .config import QuantizationConfigMixin
from .dispatch import AutoQuantizationConfig

__all__ = ["STATE_ATTRIBUTE", "QuantizationState", "get_quantization_state"]

STATE_ATTRIBUTE = "quantcore_state"


@attrs.define
class QuantizationState:
    """The configs a model was quantized with, and which config each quantized module used.

    ``modules`` maps a module name to ``"config"`` (the main config) or the override pattern whose
    config it used; a checkpoint carries this so loading rebuilds exactly the same skeleton.
    """

    config: QuantizationConfigMixin | None
    overrides: dict[str, QuantizationConfigMixin | None] = attrs.Factory(dict)
    skip_modules: list[str] = attrs.Factory(list)
    default_skips: bool = True
    modules: dict[str, str] = attrs.Factory(dict)

    def config_for(self, module_name: str) -> QuantizationConfigMixin | None:
        """The config a quantized module was made with (``None`` if it is not quantized)."""
        source = self.modules.get(module_name)
        if source is None:
            return None
        return self.config if source == "config" else self.overrides[source]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what checkpoints store)."""
        return {
            "config": self.config.to_dict() if self.config is not None else None,
            "overrides": {p: (c.to_dict() if c is not None else None) for p, c in self.overrides.items()},
            "skip_modules": list(self.skip_modules),
            "default_skips": self.default_skips,
            "modules": dict(self.modules),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationState:
        """Inverse of :meth:`to_dict`; configs are rebuilt through their registered classes."""

        def load(d: Any) -> QuantizationConfigMixin | None:
            return None if d is None else AutoQuantizationConfig.from_dict(d)

        return cls(
            config=load(data.get("config")),
            overrides={p: load(c) for p, c in (data.get("overrides") or {}).items()},
            skip_modules=list(data.get("skip_modules") or []),
            default_skips=bool(data.get("default_skips", True)),
            modules=dict(data.get("modules") or {}),
        )


def get_quantization_state(model: nn.Module) -> QuantizationState | None:
    """The :class:`QuantizationState` quantcore left on ``model``, or ``None`` if it was never quantized."""
    return model.__dict__.get(STATE_ATTRIBUTE)
