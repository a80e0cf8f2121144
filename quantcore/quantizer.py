"""``Quantizer``: the base class a backend's quantizer subclasses.

A backend implements four things: which module types it replaces (``replaces``), which types it
produces (``produces``), how big a module becomes (:meth:`~QuantizerBase.quantized_nbytes`) and
how to build the quantized module from a float one (:meth:`~QuantizerBase.create_quantized_module`);
those live in :class:`~quantcore.quantizer_base.QuantizerBase`, the part the engine calls. This
class adds what a user calls on a quantizer, :meth:`Quantizer.plan` and :meth:`Quantizer.quantize`,
which run the engine (:mod:`quantcore.walk`) and so sit above it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .calibrate import quantize_walk
from .quantizer_base import QuantizerBase, check_state, leaf_size, module_nbytes, tensor_nbytes
from .report import QuantizationReport
from .walk import Walk, paused_gc

__all__ = ["Quantizer", "QuantizerBase", "check_state", "leaf_size", "module_nbytes", "tensor_nbytes"]


class Quantizer(QuantizerBase):
    """Turns float modules into a backend's quantized modules, as its config says.

    A backend subclasses this and implements the methods of
    :class:`~quantcore.quantizer_base.QuantizerBase`; users call :meth:`plan` and :meth:`quantize`.
    """

    def plan(
        self,
        model: nn.Module,
        *,
        overrides: Mapping[str, Any] | None = None,
        skip_modules: list[str] | None = None,
        default_skips: bool = True,
    ) -> QuantizationReport:
        """What :meth:`quantize` would do, as a report; the model is not changed."""
        with paused_gc():
            walk = Walk.build(self, model, overrides, skip_modules, default_skips)
        return quantize_walk(walk, None, dry_run=True)

    def quantize(
        self,
        model: nn.Module,
        *,
        overrides: Mapping[str, Any] | None = None,
        skip_modules: list[str] | None = None,
        default_skips: bool = True,
        progress: bool | None = None,
        calibration: Iterable[Any] | None = None,
        calibration_device: torch.device | str | None = None,
    ) -> QuantizationReport:
        """Quantize ``model`` in place; every module is replaced, or (on any error) none is.

        :param overrides: ``{pattern: config | dict | None}``; the first pattern matching a module
            (or one of its ancestors) chooses its config, ``None`` keeps it in float.
        :param skip_modules: more names or patterns to keep in float, added to the config's own.
        :param default_skips: keep the output head and tied-weight linears in float (default).
        :param progress: show a progress bar (default: when stderr is a terminal and the work is long).
        :param calibration: batches for a calibrated method, as :func:`quantcore.quantize` takes them.
        :param calibration_device: where blocks are calibrated, as :func:`quantcore.quantize` says.
        """
        with paused_gc():
            walk = Walk.build(self, model, overrides, skip_modules, default_skips)
        return quantize_walk(walk, calibration, progress=progress, device=calibration_device)
