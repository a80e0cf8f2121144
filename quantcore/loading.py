"""``from_pretrained``: a transformers checkpoint, quantized while it streams in.

The architecture is built with its parameters on the meta device (no memory, no initialisation),
then the tensors are read one at a time, shard by shard. Each linear layer to quantize gets its
float weight, is quantized by its backend and swapped in as soon as its tensors are complete, so
the peak memory is about the quantized model plus the largest tensor, not the float model.

With a device map over several devices (``device_map="auto"``, a dict), the placement is planned
first by :mod:`quantcore.placement`, sized as the model will be once quantized; every problem of
the map is raised before a tensor is read. Each tensor then goes straight to its module's device
and is quantized there, and accelerate's dispatch hooks make the forward run across devices.
Modules on ``"disk"`` are read at each forward from the checkpoint itself, or, once quantized,
from ``offload_folder`` (:mod:`quantcore.offload`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
import unittest.mock
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import attrs
import torch
from torch import nn

from .checkpoint import CONFIG_NAME, Loader, Slot, Target, read_quantization_state
from .config import QuantizationConfigMixin
from .dispatch import AutoQuantizer
from .errors import CheckpointError, ConfigError
from .match import exact_name
from .offload import DiskOffload, check_offload_folder
from .placement import Placement, count_names, infer_device_map
from .plugins import call_observers
from .shards import CheckpointFiles, TensorEntry
from .state import STATE_ATTRIBUTE, QuantizationState
from .walk import Rule, Walk

if TYPE_CHECKING:
    from .report import QuantizationReport

__all__ = [
    "DEVICE_MAP_ATTRIBUTE",
    "REPORT_ATTRIBUTE",
    "empty_weights",
    "from_pretrained",
    "get_report",
    "plan_device_map",
]

REPORT_ATTRIBUTE = "quantcore_report"
DEVICE_MAP_ATTRIBUTE = "hf_device_map"
"""Where the loaded model records its device map (transformers' name, which its ``generate`` reads)."""


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the meta device and their buffers real.

    Inside it, ``nn.Module`` construction allocates no parameter memory and initialisations cost
    nothing, while buffers that are computed, not saved (rotary frequencies), keep real values:
    ``torch.device("meta")`` would make those meta too, and no checkpoint holds them.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    with contextlib.ExitStack() as stack:
        stack.enter_context(unittest.mock.patch.object(nn.Module, "register_parameter", register_on_meta))
        # transformers would still run its weight initialisation over the meta parameters (a slow
        # Python decomposition per tensor, 0.15 s on a 1.1B model) before tying weights: skip the
        # initialisation only, the tying still runs.
        pretrained: Any = None
        if "transformers" in sys.modules:  # only a transformers user pays for importing it
            pretrained = importlib.import_module("transformers.modeling_utils").PreTrainedModel
        if pretrained is not None and hasattr(pretrained, "initialize_weights"):
            stack.enter_context(unittest.mock.patch.object(pretrained, "initialize_weights", _no_init))
        yield


def _no_init(self: Any) -> None:
    """Stands in for ``PreTrainedModel.initialize_weights`` while a skeleton is built."""


def from_pretrained(
    path: str | os.PathLike[str],
    quantization_config: QuantizationConfigMixin | Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | int | torch.device | Mapping[str, Any] | None = None,
    *,
    max_memory: Mapping[Any, int | str] | None = None,
    no_split_module_classes: list[str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    skip_modules: list[str] | None = None,
    default_skips: bool = True,
    auto_class: Any = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a transformers checkpoint folder (``config.json`` + safetensors), quantizing as it streams.

    :param quantization_config: a config of any installed backend (or its dict). A checkpoint
        that is already quantized (saved by :func:`quantcore.save_quantized`, or by transformers
        with bitsandbytes) loads as saved, without quantizing again; a config given with it is then
        ignored with a warning.
    :param dtype: dtype of the float tensors (and of the weights before quantizing): a
        ``torch.dtype``, its name, or ``None``/``"auto"`` for the checkpoint's ``config.dtype``.
    :param device_map: where to put the model: ``None`` (the CPU), one device (``"cuda"``, ``0``,
        ``torch.device``, ``{"": 0}``), ``"auto"``/``"balanced"``/``"balanced_low_0"``/``"sequential"``
        (inferred over the GPUs then the CPU, sized as the model will be once quantized), or a dict
        ``{module name: device}`` whose devices may include ``"disk"``. See
        :func:`quantcore.placement.infer_device_map`. A model spread over several devices, or
        partly on disk, gets accelerate's dispatch hooks, so its forward runs across them.
    :param max_memory: ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}`` for an inferred map (default:
        what is free now).
    :param no_split_module_classes: class names never split over devices (default: the model's
        ``_no_split_modules``).
    :param offload_folder: where quantized modules the map puts on ``"disk"`` are written (created
        if missing). Float modules on disk need none: they are read from the checkpoint's own
        files at each forward, as transformers does.
    :param overrides: ``{pattern: config | None}`` as in :func:`quantcore.quantize`.
    :param skip_modules: more module names or patterns to keep in float.
    :param default_skips: keep the output head and tied linears in float (default).
    :param auto_class: the transformers auto class (default: ``AutoModelForCausalLM``, falling back
        to ``AutoModel``).
    :param progress: a progress bar (default: when stderr is a terminal).
    :param kwargs: passed to ``AutoConfig.from_pretrained`` (``trust_remote_code``, config overrides).
    :returns: the model in eval mode; ``model.quantcore_report`` is the
        :class:`~quantcore.QuantizationReport` of the load (modules kept in float32 by the fp32
        offload rule are labelled ``device map: cpu (fp32 offload)``), ``model.hf_device_map`` the
        device map in accelerate's form when ``device_map`` was given, and
        :func:`quantcore.save_quantized` saves it.
    :raises ConfigError: before any tensor is read, for a map that does not fit (devices this
        machine lacks, quantized modules offloaded against their backend's rule, quantized modules
        on disk without a writable ``offload_folder``).
    """
    start = time.perf_counter()
    load = _prepare(
        path,
        quantization_config,
        dtype,
        device_map,
        max_memory=max_memory,
        no_split_module_classes=no_split_module_classes,
        overrides=overrides,
        skip_modules=skip_modules,
        default_skips=default_skips,
        auto_class=auto_class,
        check_devices=True,
        config_kwargs=kwargs,
        offload_folder=offload_folder,
    )
    model, loader = load.model, load.loader
    loader.check()
    report = None
    if load.plan is None:
        loader.run(immediate=True, progress=progress)
        if load.prequantized:
            report = loader.report(time.perf_counter() - start)
    else:
        assert load.state is not None  # a quantizing load records what it quantizes
        call_observers("before_quantize", model=model, config=load.state.config, plan=load.plan)
        loader.run(immediate=True, progress=progress)
        report = attrs.evolve(load.plan, dry_run=False, seconds=time.perf_counter() - start)
        call_observers("after_quantize", model=model, config=load.state.config, report=report)
    if load.state is not None:
        model.__dict__[STATE_ATTRIBUTE] = load.state
    if isinstance(loader, _PlacedLoader):
        _dispatch(model, loader)
    elif loader.device.type != "cpu":
        _move_unsaved_buffers(model, loader.device)
    if device_map is not None:
        setattr(
            model,
            DEVICE_MAP_ATTRIBUTE,
            load.placement.device_map if load.placement else _one(device_map, loader.device),
        )
    _load_generation_config(model, load.folder)
    model.eval()
    model.__dict__[REPORT_ATTRIBUTE] = report
    return model


def get_report(model: nn.Module) -> QuantizationReport | None:
    """The :class:`~quantcore.QuantizationReport` :func:`from_pretrained` attached to ``model``.

    ``model.quantcore_report``, typed; ``None`` when the load quantized nothing (a float checkpoint
    and no config) or ``model`` did not come from :func:`from_pretrained`.
    """
    return model.__dict__.get(REPORT_ATTRIBUTE)


def plan_device_map(
    path: str | os.PathLike[str],
    quantization_config: QuantizationConfigMixin | Mapping[str, Any] | None = None,
    device_map: str | int | torch.device | Mapping[str, Any] = "auto",
    *,
    max_memory: Mapping[Any, int | str] | None = None,
    dtype: torch.dtype | str | None = None,
    no_split_module_classes: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    skip_modules: list[str] | None = None,
    default_skips: bool = True,
    auto_class: Any = None,
    check_devices: bool = True,
    **kwargs: Any,
) -> Placement:
    """The placement :func:`from_pretrained` would use, without reading a tensor.

    Takes :func:`from_pretrained`'s arguments, plus ``check_devices=False`` to plan for another
    machine (``max_memory={0: "20GiB", 1: "20GiB", "cpu": "64GiB"}`` on a computer without GPUs).
    The :class:`~quantcore.placement.Placement` holds the map, the bytes per device, the modules
    the fp32 offload rule keeps in float32, and the quantization plan under the map.
    """
    load = _prepare(
        path,
        quantization_config,
        dtype,
        device_map,
        max_memory=max_memory,
        no_split_module_classes=no_split_module_classes,
        overrides=overrides,
        skip_modules=skip_modules,
        default_skips=default_skips,
        auto_class=auto_class,
        check_devices=check_devices,
        config_kwargs=kwargs,
        plan_only=True,
    )
    assert load.placement is not None
    return load.placement


@attrs.define
class _Load:
    """What a load decided before reading a tensor: the skeleton, where its tensors go, what is quantized."""

    model: nn.Module
    folder: Path
    loader: Loader
    state: QuantizationState | None
    plan: Any  # the QuantizationReport of a quantizing load
    placement: Placement | None
    prequantized: bool


def _prepare(
    path: str | os.PathLike[str],
    quantization_config: Any,
    dtype: torch.dtype | str | None,
    device_map: Any,
    *,
    max_memory: Mapping[Any, int | str] | None,
    no_split_module_classes: list[str] | None,
    overrides: Mapping[str, Any] | None,
    skip_modules: list[str] | None,
    default_skips: bool,
    auto_class: Any,
    check_devices: bool,
    config_kwargs: Mapping[str, Any],
    plan_only: bool = False,
    offload_folder: str | os.PathLike[str] | None = None,
) -> _Load:
    """Build the skeleton, choose the modules to quantize and place them; every check that needs no tensor data."""
    import transformers

    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{folder} has no {CONFIG_NAME}: give a local transformers checkpoint folder "
            "(download one first, e.g. with huggingface_hub.snapshot_download)"
        )
    device = None if plan_only else _device(device_map)  # None: a map to plan over devices
    files = CheckpointFiles.open(folder)
    config = transformers.AutoConfig.from_pretrained(str(folder), **config_kwargs)
    saved_quantization = getattr(config, "quantization_config", None)
    if saved_quantization is not None:
        # transformers' model classes must not act on it; delete it rather than set None, which
        # transformers 4.x's config.to_dict() would try to serialize
        del config.quantization_config
    dtype = _dtype(dtype, config, files)
    with empty_weights():
        model = _auto_class(auto_class, config).from_config(config, dtype=dtype)
    if saved_quantization is not None:
        config.quantization_config = saved_quantization
    kwargs: dict[str, Any] = {
        "cast_dtype": dtype,
        "ignore_unexpected": list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []),
    }

    def place(walk: Walk | None) -> Placement:

        return infer_device_map(
            model,
            walk,
            device_map,
            max_memory=max_memory,
            no_split_module_classes=no_split_module_classes,
            dtype=dtype,
            check_devices=check_devices,
        )

    found = read_quantization_state(folder, files, model)
    if found is not None:
        if quantization_config is not None or overrides:
            import warnings

            warnings.warn(
                f"{folder} is already quantized: the quantization_config / overrides given are ignored "
                "and the checkpoint loads as it was saved",
                stacklevel=3,
            )
        saved, tied = found
        loader = Loader.prequantized(model, saved, files, tied, device or _CPU, **kwargs)
        placement = None
        if device is None:
            placement = place(_checkpoint_walk(model, loader.targets))
            if placement.float_modules:
                raise ConfigError(
                    [
                        (
                            "device_map",
                            f"puts {count_names(list(placement.float_modules))} of a checkpoint saved quantized on the "
                            "CPU or disk next to GPUs, where they cannot run quantized and cannot be kept in "
                            "float32 (their float weights are not in the checkpoint); map them to a GPU, or give "
                            "the GPUs more max_memory",
                        )
                    ],
                    title="the quantized model does not fit this device map",
                )
            loader = _loader_for(placement, model, files, loader.targets, tied, kwargs, plan_only, offload_folder)
        return _Load(model, folder, loader, saved, None, placement, prequantized=True)

    walk = _walk(model, quantization_config, overrides, skip_modules, default_skips)
    placement = None
    if device is None:
        placement = place(walk)
        if walk is not None:
            walk = placement.apply(walk)
    if walk is None:
        targets: dict[str, Target] = {}
        state, plan = None, None
    else:
        state, targets, plan = _targets(walk, skip_modules, default_skips)
    if placement is None:
        loader = Loader(model, files, targets, device or _CPU, **kwargs)
    else:
        loader = _loader_for(placement, model, files, targets, {}, kwargs, plan_only, offload_folder)
    return _Load(model, folder, loader, state, plan, placement, prequantized=False)


_CPU = torch.device("cpu")


def _walk(
    model: nn.Module,
    quantization_config: Any,
    overrides: Mapping[str, Any] | None,
    skip_modules: list[str] | None,
    default_skips: bool,
) -> Walk | None:
    """The rules choosing what to quantize (``None`` for a plain float load); backends checked first."""
    if quantization_config is None and not overrides:
        return None
    main = AutoQuantizer.from_config(quantization_config) if quantization_config is not None else None
    walk = Walk.build(main, model, overrides, skip_modules, default_skips)
    calibrated = sorted({q.describe() for q in walk.quantizers if q.requires_calibration})
    if calibrated:
        raise ConfigError(
            [
                (
                    "quantization_config",
                    f"{', '.join(calibrated)} quantizes from calibration data, which a load cannot feed: load the "
                    "float model, then quantcore.quantize(model, config, calibration=batches)",
                )
            ]
        )
    for quantizer in walk.quantizers:
        quantizer.check_environment()
    return walk


def _targets(
    walk: Walk, skip_modules: list[str] | None, default_skips: bool
) -> tuple[QuantizationState, dict[str, Target], Any]:
    """A float checkpoint: the modules the rules choose are quantized from their float weights."""
    targets: dict[str, Target] = {}
    for d in walk.decide():
        rule = d.rule
        if rule is None or rule.quantizer is None or not rule.quantizer.can_replace(d.module) or d.parent is None:
            continue
        assert rule.source is not None  # a rule with a quantizer names its config: "config" or an override
        targets[d.name] = Target(d.name, d.module, d.parent, d.child, rule.quantizer, False, rule.source)
    main = walk.main
    state = QuantizationState(
        main.config if main is not None else None,
        {t.source: walk.overrides[t.source] for t in targets.values() if t.source != "config"},
        list(skip_modules or []),
        default_skips,
        {name: t.source for name, t in targets.items()},
    )
    return state, targets, walk.plan()


def _checkpoint_walk(model: nn.Module, targets: Mapping[str, Target]) -> Walk:
    """A walk that quantizes exactly the modules a checkpoint holds quantized (to size them for placing)."""
    rules = [Rule(f"checkpoint: {t.source}", exact_name(name), t.quantizer, t.source) for name, t in targets.items()]
    quantizers = list({id(t.quantizer): t.quantizer for t in targets.values()}.values())
    exact = {name: i for i, name in enumerate(targets)}
    return Walk(model, rules, quantizers, None, default_skips=False, exact=exact)


def _loader_for(
    placement: Placement,
    model: nn.Module,
    files: CheckpointFiles,
    targets: dict[str, Target],
    tied: dict[str, str],
    kwargs: Mapping[str, Any],
    plan_only: bool,
    offload_folder: str | os.PathLike[str] | None,
) -> Loader:
    """One device: the plain loader onto it; several, or disk: a :class:`_PlacedLoader`.

    A map with disk needs ``offload_folder`` when quantized modules go there (checked here, before
    anything is read; not when only planning).
    """
    devices = set(placement.device_map.values())
    if len(devices) == 1 and "disk" not in devices:
        return Loader(model, files, targets, _torch_device(devices.pop()), tied, **kwargs)
    offload = None
    if "disk" in devices and not plan_only:
        on_disk = [name for name in targets if placement.device_of(name) == "disk"]
        needed = sum(placement.module_sizes.get(name, 0) for name in on_disk)
        offload = DiskOffload(check_offload_folder(offload_folder, on_disk, needed))
    return _PlacedLoader(model, files, targets, _CPU, tied, **kwargs, placement=placement, offload=offload)


@attrs.define(eq=False)
class _PlacedLoader(Loader):
    """A load over several devices: each tensor goes to its module's device as ``placement`` says.

    Modules the fp32 offload rule keeps out of quantization get their tensors in float32. Tensors on
    disk are left in the checkpoint (``offload`` indexes them there) and never read; quantized
    modules on disk are built on the CPU, then written by ``offload``.
    """

    placement: Placement | None = None
    offload: DiskOffload | None = None

    def check(self) -> None:
        super().check()
        if self.offload is None:
            return
        for slot in self.slots:
            on_disk = [name for name in slot.names if self._where(name) == "disk"]
            if not on_disk:
                continue
            assert slot.key is not None  # check() found every slot's tensor
            entry = self.files.entries[slot.key]
            for name in on_disk:
                self.offload.serve(name, entry, self._dtype(name, entry))
            if len(on_disk) == len(slot.names):  # no other place wants it: never read
                kept = [route for route in self.routes[slot.key] if route[0] is not slot]
                if kept:
                    self.routes[slot.key] = kept
                else:
                    del self.routes[slot.key]
                _retype(slot, self._dtype(slot.names[0], entry))

    def run(self, *, immediate: bool, progress: bool | None = None) -> list[Any]:
        try:
            return super().run(immediate=immediate, progress=progress)
        except BaseException:
            if self.offload is not None:
                self.offload.discard()
            raise

    def _stream_device(self) -> Callable[[TensorEntry], torch.device | None]:
        """Each tensor straight to its one accelerator (through the pinned staging buffer, no host
        copy of its own); a tensor for the CPU, disk, or several devices (tied) is read to the CPU."""
        assert self.placement is not None
        devices: dict[str, torch.device | None] = {}
        for key, routes in self.routes.items():
            found = set()
            for to, _ in routes:
                names = to.names if isinstance(to, Slot) else [to.name]
                place = next((d for d in map(self._where, names) if d != "disk"), "disk")
                found.add(None if place in ("cpu", "disk") else _torch_device(place))
            devices[key] = found.pop() if len(found) == 1 else None
        return lambda entry: devices.get(entry.name)

    def _where(self, name: str) -> Any:
        assert self.placement is not None
        return self.placement.device_of(name)

    def _dtype(self, name: str, entry: TensorEntry) -> torch.dtype:
        """The dtype tensor ``name`` is loaded in (as :meth:`_at` and ``_cast`` would make it)."""
        assert self.placement is not None
        if not entry.dtype.is_floating_point:
            return entry.dtype
        if name.rpartition(".")[0] in self.placement.float_modules:
            return torch.float32
        return self.cast_dtype or entry.dtype

    @contextlib.contextmanager
    def _at(self, name: str) -> Iterator[None]:
        assert self.placement is not None
        device, dtype = self.device, self.cast_dtype
        place = self._where(name)
        self.device = _CPU if place == "disk" else _torch_device(place)  # quantized on the CPU, then written
        if name.rpartition(".")[0] in self.placement.float_modules:
            self.cast_dtype = torch.float32
        try:
            yield
        finally:
            self.device, self.cast_dtype = device, dtype

    def _place(self, slot: Any, tensor: torch.Tensor) -> Any:
        # a tensor tied between disk and another device is placed there (the disk names are indexed)
        name = next((n for n in slot.names if self._where(n) != "disk"), slot.names[0])
        with self._at(name):
            return super()._place(slot, tensor)

    def _module_for(self, target: Target, tensors: dict[str, torch.Tensor], entry: TensorEntry) -> nn.Module:
        with self._at(target.name):
            new = super()._module_for(target, tensors, entry)
        if self.offload is not None and self._where(target.name) == "disk":
            try:
                new = self.offload.write(target.name, new)
            except TypeError as exc:
                raise ConfigError([("device_map", str(exc))], title="cannot offload to disk") from None
        return new


def _retype(slot: Any, dtype: torch.dtype) -> None:
    """Give a meta tensor the dtype it is read in: accelerate's hooks cast what they read to it."""
    if slot.like.dtype == dtype:
        return
    meta = torch.empty_like(slot.like, device="meta", dtype=dtype)
    param = nn.Parameter(meta, requires_grad=False)
    for module, attr, is_param in slot.places:
        if is_param:
            module._parameters[attr] = param
        else:
            module._buffers[attr] = meta


def _dispatch(model: nn.Module, loader: _PlacedLoader) -> None:
    """accelerate's hooks: each block runs on its device (offloaded ones on the first GPU, or the CPU
    without one; disk ones read through the offload index), outputs come back."""
    from accelerate import dispatch_model

    placement = loader.placement
    assert placement is not None
    for name in placement.float_modules:
        _compute_in_float32(model.get_submodule(name))
    gpus = [d for d in placement.device_map.values() if isinstance(d, int)]
    offload: dict[str, Any] = {}
    if loader.offload is not None:
        folder = loader.offload.folder
        # buffers too: a quantized module on disk may keep its weights in buffers (torch_wo does)
        offload = {
            "offload_dir": str(folder) if folder is not None else None,
            "offload_index": loader.offload.index,
            "offload_buffers": True,
        }
    dispatch_model(
        model,
        device_map=placement.device_map,
        main_device=gpus[0] if gpus else None,  # accelerate's form: the index, which safetensors also reads
        skip_keys=getattr(model, "_skip_keys_device_placement", None),
        **offload,
    )


def _compute_in_float32(module: nn.Module) -> None:
    """Run a float32-kept module on float32 inputs and give its output back in the input's dtype."""
    dtypes: list[torch.dtype] = []

    def before(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        dtypes.append(x.dtype)
        return (x.float(), *args[1:])

    def after(_: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output.to(dtypes.pop())

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def _move_unsaved_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies) are built on the CPU and never read: move them along."""
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)


def _torch_device(device: Any) -> torch.device:
    """A device-map value (GPU index, ``"cpu"``, ``"mps"``) as a ``torch.device``."""
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _one(device_map: Any, device: torch.device) -> dict[str, Any]:
    """A one-device map in accelerate's form (``0`` for ``cuda:0``), with the keys it was given."""
    value = (device.index or 0) if device.type == "cuda" else device.type
    return {key: value for key in device_map} if isinstance(device_map, Mapping) else {"": value}


def _auto_class(auto_class: Any, config: Any) -> Any:
    import transformers

    if auto_class is not None:
        return auto_class
    causal = transformers.AutoModelForCausalLM
    if type(config) in causal._model_mapping:
        return causal
    return transformers.AutoModel


def _dtype(dtype: torch.dtype | str | None, config: Any, files: CheckpointFiles) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if saved is not None:
            return saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved).removeprefix("torch."))
        floats = [e.dtype for e in files.entries.values() if e.dtype.is_floating_point]
        return floats[0] if floats else torch.float32
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, its name or 'auto', got {dtype!r}")
    return value


def _device(device_map: Any) -> torch.device | None:
    """The one device of ``device_map``, or ``None`` for a map to plan (a mode, several devices)."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, Mapping):
        try:
            devices = {_device(v) for v in device_map.values()}
        except ValueError:
            return None  # the planner reports every bad value at once
        return devices.pop() if len(devices) == 1 and None not in devices else None
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return None
    if device_map == "disk":
        return None  # the planner refuses it with the others' rules
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device_map: not a device: {device_map!r} ({exc})") from None


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        cast(Any, model).generation_config = GenerationConfig.from_pretrained(str(folder))  # a config, not a module
