"""Placing a model over GPUs, the CPU and disk, sized as it will be once quantized.

:func:`infer_device_map` asks accelerate's device-map inference (``infer_auto_device_map``,
``get_balanced_memory``) where each module goes, but feeds it a meta-device skeleton in which every
module the quantization will replace weighs what :meth:`Quantizer.quantized_nbytes` says: a 4-bit
layer counts about a quarter of its bfloat16 size, so a model that fits only once quantized is put
on the GPUs. A device map given as a dict is checked instead of inferred.

Offloaded modules (on disk, or on the CPU next to GPUs) follow their backend's offload policy
(:func:`offload_policy`): stay quantized there, stay unquantized in float32 (bitsandbytes'
``llm_int8_enable_fp32_cpu_offload``), or make the map an error that names them. A map of the CPU
and disk alone runs on the CPU: there only the disk modules are offloaded.

accelerate is optional: it is imported when a map is inferred (``pip install 'quantcore[transformers]'``).
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any, Literal, cast, get_args

import attrs
import torch
from torch import nn

from .config import QuantizationConfigMixin
from .dispatch import AutoQuantizer
from .errors import ConfigError
from .quantizer import Quantizer, module_nbytes
from .quantizer_base import QuantizerBase
from .report import QuantizationReport, format_bytes
from .walk import ModelIndex, Walk

__all__ = ["MODES", "OFFLOAD_DEVICES", "Placement", "infer_device_map", "offload_policy"]

MODES = ("auto", "balanced", "balanced_low_0", "sequential")
"""The ``device_map`` strings that ask for an inferred map (as in transformers)."""

OFFLOAD_DEVICES = ("cpu", "disk")
"""Device-map values that mean "offloaded" when GPUs hold the rest of the model ("disk" always does)."""

OffloadPolicy = Literal["quantized", "float", "refuse"]
Device = int | str  # accelerate's form: a GPU index, "cpu", "disk" or "mps"

_INSTALL_HINT = "pip install 'quantcore[transformers]'"
_SHOWN = 5  # module names an error lists before "and N more"


def offload_policy(quantizer: QuantizerBase) -> OffloadPolicy:
    """What becomes of ``quantizer``'s modules that a device map puts on the CPU or disk next to GPUs.

    ``"quantized"``: they are quantized like the others (the backend runs, or accelerate moves,
    its quantized modules off the GPU); ``"float"``: they are left unquantized, in float32;
    ``"refuse"``: the map is an error. The quantizer decides, through
    :meth:`quantcore.Quantizer.offload_policy`.
    """
    policy = quantizer.offload_policy()
    if policy not in get_args(OffloadPolicy):
        raise ValueError(f"{type(quantizer).__name__}.offload_policy() returned {policy!r}")
    return cast(OffloadPolicy, policy)


@attrs.frozen
class Placement:
    """Where each module goes, and which modules the placement keeps out of quantization."""

    device_map: dict[str, Device]
    """``{module name: device}`` in accelerate's form (GPU index, ``"cpu"``, ``"disk"``); a module
    not named goes where its closest named ancestor goes."""
    float_modules: dict[str, str]
    """``{module name: rule label}``: modules the quantization would replace but that stay
    unquantized in float32 because the map offloads them (fp32 offload)."""
    module_sizes: dict[str, int] = attrs.field(repr=False)
    """Bytes of every module as placed (quantized sizes; ``""`` is the model)."""
    max_memory: dict[Device, int]
    """The budgets the map was inferred with, in bytes (empty for a given map)."""
    device_bytes: dict[Device, int]
    """Bytes each device holds."""
    report: QuantizationReport = attrs.field(repr=False)
    """The quantization plan with :attr:`float_modules` kept in float."""

    @property
    def skip_modules(self) -> list[str]:
        """The names of :attr:`float_modules`, for a ``skip_modules=`` argument."""
        return list(self.float_modules)

    def device_of(self, name: str) -> Device:
        """The device of the module or tensor called ``name`` (from its closest mapped ancestor)."""
        found = _lookup(self.device_map, name)
        if found is None:
            raise KeyError(f"the device map places no ancestor of {name!r}")
        return found

    def apply(self, walk: Walk) -> Walk:
        """``walk`` with :attr:`float_modules` kept in float, under their "device map" labels, first."""
        return walk.keep_in_float(self.float_modules)

    def summary(self) -> str:
        """One line per device, then the fp32-offloaded modules."""
        lines = [f"{_label(d)}: {format_bytes(n)}" for d, n in self.device_bytes.items()]
        if self.float_modules:
            lines.append(f"{len(self.float_modules)} modules kept unquantized in float32 (fp32 offload)")
        return "\n".join(lines)


def infer_device_map(
    model: nn.Module,
    quantization: Walk | Quantizer | QuantizationConfigMixin | Mapping[str, Any] | None = None,
    device_map: str | Mapping[str, Any] | int | torch.device = "auto",
    *,
    max_memory: Mapping[Any, int | str] | None = None,
    no_split_module_classes: list[str] | None = None,
    dtype: torch.dtype | str | None = None,
    check_devices: bool = True,
) -> Placement:
    """Place ``model`` over the GPUs, then the CPU, then disk, sized as ``quantization`` will make it.

    :param model: the float model, usually on the meta device (nothing is allocated or changed).
    :param quantization: a :class:`~quantcore.walk.Walk` (with its overrides and skips), a
        quantizer, a config, or ``None`` to place the float model.
    :param device_map: ``"auto"`` or ``"balanced"`` (spread evenly over the GPUs),
        ``"balanced_low_0"`` (GPU 0 kept light for generation), ``"sequential"`` (fill GPU 0 first),
        a dict ``{module name: device}`` (checked, not changed), or one device for the whole model.
    :param max_memory: ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``; default: what is free now.
        Each GPU keeps room for one float layer being quantized on it. Unused with a given map.
    :param no_split_module_classes: class names never split over devices (default: the model's
        ``_no_split_modules``, as transformers models declare).
    :param dtype: the dtype floating-point weights are loaded in (default: as they are in ``model``).
    :param check_devices: require every device of the map on this machine; ``False`` plans for
        another machine (``max_memory={0: ..., 1: ...}`` on a computer without GPUs).
    :raises ConfigError: a bad map, missing devices, or quantized modules offloaded against their
        backend's :func:`offload_policy`, with every problem and what to set.
    """
    walk = _as_walk(model, quantization)
    dtype = _as_dtype(dtype)
    skeleton = _meta_copy(model, dtype)
    plan = attrs.evolve(walk, model=skeleton, index=ModelIndex.of(skeleton))  # same rules, sized copy
    chosen = {
        d.name: (d.rule.quantizer, d.module)
        for d in plan.decide()
        if d.rule is not None and d.rule.quantizer is not None and d.rule.quantizer.can_replace(d.module)
    }
    if no_split_module_classes is None:
        no_split_module_classes = _no_split(model)

    fp32: set[str] = set()
    budgets: dict[Device, int] = {}
    absent: list[tuple[str, str]] = []  # devices this machine lacks: reported with the map's other problems
    if isinstance(device_map, str) and device_map in MODES:
        budgets, absent = _budgets(max_memory, chosen, check_devices)
        # Offloaded modules kept in float32 weigh more, which can push more modules off the GPUs:
        # infer again until the set of offloaded float modules stops growing.
        for _ in range(8):
            with _sized(skeleton, chosen, fp32) as sized:
                placed = _infer(
                    sized, device_map, budgets, no_split_module_classes, quiet=not check_devices or bool(absent)
                )
            grown = fp32 | _offloaded(placed, chosen, "float")
            if grown == fp32:
                break
            fp32 = grown
    else:
        placed, absent = _check_map(skeleton, _as_map(device_map), check_devices)
    fp32 = _offloaded(placed, chosen, "float")  # the final map's (an earlier round's may differ)
    with _sized(skeleton, chosen, fp32) as sized:
        sizes = _module_sizes(sized)
        device_bytes: dict[Device, int] = {}
        for name, tensor in itertools.chain(sized.named_parameters(), sized.named_buffers()):
            device = _lookup(placed, name)
            assert device is not None  # the map gives every tensor a device (checked or inferred so)
            device_bytes[device] = device_bytes.get(device, 0) + tensor.numel() * tensor.element_size()
    _check_policies(placed, chosen, plan.plan().bytes_after, budgets, absent, "max_memory" if budgets else "device map")
    labels = {}
    for name in chosen:
        if name in fp32:
            device = next(d for d in _devices_of(placed, name) if d in _offload_devices(placed))
            labels[name] = f"device map: {device} (fp32 offload)"
    report = plan.keep_in_float(labels).plan()
    return Placement(placed, labels, sizes, budgets, device_bytes, report)


# ---------------------------------------------------------------------- inputs
def _accelerate() -> Any:
    try:
        import accelerate.utils.modeling as modeling
    except ImportError:
        raise ImportError(f"inferring a device map needs accelerate: {_INSTALL_HINT}") from None
    return modeling


def _as_walk(model: nn.Module, quantization: Any) -> Walk:
    if isinstance(quantization, Walk):
        if quantization.model is not model:
            raise ValueError("the walk was built for another model: pass the model it was built with")
        return quantization
    if quantization is None or isinstance(quantization, Quantizer):
        return Walk.build(quantization, model)
    return Walk.build(AutoQuantizer.from_config(quantization), model)


def _no_split(model: nn.Module) -> list[str]:
    """The model's no-split classes, its transformers sub-models' included (e.g. a vision tower's)."""
    gather = getattr(model, "_get_no_split_modules", None)
    if callable(gather):
        try:
            return sorted(gather("auto"))
        except ValueError:  # transformers: the model declares none
            return []
    return sorted(getattr(model, "_no_split_modules", None) or [])


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype):
        raise ConfigError([("dtype", f"{dtype!r} is not a torch dtype (e.g. 'bfloat16')")], title="invalid dtype")
    return found


def _as_device(value: Any) -> Device:
    """``"cuda:1"``, ``torch.device("cuda", 1)``, ``1`` -> ``1``; ``"cpu"``, ``"disk"``, ``"mps"`` kept."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a device")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value!r} is not a GPU index")
        return value
    if isinstance(value, str) and value in ("disk", "cpu", "mps"):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{value!r} is not a device: use a GPU index (0), 'cuda:N', 'cpu', 'disk' or 'mps'") from None
    if device.type == "cuda":
        return device.index or 0
    if device.type in ("cpu", "mps"):
        return device.type
    raise ValueError(f"{value!r}: device type {device.type!r} is not supported in device maps")


def _as_map(device_map: Any) -> dict[Any, Any]:
    """A dict as it is; one device (``"cuda:1"``, ``0``, ``"cpu"``) as ``{"": device}``."""
    if isinstance(device_map, Mapping):
        return dict(device_map)
    try:
        return {"": _as_device(device_map)}
    except ValueError:
        raise ConfigError(
            [
                (
                    "device_map",
                    f"{device_map!r} is neither a mode ({', '.join(map(repr, MODES))}), a dict nor a device",
                )
            ],
            title="invalid device map",
        ) from None


# ---------------------------------------------------------------------- the sizing skeleton
class _Sized(nn.Module):
    """Stands in for a module in the sizing skeleton: one meta tensor as large as the module will be."""

    def __init__(self, nbytes: int):
        super().__init__()
        self.planned = nn.Parameter(torch.empty(nbytes, dtype=torch.uint8, device="meta"), requires_grad=False)


def _meta_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A copy of the module tree on the meta device (tied tensors and shared modules stay shared),
    floats cast to ``dtype``; no data copied.

    Each module is copied shallowly, with its own parameter, buffer and child dicts: the sizing
    swaps modules in the copy, never in ``model``. Other attributes are shared with ``model``
    (a ``copy.deepcopy`` spent 0.24 s per load of a 30-layer model copying them for nothing).
    """
    tensors: dict[int, Any] = {}
    modules: dict[int, nn.Module] = {}

    def meta(tensor: torch.Tensor) -> Any:
        found = tensors.get(id(tensor))
        if found is None:
            target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            found = torch.empty_like(tensor, device="meta", dtype=target)
            if isinstance(tensor, nn.Parameter):
                found = nn.Parameter(found, requires_grad=tensor.requires_grad)
            tensors[id(tensor)] = found
        return found

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in modules:
            return modules[id(module)]
        copied = module.__class__.__new__(module.__class__)
        copied.__dict__ = dict(module.__dict__)
        modules[id(module)] = copied
        copied._parameters = {k: None if t is None else meta(t) for k, t in module._parameters.items()}
        copied._buffers = {k: None if t is None else meta(t) for k, t in module._buffers.items()}
        copied._modules = {k: None if m is None else clone(m) for k, m in module._modules.items()}
        return copied

    return clone(model)


def _fp32_nbytes(module: nn.Module) -> int:
    return sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size())
        for t in itertools.chain(module.parameters(), module.buffers())
    )


@contextlib.contextmanager
def _sized(
    skeleton: nn.Module, chosen: Mapping[str, tuple[QuantizerBase, nn.Module]], fp32: set[str]
) -> Iterator[nn.Module]:
    """``skeleton`` with each chosen module swapped for a :class:`_Sized` of its planned size, then back."""
    swapped = []
    try:
        for name, (quantizer, module) in chosen.items():
            nbytes = _fp32_nbytes(module) if name in fp32 else quantizer.quantized_nbytes(module)
            parent_name, _, child = name.rpartition(".")
            parent = skeleton.get_submodule(parent_name)
            swapped.append((parent, child, module))
            parent._modules[child] = _Sized(nbytes)
        yield skeleton
    finally:
        for parent, child, module in reversed(swapped):
            parent._modules[child] = module


def _module_sizes(sized: nn.Module) -> dict[str, int]:
    """Bytes of every module (tied tensors once), by module name."""
    sizes: dict[str, int] = {name: 0 for name, _ in sized.named_modules()}
    for name, tensor in itertools.chain(sized.named_parameters(), sized.named_buffers()):
        owner = name.rpartition(".")[0]
        parts = owner.split(".") if owner else []
        for i in range(len(parts) + 1):
            sizes[".".join(parts[:i])] += tensor.numel() * tensor.element_size()
    return sizes


# ---------------------------------------------------------------------- inferring and checking maps
@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence accelerate's "Device 1 is not available" while planning for another machine."""
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    if enabled:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _budgets(
    max_memory: Mapping[Any, int | str] | None,
    chosen: Mapping[str, tuple[QuantizerBase, nn.Module]],
    check_devices: bool,
) -> tuple[dict[Device, int], list[tuple[str, str]]]:
    """Bytes per device, less room on each GPU for the largest float layer while it is quantized,
    and the problems of devices this machine lacks (when ``check_devices``)."""
    modeling = _accelerate()
    problems: list[tuple[str, str]] = []
    given: dict[Device, Any] | None = None
    if max_memory is not None:
        given = {}
        for key, value in max_memory.items():
            try:
                device = _as_device(key)
                given[device] = modeling.convert_file_size_to_int(value) if isinstance(value, str) else int(value)
            except (ValueError, TypeError) as exc:
                problems.append((f"max_memory[{key!r}]", str(exc)))
    if problems:
        raise ConfigError(problems, title="invalid max_memory")
    with _quiet(True):  # a GPU this machine lacks is reported below, with the map's other problems
        budgets = dict(modeling.get_max_memory(given))
    absent = _absent_devices((f"max_memory[{d!r}]", d) for d in budgets) if check_devices else []
    headroom = max((module_nbytes(module) for _, module in chosen.values()), default=0)
    sized = {d: max(0, int(n) - headroom) if isinstance(d, int) else int(n) for d, n in budgets.items()}
    return sized, absent


def _infer(
    sized: nn.Module, mode: str, budgets: dict[Device, int], no_split: list[str], quiet: bool
) -> dict[str, Device]:
    modeling = _accelerate()
    with _quiet(quiet):
        if mode == "sequential":
            memory = dict(budgets)
        else:
            memory = modeling.get_balanced_memory(sized, dict(budgets), no_split, low_zero=mode == "balanced_low_0")
        return dict(modeling.infer_auto_device_map(sized, memory, no_split))


def _absent_devices(devices: Iterator[tuple[str, Device]]) -> list[tuple[str, str]]:
    """``(field, problem)`` for each device named that this machine does not have."""
    visible = torch.cuda.device_count()
    problems = []
    for field, device in devices:
        if isinstance(device, int) and device >= visible:
            problems.append(
                (
                    field,
                    f"GPU {device} is not on this machine ({visible} CUDA device(s) visible); "
                    "pass check_devices=False to plan for another machine",
                )
            )
        elif device == "mps" and not torch.backends.mps.is_available():
            problems.append((field, "MPS is not available on this machine"))
    return problems


def _check_map(
    skeleton: nn.Module, device_map: Mapping[Any, Any], check_devices: bool
) -> tuple[dict[str, Device], list[tuple[str, str]]]:
    """The map in accelerate's form, once every key names a module or tensor and every tensor has a device,
    and the problems of devices this machine lacks (when ``check_devices``)."""
    problems: list[tuple[str, str]] = []
    placed: dict[str, Device] = {}
    modules = [name for name, _ in skeleton.named_modules()]
    tensors = [
        name
        for name, _ in itertools.chain(
            skeleton.named_parameters(remove_duplicate=False), skeleton.named_buffers(remove_duplicate=False)
        )
    ]
    known = set(modules) | set(tensors)
    for key, value in device_map.items():
        field = f"device_map[{key!r}]"
        if not isinstance(key, str):
            problems.append((field, "keys are module names (strings)"))
            continue
        if key not in known:
            close = difflib.get_close_matches(key, modules, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append((field, f"no module or tensor of the model is called {key!r}{hint}"))
            continue
        try:
            placed[key] = _as_device(value)
        except ValueError as exc:
            problems.append((field, str(exc)))
    if not problems:
        missing = _unplaced(modules, tensors, placed)
        if missing:
            problems.append(
                (
                    "device_map",
                    f'gives no device to {count_names(missing)}; map them, or add "" (the whole model) as a default',
                )
            )
    if problems:
        raise ConfigError(problems, title="invalid device map")
    absent = _absent_devices((f"device_map[{k!r}]", d) for k, d in placed.items()) if check_devices else []
    return _flat(skeleton, placed), absent


def _flat(skeleton: nn.Module, placed: Mapping[str, Device]) -> dict[str, Device]:
    """The same placement with no key inside another key's module, in model order.

    accelerate's dispatch hooks move a key's whole module to its device, so ``{"": 0, "lm_head":
    "cpu"}`` would bring ``lm_head`` to GPU 0 (and a ``"disk"`` module's meta tensors with it): a
    key with keys under it is replaced by its children and own tensors, as inferred maps have it.
    """
    flat = dict(placed)
    while True:
        outer = next((k for k in flat if any(o != k and (not k or o.startswith(k + ".")) for o in flat)), None)
        if outer is None:
            break
        device = flat.pop(outer)
        module = skeleton.get_submodule(outer)
        prefix = f"{outer}." if outer else ""
        own = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name in [*(n for n, _ in module.named_children()), *(n for n, _ in own)]:
            flat.setdefault(prefix + name, device)
    if len(flat) == len(placed) and flat.keys() == placed.keys():
        return flat
    order = {name: i for i, (name, _) in enumerate(skeleton.named_modules())}
    tensors = itertools.chain(skeleton.named_parameters(), skeleton.named_buffers())
    order.update({name: len(order) + i for i, (name, _) in enumerate(tensors)})
    return dict(sorted(flat.items(), key=lambda item: order.get(item[0], len(order))))


def _unplaced(modules: list[str], tensors: list[str], placed: Mapping[str, Device]) -> list[str]:
    """The outermost modules (or lone tensors) with no device, in model order."""
    total: dict[str, int] = {}
    missing: dict[str, int] = {}
    for tensor in tensors:
        lost = _lookup(placed, tensor) is None
        owner = tensor
        while owner:
            owner = owner.rpartition(".")[0]
            total[owner] = total.get(owner, 0) + 1
            missing[owner] = missing.get(owner, 0) + lost
    whole = [m for m in modules if m and total.get(m) and missing.get(m) == total[m]]
    outer = [m for m in whole if not any(m.startswith(o + ".") for o in whole)]
    lone = [t for t in tensors if _lookup(placed, t) is None and not any(t.startswith(o + ".") for o in outer)]
    return outer + lone


def _lookup(device_map: Mapping[str, Device], name: str) -> Device | None:
    """The device of the closest mapped ancestor of ``name`` (or ``name`` itself)."""
    while True:
        if name in device_map:
            return device_map[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def _devices_of(device_map: Mapping[str, Device], name: str) -> list[Device]:
    """Every device holding part of module ``name``: its own, then those of keys under it."""
    own = _lookup(device_map, name)
    nested = [d for k, d in device_map.items() if k.startswith(name + ".")]
    return ([own] if own is not None else []) + nested


def _offload_devices(placed: Mapping[str, Device]) -> tuple[Device, ...]:
    """The devices whose modules run elsewhere: disk always, the CPU only next to an accelerator
    (a map of the CPU, or of the CPU and disk, runs on the CPU: its CPU modules are quantized there)."""
    return OFFLOAD_DEVICES if any(d not in OFFLOAD_DEVICES for d in placed.values()) else ("disk",)


def _offloaded(
    placed: Mapping[str, Device], chosen: Mapping[str, tuple[QuantizerBase, nn.Module]], policy: str
) -> set[str]:
    """Chosen modules with this offload policy that the map offloads (in part)."""
    offload = _offload_devices(placed)
    return {
        name
        for name, (quantizer, _) in chosen.items()
        if offload_policy(quantizer) == policy and any(d in offload for d in _devices_of(placed, name))
    }


def _check_policies(
    placed: Mapping[str, Device],
    chosen: Mapping[str, tuple[QuantizerBase, nn.Module]],
    needed: int,
    budgets: Mapping[Device, int],
    absent: list[tuple[str, str]],
    argument: str,
) -> None:
    """Raise one :class:`ConfigError` for offloaded modules their backend refuses and for absent devices."""
    refused = _offloaded(placed, chosen, "refuse")
    if not refused:
        if absent:
            raise ConfigError(absent, title=f"invalid {argument}")
        return
    by_quantizer: dict[int, tuple[QuantizerBase, list[str]]] = {}
    for name in chosen:  # model order
        if name in refused:
            quantizer = chosen[name][0]
            by_quantizer.setdefault(id(quantizer), (quantizer, []))[1].append(name)
    gpus = sum(n for d, n in budgets.items() if isinstance(d, int))
    if budgets and not gpus:
        more = "or give the CPU more max_memory"
    elif budgets:
        more = (
            f"or give the GPUs more max_memory (they offer {format_bytes(gpus)} after room to quantize "
            f"one layer; the quantized model needs {format_bytes(needed)})"
        )
    else:
        more = "or map those modules to a GPU" if "cpu" in _offload_devices(placed) else "or map them to the CPU"
    problems = []
    for quantizer, names in by_quantizer.values():
        count, listed = count_names(names).split(": ", 1)
        offload = "the CPU or disk next to GPUs" if "cpu" in _offload_devices(placed) else "disk"
        where = f"the device map puts {count} on {offload}"
        if hasattr(quantizer.config, "llm_int8_enable_fp32_cpu_offload"):
            problems.append(
                (
                    "llm_int8_enable_fp32_cpu_offload",
                    f"{where} ({listed}); set llm_int8_enable_fp32_cpu_offload=True to keep them "
                    f"unquantized in float32 there, {more}",
                )
            )
        else:
            problems.append(("device_map", f"{where}, where {quantizer.describe()} cannot run them ({listed}); {more}"))
    raise ConfigError(absent + problems, title="the quantized model does not fit this device map")


def count_names(names: list[str], noun: str = "module") -> str:
    """``"7 modules: 'a', 'b', 'c', 'd', 'e' and 2 more"``."""
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    rest = len(names) - _SHOWN
    count = f"{len(names)} {noun}{'s' if len(names) != 1 else ''}"
    return f"{count}: {shown}" + (f" and {rest} more" if rest > 0 else "")


def _label(device: Device) -> str:
    return f"GPU {device}" if isinstance(device, int) else str(device)
