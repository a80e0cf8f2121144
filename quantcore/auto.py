"""The user-facing entry points: quantize and dequantize (dispatch on ``quant_method`` is :mod:`quantcore.dispatch`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .calibrate import quantize_walk
from .config import QuantizationConfigMixin
from .dispatch import AutoQuantizationConfig, AutoQuantizer
from .errors import ConfigError, QuantizationError
from .quantizer import Quantizer, module_nbytes
from .registry import available_backends
from .report import ModuleRecord, QuantizationReport
from .swap import swap_module
from .walk import Walk, paused_gc

__all__ = ["AutoQuantizationConfig", "AutoQuantizer", "dequantize", "quantize"]


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
