"""Calibrated quantization: the model runs block by block on calibration inputs.

Methods such as GPTQ, AWQ or SmoothQuant quantize a layer from the activations it sees. The engine
here does what GPTQ implementations and llm-compressor do:

1. find the repeated blocks (the decoder layers: the largest ``nn.ModuleList`` of same-type children);
2. run the model on each calibration batch until block 0, and keep that block's inputs (positional
   and keyword: attention masks, rotary ``position_embeddings``);
3. for each block in turn: move it to the calibration device, let each calibrated backend quantize
   its modules from those inputs (:meth:`quantcore.Quantizer.quantize_block`, handed a
   :class:`CalibrationBlock`), run the now quantized block to get the next block's inputs, and move
   it back.

One block and the activations of one block boundary are on the device at a time. Modules a
calibrated backend would quantize outside the blocks (a head, a projector) are kept in float and
say so in the report. Every replacement is journaled: on any error all are undone and the model is
left as it was. Data-free backends in the same call (overrides) are built as usual and swapped in
at the end.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from .errors import ConfigError, QuantizationError
from .plugins import call_observers
from .quantizer_base import QuantizerBase as Quantizer
from .report import QuantizationReport
from .walk import Decision, Walk, paused_gc, record_state, report_decisions

__all__ = ["CalibratedRun", "CalibrationBlock", "find_blocks", "quantize_walk"]

Inputs = list[tuple[tuple[Any, ...], dict[str, Any]]]
"""The inputs of one block: ``(args, kwargs)`` of its forward, one pair per calibration batch."""


class _ReachedBlock(Exception):
    """Raised by the pre-hook on block 0: the rest of the model need not run."""


class _ReachedLast(Exception):
    """Raised once every module a :meth:`CalibrationBlock.run` waits for has run: the rest of the block need not."""


# ====================================================================== finding the blocks
def find_blocks(model: nn.Module, name: str | None = None) -> tuple[str, nn.ModuleList]:
    """The repeated blocks of ``model``: ``(qualified name, the nn.ModuleList)``.

    ``name`` picks the list (``"model.layers"``); otherwise it is the ``nn.ModuleList`` whose
    children all share one type and that holds the most parameters, as GPTQModel and llm-compressor
    find decoder layers.
    """
    if name is not None:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            found = None
        if not isinstance(found, nn.ModuleList) or not len(found):
            raise ConfigError([("block_name_to_quantize", f"{name!r} is not a non-empty nn.ModuleList of the model")])
        return name, found
    best: tuple[str, nn.ModuleList, int] | None = None
    for qualified, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[2]):
                best = (qualified, module, size)
    if best is None:
        raise QuantizationError(
            f"{type(model).__name__} has no repeated blocks (an nn.ModuleList of same-type layers) to calibrate "
            "block by block; name them with the config's block option"
        )
    return best[0], best[1]


# ====================================================================== what a backend is handed
@attrs.define(eq=False)
class CalibrationBlock:
    """One repeated block during calibration: what :meth:`quantcore.Quantizer.quantize_block` gets.

    The backend quantizes every module of :attr:`targets` from the activations it observes with
    :meth:`observe` while :meth:`run` feeds the block, and puts each quantized module in place
    with :meth:`replace` (later runs then go through it: that is how GPTQ's ``true_sequential``
    works). The engine checks that every target was replaced, undoes everything on error, and
    counts the tokens each target was observed with for the report.
    """

    name: str
    """The block's qualified name (``"model.layers.3"``)."""
    module: nn.Module
    """The block, on :attr:`device`."""
    targets: dict[str, nn.Module]
    """``{name inside the block: float module}`` this backend must quantize (``"self_attn.q_proj"``)."""
    device: torch.device
    """Where the block and its inputs are."""
    _inputs: Inputs = attrs.field(repr=False)
    _journal: list[tuple[nn.Module, str, nn.Module]] = attrs.field(repr=False)
    tokens: dict[str, int] = attrs.Factory(dict)
    """Tokens each target was last observed with (filled by :meth:`observe`)."""
    replaced: dict[str, nn.Module] = attrs.Factory(dict)
    """``{target name: its quantized module}``, filled by :meth:`replace`."""

    @property
    def batches(self) -> int:
        """How many calibration batches :meth:`run` feeds."""
        return len(self._inputs)

    def run(self, stop_after: Iterable[str] | None = None) -> None:
        """Run the block's forward on every calibration batch (outputs are dropped).

        ``stop_after`` names modules of the block: each batch stops once all of them have run,
        which saves the rest of the block when only their inputs are wanted.
        """
        waiting = set(stop_after or ())
        left: set[str] = set()
        handles = []

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                left.discard(name)
                if not left:
                    raise _ReachedLast

            return hook

        try:
            for name in waiting:
                handles.append(self.module.get_submodule(name).register_forward_hook(hook_for(name)))
            with torch.no_grad():
                for args, kwargs in self._inputs:
                    left.update(waiting)
                    with contextlib.suppress(_ReachedLast):
                        self.module(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def observe(self, names: Iterable[str], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """While open, call ``fn(name, x)`` with the input of each named module at each forward.

        ``x`` is the module's first input flattened to ``[tokens, features]``. The token count of
        each name restarts with each ``observe``: the report shows the last one.
        """
        names = list(names)
        counts = dict.fromkeys(names, 0)
        handles = []

        def hook_for(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                x = x.reshape(-1, x.shape[-1])
                counts[name] += x.shape[0]
                fn(name, x)

            return hook

        try:
            for name in names:
                handles.append(self.module.get_submodule(name).register_forward_pre_hook(hook_for(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.tokens.update(counts)

    def replace(self, name: str, new: nn.Module) -> None:
        """Put the quantized ``new`` in place of the target ``name`` (undone if the call fails)."""
        if name not in self.targets:
            raise KeyError(f"{name!r} is not a target of block {self.name!r}: {', '.join(self.targets)}")
        parent_name, _, child = name.rpartition(".")
        parent = self.module.get_submodule(parent_name) if parent_name else self.module
        old = parent._modules[child]
        assert old is not None
        new.train(old.training)
        self._journal.append((parent, child, old))
        parent._modules[child] = new
        self.replaced[name] = new


# ====================================================================== entry point
def quantize_walk(
    walk: Walk,
    calibration: Iterable[Any] | None,
    *,
    dry_run: bool = False,
    progress: bool | None = None,
    device: torch.device | str | None = None,
) -> QuantizationReport:
    """Run (or plan) ``walk``, block by block on ``calibration`` when a backend needs it.

    A data-free walk given calibration data ignores it with a warning. A calibrated one without
    data asks its backends for a default (:meth:`Quantizer.calibration_data`), else raises a
    :class:`ConfigError` naming ``calibration``.
    """
    calibrated = [q for q in walk.quantizers if q.requires_calibration]
    if not calibrated:
        if calibration is not None:
            names = ", ".join(q.describe() for q in walk.quantizers) or "no method"
            warnings.warn(
                f"calibration data ignored: {names} quantizes from the weights alone", UserWarning, stacklevel=3
            )
        with paused_gc():
            return walk.plan() if dry_run else walk.run(progress=progress)
    run = CalibratedRun(walk, device=None if device is None else torch.device(device))
    if dry_run:
        return run.plan()
    if calibration is None:
        calibration = next((d for q in calibrated if (d := q.calibration_data(walk.model)) is not None), None)
    if calibration is None:
        names = ", ".join(sorted({q.describe() for q in calibrated}))
        raise ConfigError(
            [
                (
                    "calibration",
                    f"{names} needs calibration data: pass quantize(model, config, calibration=batches), an "
                    "iterable of token-id tensors or dicts of forward keyword arguments",
                )
            ],
            title="missing calibration data",
        )
    return run.run(calibration, progress=progress)


# ====================================================================== the run
@attrs.define
class CalibratedRun:
    """One calibrated quantize call over a planned :class:`Walk`."""

    walk: Walk
    device: torch.device | None = None

    def _restricted(self) -> tuple[Walk, str, nn.ModuleList]:
        """The walk with calibrated modules outside the blocks kept in float (labelled why)."""
        names = {n for q in self.walk.quantizers if q.requires_calibration and (n := q.blocks_name()) is not None}
        if len(names) > 1:
            raise ConfigError([("", f"the configs name different blocks to calibrate: {sorted(names)}")])
        blocks_name, blocks = find_blocks(self.walk.model, next(iter(names), None))
        outside = {
            d.name: f"calibration: outside the repeated blocks {blocks_name}.*"
            for d in self.walk.decide()
            if _calibrated(d) and not d.name.startswith(blocks_name + ".")
        }
        return (self.walk.keep_in_float(outside) if outside else self.walk), blocks_name, blocks

    def plan(self) -> QuantizationReport:
        """The dry run: what :meth:`run` would do (no data needed)."""
        start = time.perf_counter()
        with paused_gc():
            walk, _, _ = self._restricted()
            report = walk.plan()
        return attrs.evolve(report, seconds=time.perf_counter() - start)

    def run(self, calibration: Iterable[Any], progress: bool | None = None) -> QuantizationReport:
        """Quantize every chosen module, or (on any error) none."""
        start = time.perf_counter()
        for q in self.walk.quantizers:
            q.check_environment()
        batches = _batches(calibration)
        with paused_gc():
            walk, blocks_name, blocks = self._restricted()
            decisions = walk.decide()
            size = walk.size()
            plan = report_decisions(walk, decisions, dry_run=True, size=size)
        config = walk.main.config if walk.main is not None else None
        call_observers("before_quantize", model=walk.model, config=config, plan=plan)
        chosen = [
            (d, d.rule.quantizer)
            for d in decisions
            if d.rule is not None and d.rule.quantizer is not None and d.rule.quantizer.can_replace(d.module)
        ]
        free = [(d, q) for d, q in chosen if not q.requires_calibration]
        per_block: dict[int, list[tuple[Decision, Quantizer]]] = {}
        for d, q in chosen:
            if q.requires_calibration:
                index = int(d.name[len(blocks_name) + 1 :].split(".")[0])
                per_block.setdefault(index, []).append((d, q))
        built = [(d, _build(d, q)) for d, q in free]
        journal: list[tuple[nn.Module, str, nn.Module]] = []
        tokens: dict[str, int] = {}
        try:
            calibrated = self._calibrate(walk.model, blocks_name, blocks, batches, per_block, journal, tokens, progress)
        except BaseException as exc:
            for parent, child, old in reversed(journal):
                parent._modules[child] = old
            if isinstance(exc, QuantizationError) or not isinstance(exc, Exception):
                raise
            raise QuantizationError(f"{exc}; the model was left unchanged") from exc
        for d, new in built:
            assert d.parent is not None
            new.train(d.module.training)
            d.parent._modules[d.child] = new
        record_state(walk, built + calibrated)
        records = [attrs.evolve(r, calibration_tokens=tokens.get(r.name)) for r in plan.modules]
        report = attrs.evolve(plan, modules=records, dry_run=False, seconds=time.perf_counter() - start)
        call_observers("after_quantize", model=walk.model, config=config, report=report)
        return report

    def _calibrate(
        self,
        model: nn.Module,
        blocks_name: str,
        blocks: nn.ModuleList,
        batches: list[Any],
        per_block: dict[int, list[tuple[Decision, Quantizer]]],
        journal: list[tuple[nn.Module, str, nn.Module]],
        tokens: dict[str, int],
        progress: bool | None,
    ) -> list[tuple[Decision, nn.Module]]:
        device = self.device or _device_of(blocks[0])
        built: list[tuple[Decision, nn.Module]] = []
        last = max(per_block, default=-1)
        bar = _progress(last + 1, progress)
        modes = {m: m.training for m in model.modules()}  # calibration runs in eval mode; each module gets its own back
        model.eval()
        try:
            inputs = _capture(model, blocks[0], batches, device)
            for index in range(last + 1):
                block = blocks[index]
                name = f"{blocks_name}.{index}"
                home = _device_of(block)
                block.to(device)
                try:
                    for quantizer, items in _by_quantizer(per_block.get(index, [])).items():
                        built += _quantize_block(quantizer, name, block, items, device, inputs, journal, tokens)
                    if index < last:
                        inputs = _next_inputs(block, inputs)
                finally:
                    block.to(home)
                if bar is not None:
                    bar.update()
        finally:
            for module, mode in modes.items():
                module.training = mode
            for parent, child, old in journal:
                replacement = parent._modules[child]
                if replacement is not None:
                    replacement.train(modes[old])
            if bar is not None:
                bar.close()
        return built


def _calibrated(d: Decision) -> bool:
    return d.rule is not None and d.rule.quantizer is not None and d.rule.quantizer.requires_calibration


def _build(d: Decision, quantizer: Quantizer) -> nn.Module:
    try:
        return quantizer.create_quantized_module(d.module, d.name)
    except Exception as exc:
        raise QuantizationError(
            f"could not quantize module {d.name!r} ({type(d.module).__name__}) with {quantizer.describe()}: "
            f"{type(exc).__name__}: {exc}; the model was left unchanged"
        ) from exc


def _by_quantizer(items: list[tuple[Decision, Quantizer]]) -> dict[Quantizer, list[Decision]]:
    out: dict[Quantizer, list[Decision]] = {}
    for d, q in items:
        out.setdefault(q, []).append(d)
    return out


def _quantize_block(
    quantizer: Quantizer,
    name: str,
    block: nn.Module,
    decisions: list[Decision],
    device: torch.device,
    inputs: Inputs,
    journal: list[tuple[nn.Module, str, nn.Module]],
    tokens: dict[str, int],
) -> list[tuple[Decision, nn.Module]]:
    """Let ``quantizer`` quantize its modules of one block; check it replaced each of them."""
    local = {d.name[len(name) + 1 :]: d for d in decisions}
    view = CalibrationBlock(name, block, {k: d.module for k, d in local.items()}, device, inputs, journal)
    try:
        with torch.no_grad():
            quantizer.quantize_block(view)
    except Exception as exc:
        raise QuantizationError(
            f"could not quantize block {name!r} with {quantizer.describe()}: {type(exc).__name__}: {exc}; "
            "the model was left unchanged"
        ) from exc
    missing = [k for k in local if k not in view.replaced]
    if missing:
        raise QuantizationError(
            f"{quantizer.describe()} did not replace {', '.join(f'{name}.{k}' for k in missing)} in block {name!r} "
            "(quantize_block must call block.replace for every target); the model was left unchanged"
        )
    for k, d in local.items():
        tokens[d.name] = view.tokens.get(k, 0)
    return [(local[k], new) for k, new in view.replaced.items()]


# ====================================================================== inputs and activations
def _batches(calibration: Iterable[Any]) -> list[Any]:
    """The calibration batches, checked: token-id tensors or dicts of forward keyword arguments."""
    if isinstance(calibration, (torch.Tensor, Mapping, str)):
        raise ConfigError(
            [
                (
                    "calibration",
                    f"expected an iterable of batches, got one {type(calibration).__name__}: wrap it in a list",
                )
            ]
        )
    try:
        batches = list(calibration)
    except TypeError:
        raise ConfigError(
            [("calibration", f"expected an iterable of batches, got {type(calibration).__name__}")]
        ) from None
    problems = [
        (f"calibration[{i}]", f"expected a token-id tensor or a dict of forward arguments, got {type(b).__name__}")
        for i, b in enumerate(batches)
        if not isinstance(b, (torch.Tensor, Mapping))
    ]
    if not batches:
        problems.append(("calibration", "is empty: give at least one batch"))
    if problems:
        raise ConfigError(problems, title="invalid calibration data")
    # one sequence of token ids is a batch of one
    return [b.unsqueeze(0) if isinstance(b, torch.Tensor) and b.dim() == 1 else b for b in batches]


def _capture(model: nn.Module, first: nn.Module, batches: list[Any], device: torch.device) -> Inputs:
    """Run ``model`` on each batch up to block ``first``; its inputs, on ``device``."""
    inputs: Inputs = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append((_to(args, device), _to(kwargs, device)))
        raise _ReachedBlock

    accepts_cache = "use_cache" in inspect.signature(model.forward).parameters
    moved = _move_outside(model, first, device)
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                kwargs = dict(batch) if isinstance(batch, Mapping) else {}
                if accepts_cache:
                    kwargs.setdefault("use_cache", False)
                args = (batch,) if isinstance(batch, torch.Tensor) else ()
                try:
                    model(*_to(args, device), **_to(kwargs, device))
                except _ReachedBlock:
                    continue
                except Exception as exc:
                    raise QuantizationError(
                        f"calibration batch {i}: the model's forward failed: {type(exc).__name__}: {exc}"
                    ) from exc
                raise QuantizationError(
                    f"calibration batch {i}: the forward finished without reaching the first block; "
                    "calibration needs a model whose forward calls its blocks"
                )
    finally:
        handle.remove()
        for module, home in moved:
            module.to(home)
    return inputs


def _next_inputs(block: nn.Module, inputs: Inputs) -> Inputs:
    """The next block's inputs: this block's outputs in place of its hidden-state argument."""
    out: Inputs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            result = block(*args, **kwargs)
            hidden = result[0] if isinstance(result, (tuple, list)) else result
            if args:
                out.append(((hidden, *args[1:]), kwargs))
            else:
                out.append(((), {**kwargs, "hidden_states": hidden}))
    return out


def _move_outside(
    model: nn.Module, block: nn.Module, device: torch.device
) -> list[tuple[nn.Module | _OwnTensors, torch.device]]:
    """Move everything of ``model`` but the blocks' list to ``device``; returns what moved, from where."""
    moved: list[tuple[nn.Module | _OwnTensors, torch.device]] = []
    path = _ancestors(model, block)

    def visit(module: nn.Module) -> None:
        if module is block or (path and module is path[-1]):
            return  # the list of blocks stays where it is
        if any(module is m for m in path):
            for sub in module._modules.values():
                if sub is not None:
                    visit(sub)
            own = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
            if own and own[0].device != device:
                moved.append((_OwnTensors(module), own[0].device))
                _OwnTensors(module).to(device)
            return
        home = _device_of(module, default=None)
        if home is not None and home != device:
            moved.append((module, home))
            module.to(device)

    visit(model)
    return moved


def _ancestors(model: nn.Module, block: nn.Module) -> list[nn.Module]:
    """The modules from ``model`` down to the parent of ``block`` (the list of blocks last)."""
    for name, module in model.named_modules():
        if module is block:
            path = [model]
            parts = name.split(".")[:-1]
            for part in parts:
                path.append(path[-1]._modules[part])  # type: ignore[arg-type]
            return path
    return []


@attrs.define
class _OwnTensors:
    """A module's own parameters and buffers, without its children (for moving them alone)."""

    module: nn.Module

    def to(self, device: torch.device) -> None:
        m = self.module
        for p in m._parameters.values():
            if p is not None:
                p.data = p.data.to(device)
        for key, b in m._buffers.items():
            if b is not None:
                m._buffers[key] = b.to(device)


def _device_of(module: nn.Module, default: Any = "cpu") -> Any:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_meta:
            raise QuantizationError("calibration needs real weights: the model is on the meta device")
        return t.device
    return torch.device(default) if default is not None else None


def _to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (through tuples, lists, dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _progress(total: int, enabled: bool | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or total <= 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="calibrating", unit="block", leave=False)
