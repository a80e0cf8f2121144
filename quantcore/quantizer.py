"""``Quantizer``: the base class a backend's quantizer subclasses.

A backend implements four things: which module types it replaces (``replaces``), which types it
produces (``produces``), how big a module becomes (:meth:`quantized_nbytes`) and how to build the
quantized module from a float one (:meth:`create_quantized_module`). Selection, skip lists,
overrides, reports, rollback and the plugin hooks are the core's job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from .calibrate import CalibrationBlock
    from .config import QuantizationConfigMixin
    from .report import QuantizationReport

__all__ = ["Quantizer", "check_state", "leaf_size", "module_nbytes"]


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (works on the meta device)."""
    if not module._modules:  # a leaf (the common case): skip the generic, slower traversal
        tensors = [*module._parameters.values(), *module._buffers.values()]
    else:
        tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def leaf_size(module: nn.Module) -> tuple[int, int]:
    """``(parameters, bytes of parameters and buffers)`` of a module, in one pass."""
    if module._modules:
        params = list(module.parameters())
        buffers = list(module.buffers())
    else:  # a leaf (the common case): skip the generic, slower traversal
        params = [p for p in module._parameters.values() if p is not None]
        buffers = [b for b in module._buffers.values() if b is not None]
    numel = 0
    nbytes = 0
    for p in params:
        n = p.numel()
        numel += n
        nbytes += n * p.element_size()
    for b in buffers:
        nbytes += b.numel() * b.element_size()
    return numel, nbytes


def check_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise one ``ValueError`` naming every missing, unexpected or mis-shaped (or mis-typed) tensor."""
    expected = module.state_dict(keep_vars=True)
    problems = [f"missing tensor {k!r}" for k in expected if k not in state]
    problems += [f"unexpected tensor {k!r}" for k in state if k not in expected]
    for key, tensor in state.items():
        want = expected.get(key)
        if want is None or not isinstance(tensor, torch.Tensor):
            continue
        if tuple(tensor.shape) != tuple(want.shape):
            problems.append(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(want.shape)}")
        elif tensor.dtype != want.dtype:
            problems.append(f"tensor {key!r} has dtype {tensor.dtype}, expected {want.dtype}")
    if problems:
        raise ValueError("; ".join(problems))


class Quantizer:
    """Turns float modules into a backend's quantized modules, as its config says."""

    replaces: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    """Module types this backend can replace."""

    produces: ClassVar[tuple[type[nn.Module], ...]] = ()
    """Module types this backend creates (how :func:`quantcore.dequantize` recognises them)."""

    requires_calibration: ClassVar[bool] = False
    """Whether the method quantizes from calibration activations (GPTQ, AWQ): the engine then runs
    the model block by block and calls :meth:`quantize_block` instead of
    :meth:`create_quantized_module` (which still builds the meta skeletons checkpoints load into)."""

    def __init__(self, config: QuantizationConfigMixin):
        self.config = config

    # ------------------------------------------------------------------ for backend authors
    def check_environment(self) -> None:
        """Raise :class:`~quantcore.BackendUnavailableError` if this machine can't run the backend."""

    def describe(self) -> str:
        """A short label for reports (``"bitsandbytes nf4"``)."""
        return self.config.quant_method

    def can_replace(self, module: nn.Module) -> bool:
        """Whether ``module`` is a float module this backend can quantize."""
        return isinstance(module, self.replaces) and not self.is_quantized_module(module)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why :meth:`can_replace` refuses ``module`` (shown in reports); ``None`` when it does not."""
        if self.can_replace(module):
            return None
        return f"{type(module).__name__} not supported by {self.describe()}"

    def quantized_nbytes(self, module: nn.Module) -> int:
        """Bytes ``module`` will take once quantized (from shapes alone; it may be on the meta device)."""
        raise NotImplementedError(f"{type(self).__name__} must implement quantized_nbytes()")

    def create_quantized_module(self, module: nn.Module, name: str) -> nn.Module:
        """Build the quantized replacement of ``module`` (called ``name`` in the model).

        Reuse ``module``'s weights (never run a random initialisation) and leave ``module`` itself
        unchanged: the core swaps modules only once every replacement was built. A ``module`` on
        the meta device gives a quantized module on the meta device (a skeleton to load into).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement create_quantized_module()")

    def load_quantized_state(
        self, module: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device | str | None = None
    ) -> nn.Module:
        """Fill a quantized skeleton with tensors saved from ``quantized_module.state_dict()``.

        ``module`` comes from :meth:`create_quantized_module` on a meta-device float module;
        ``state`` holds its tensors (keys without the module's prefix). Return the loaded module,
        placed on ``device`` (it may be a new object). Raise ``ValueError`` naming the tensor when
        ``state`` does not fit. The default is ``load_state_dict(strict=True, assign=True)``.
        """
        check_state(module, state)
        module.load_state_dict(dict(state), strict=True, assign=True)
        return module.to(device) if device is not None else module

    def offload_policy(self) -> str:
        """What becomes of modules a device map puts on the CPU or disk beside GPUs.

        ``"quantized"``: quantize them like the rest (the backend runs there, or the quantized
        tensors just move); ``"float"``: keep them unquantized, in float32 (bitsandbytes' fp32 CPU
        offload); ``"refuse"``: such a map is an error (the default, the safe answer).
        """
        return "refuse"

    @classmethod
    def is_quantized_module(cls, module: nn.Module) -> bool:
        """Whether ``module`` is one this backend produced."""
        return bool(cls.produces) and isinstance(module, cls.produces)

    @classmethod
    def dequantize_module(cls, module: nn.Module) -> nn.Module:
        """A float module equivalent to the quantized ``module`` (``nn.Linear`` for linear layers)."""
        raise NotImplementedError(f"{cls.__name__} cannot dequantize")

    # ------------------------------------------------------------------ calibrated backends
    def quantize_block(self, block: CalibrationBlock) -> None:
        """Quantize the modules ``block.targets`` of one repeated block from calibration activations.

        Called once per block, in order, by a calibrated quantize call (:attr:`requires_calibration`).
        Observe the inputs of the targets with ``block.observe(names, fn)`` while ``block.run()``
        feeds the block every calibration batch, build each quantized module, and put it in place
        with ``block.replace(name, new)``; every target must be replaced. The block's later runs,
        and the next block's inputs, go through what was replaced. Raise to refuse: the engine
        undoes every replacement of the call and names the block.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement quantize_block() (requires_calibration)")

    def calibration_data(self, model: nn.Module) -> Iterable[Any] | None:
        """Calibration batches built from the config (a dataset and tokenizer it names), or ``None``.

        Asked only when a calibrated call got no ``calibration=`` argument.
        """
        return None

    def blocks_name(self) -> str | None:
        """The qualified name of the ``nn.ModuleList`` of blocks to calibrate; ``None`` infers it."""
        return None

    # ------------------------------------------------------------------ for users
    def plan(
        self,
        model: nn.Module,
        *,
        overrides: Mapping[str, Any] | None = None,
        skip_modules: list[str] | None = None,
        default_skips: bool = True,
    ) -> QuantizationReport:
        """What :meth:`quantize` would do, as a report; the model is not changed."""
        from .calibrate import quantize_walk
        from .walk import Walk, paused_gc

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
        from .calibrate import quantize_walk
        from .walk import Walk, paused_gc

        with paused_gc():
            walk = Walk.build(self, model, overrides, skip_modules, default_skips)
        return quantize_walk(walk, calibration, progress=progress, device=calibration_device)
