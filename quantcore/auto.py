"""The user-facing entry points: dispatch on ``quant_method``, quantize, dequantize."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .calibrate import quantize_walk
from .config import QuantizationConfigMixin
from .errors import ConfigError, QuantizationError
from .quantizer import Quantizer, module_nbytes
from .report import ModuleRecord, QuantizationReport
from .swap import swap_module
from .walk import Walk, paused_gc

__all__ = ["AutoQuantizationConfig", "AutoQuantizer", "dequantize", "quantize"]


class AutoQuantizationConfig:
    """Builds the config class registered for a dict's ``quant_method``."""

    @staticmethod
    def config_class(quant_method: Any) -> type[QuantizationConfigMixin]:
        """The config class registered for ``quant_method`` (usable here or not)."""
        from .registry import get_backend

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
        import json
        from pathlib import Path

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
        from .registry import get_backend

        resolved: QuantizationConfigMixin
        if isinstance(config, QuantizationConfigMixin):
            resolved = config.copy(**overrides) if overrides else config
        else:
            resolved = AutoQuantizationConfig.from_dict(config, **overrides)
        backend = get_backend(resolved.quant_method)
        return backend.quantizer_class()(resolved)


def quantize(
    model: nn.Module,
    config: QuantizationConfigMixin | Mapping[str, Any] | None,
    *,
    overrides: Mapping[str, Any] | None = None,
    skip_modules: list[str] | None = None,
    default_skips: bool = True,
    dry_run: bool = False,
    progress: bool | None = None,
    calibration: Iterable[Any] | None = None,
    calibration_device: torch.device | str | None = None,
) -> QuantizationReport:
    """Quantize ``model`` in place with ``config`` (the one-call form); returns the report.

    ``overrides`` maps patterns to other configs (of any backend) or ``None`` (keep in float); the
    first match wins. With ``dry_run=True`` nothing changes and the report is the plan.

    ``calibration`` feeds methods that quantize from activations (GPTQ): an iterable of token-id
    tensors (``[batch, seq]`` or ``[seq]``) or dicts of forward keyword arguments. The model then
    runs block by block on ``calibration_device`` (default: where its first block is), one block
    there at a time; the report gives the tokens each module saw. A method that needs calibration
    and gets none raises :class:`ConfigError` naming ``calibration``; a data-free method ignores
    it with a warning.
    """
    main = AutoQuantizer.from_config(config) if config is not None else None
    if main is None and not overrides:
        raise ConfigError([("config", "give a config, or overrides that choose one per module")])
    with paused_gc():
        walk = Walk.build(main, model, overrides, skip_modules, default_skips)
    return quantize_walk(walk, calibration, dry_run=dry_run, progress=progress, device=calibration_device)


def dequantize(model: nn.Module) -> QuantizationReport:
    """Turn every quantized module back into a float module (``nn.Linear``), all or none."""
    from .registry import available_backends

    start = time.perf_counter()
    quantizers = [
        info.backend.quantizer_class() for info in available_backends() if info.usable and info.backend is not None
    ]
    found: list[tuple[str, nn.Module, str, nn.Module, type[Quantizer]]] = []

    def visit(module: nn.Module, name: str) -> None:
        for child, sub in module._modules.items():
            if sub is None:
                continue
            full = f"{name}.{child}" if name else child
            owner = next((q for q in quantizers if q.is_quantized_module(sub)), None)
            if owner is not None:
                found.append((full, module, child, sub, owner))
            else:
                visit(sub, full)

    visit(model, "")
    built = []
    for full, parent, child, sub, owner in found:
        try:
            built.append((parent, child, sub, owner.dequantize_module(sub), owner, full))
        except Exception as exc:
            raise QuantizationError(
                f"could not dequantize module {full!r} ({type(sub).__name__}): {type(exc).__name__}: {exc}; "
                "the model was left unchanged"
            ) from exc
    records = []
    for parent, child, sub, new, owner, full in built:
        before, after = module_nbytes(sub), module_nbytes(new)
        swap_module(parent, child, new)
        records.append(
            ModuleRecord(
                full,
                type(sub).__name__,
                "dequantized",
                owner.__name__,
                None,
                sum(p.numel() for p in new.parameters()),
                before,
                after,
            )
        )
    params = sum(p.numel() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    before_total = total - sum(r.bytes_after - r.bytes_before for r in records)
    return QuantizationReport(records, params, before_total, total, seconds=time.perf_counter() - start)
