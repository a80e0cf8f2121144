"""``QuantizerBase``: what a backend's quantizer implements, and what the engine calls.

A backend implements four things: which module types it replaces (``replaces``), which types it
produces (``produces``), how big a module becomes (:meth:`~QuantizerBase.quantized_nbytes`) and
how to build the quantized module from a float one (:meth:`~QuantizerBase.create_quantized_module`).
Selection, skip lists, overrides, reports, rollback and the plugin hooks are the core's job.

Backends subclass :class:`quantcore.Quantizer`, which adds the user-facing ``plan`` and
``quantize`` on top of this class; this part sits below the walk (:mod:`quantcore.walk`), which
drives it, and the user-facing part above it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .layers import QuantizedLinear

if TYPE_CHECKING:
    from .calibrate import CalibrationBlock
    from .config import QuantizationConfigMixin

__all__ = ["QuantizerBase", "check_state", "leaf_size", "module_nbytes", "tensor_nbytes"]


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass (torchao's quantized weights), those of its inner tensors."""
    cls = type(tensor)  # a Parameter of a subclass has the subclass's type
    if cls is torch.Tensor or cls is nn.Parameter or not hasattr(cls, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
    return sum(tensor_nbytes(inner) for name in names if (inner := getattr(tensor, name)) is not None)


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (works on the meta device)."""
    if not module._modules:  # a leaf (the common case): skip the generic, slower traversal
        tensors = [*module._parameters.values(), *module._buffers.values()]
    else:
        tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor_nbytes(t) for t in tensors if t is not None)


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
        numel += p.numel()
        nbytes += tensor_nbytes(p)
    for b in buffers:
        nbytes += tensor_nbytes(b)
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


class QuantizerBase:
    """Turns float modules into a backend's quantized modules, as its config says (the backend's part).

    Subclass :class:`quantcore.Quantizer`, not this class: it adds ``plan`` and ``quantize``.
    """

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
        """Whether ``module`` is a float module this backend can quantize.

        Never a :class:`~quantcore.layers.QuantizedLinear` (of any backend): it is an ``nn.Linear``
        to other libraries, but already quantized.
        """
        return (
            isinstance(module, self.replaces)
            and not isinstance(module, QuantizedLinear)
            and not self.is_quantized_module(module)
        )

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
    def checkpoint_metadata(cls, modules: Mapping[str, nn.Module]) -> dict[str, str]:
        """Entries for the safetensors header of a checkpoint holding ``modules`` (``{name: module}``,
        every module of this backend in the model). Empty by default; a backend whose state dict
        flattens tensor subclasses writes what rebuilding them takes (as torchao's format does)."""
        return {}

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
