"""Saving a quantized model and loading it back without quantizing again.

A checkpoint is a folder: the model's tensors in safetensors (``model.safetensors``, or shards and
``model.safetensors.index.json`` as transformers writes them), ``quantization_config.json`` (the
model's :class:`~quantcore.QuantizationState`: the main config, the overrides, which config made
each module, and which tensors were saved once for several tied names) and, for a transformers
model, ``config.json`` with ``quantization_config`` so that transformers loads it too.

Loading rebuilds the quantized skeleton from the saved state (each backend's
``create_quantized_module`` on meta modules), checks every header, name and shape against it, and
only then reads tensors; each quantized module is filled by its backend's ``load_quantized_state``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import torch
from torch import nn

from .config import QuantizationConfigMixin
from .dispatch import AutoQuantizationConfig, AutoQuantizer
from .errors import CheckpointError, ConfigError, QuantizationError
from .quantizer import Quantizer, module_nbytes
from .quantizer_base import QuantizerBase
from .registry import config_file_methods, get_backend
from .report import ModuleRecord, QuantizationReport
from .shards import INDEX_NAME, WEIGHTS_NAME, CheckpointFiles, TensorEntry, write_shards
from .staging import StagedFolder, clear_debris
from .state import STATE_ATTRIBUTE, QuantizationState, get_quantization_state
from .swap import swap_module

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "STATE_NAME",
    "load_quantized",
    "read_quantization_state",
    "save_quantized",
]

STATE_NAME = "quantization_config.json"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1
_REPLACED = (WEIGHTS_NAME, INDEX_NAME, STATE_NAME, CONFIG_NAME, "generation_config.json")
_TRANSFORMERS_WHERE = f"{CONFIG_NAME} (quantization_config)"


# ====================================================================== saving
def save_quantized(model: nn.Module, path: str | os.PathLike[str], *, max_shard_size: int | str = "5GB") -> Path:
    """Save a model quantized by quantcore to the folder ``path``; returns the folder.

    Writes safetensors (sharded past ``max_shard_size``: bytes, or ``"5GB"``, ``"500MiB"``),
    ``quantization_config.json`` and, for a transformers ``PreTrainedModel``, ``config.json`` and
    ``generation_config.json``. Tensors shared by several names (tied weights) are stored once.

    The folder is written beside ``path`` and swapped into place once complete: on any error, or
    a kill at any moment, an existing checkpoint at ``path`` is left as it was. Other files already
    in ``path`` (a tokenizer) are kept; old weight files are not. What earlier saves to ``path``
    left when they were killed (``.NAME.*.tmp`` folders) is removed first, once their writers are
    provably gone (see :mod:`quantcore.staging`).
    """
    state = get_quantization_state(model)
    if state is None:
        raise CheckpointError(
            f"{type(model).__name__} was never quantized by quantcore, so there is no quantization state "
            "to save: call quantcore.quantize(model, config) first (save a float model with "
            "safetensors or save_pretrained)"
        )
    tensors, tied = _collect_tensors(model)
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_debris(target)  # what earlier saves to this target left when they were killed
    staged = StagedFolder.create(target)
    tmp = staged.path
    try:
        write_shards(tensors, tmp, max_shard_size, _header_metadata(model, state))
        data = {
            "format": "quantcore",
            "format_version": FORMAT_VERSION,
            **state.to_dict(),
            "tied_weights": tied,
        }
        _write_json(tmp / STATE_NAME, data)
        if _is_transformers_model(model):
            _write_json(tmp / CONFIG_NAME, _transformers_config(model, state))
            generation = getattr(model, "generation_config", None)
            if generation is not None and hasattr(generation, "to_json_file"):
                generation.to_json_file(str(tmp / "generation_config.json"))
        if target.is_dir():
            _carry_over(target, tmp)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return target


def _collect_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tensor once; ``tied`` maps a dropped name to the name kept."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    problems: list[str] = []
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor (safetensors stores tensors only)")
            continue
        if value.is_meta:
            problems.append(f"{key!r} is on the meta device (the model holds no weights)")
            continue
        if value.numel():
            storage = (value.device, value.untyped_storage().data_ptr())
            view = (*storage, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
            if view in views:
                tied[key] = views[view]
                continue
            views[view] = key
            if storage in storages:  # another view of a saved storage: safetensors wants it on its own
                value = value.clone()
            storages.add(storage)
        tensors[key] = value
    if problems:
        raise CheckpointError("cannot save the model:\n" + "\n".join(f"  - {p}" for p in problems))
    return tensors, tied


def _header_metadata(model: nn.Module, state: QuantizationState) -> dict[str, str]:
    """What each backend asks to write into the safetensors headers about its modules."""
    modules = dict(model.named_modules())
    by_backend: dict[type[Quantizer], dict[str, nn.Module]] = {}
    for name in state.modules:
        config = state.config_for(name)
        if config is not None and name in modules:
            backend = get_backend(config.quant_method, require_usable=False).quantizer_class()
            by_backend.setdefault(backend, {})[name] = modules[name]
    metadata: dict[str, str] = {}
    for backend, owned in by_backend.items():
        metadata.update(backend.checkpoint_metadata(owned))
    return metadata


def _is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _transformers_config(model: Any, state: QuantizationState) -> dict[str, Any]:
    """``config.json`` of a transformers ``PreTrainedModel`` as ``save_pretrained`` writes it, with
    ``quantization_config`` for transformers.

    transformers quantizes every linear layer its own rules pick: the config's skip list names
    each linear layer quantcore kept in float, so that it rebuilds the same skeleton.
    """
    config = model.config.to_diff_dict()
    config["architectures"] = [type(model).__name__]
    dtype = _float_dtype(model)
    if dtype is not None:
        # The dtype the float tensors are in now (a model cast with .to() after it was built keeps
        # its config's old dtype): loading with dtype="auto" gives them back in it, as transformers'
        # save_pretrained does.
        config["dtype"] = str(dtype).removeprefix("torch.")
    if getattr(model.config, "tie_word_embeddings", False) and _untied(model):
        # a backend that quantized the input embeddings alone untied them from the head: say so,
        # or transformers would tie them again on load
        config["tie_word_embeddings"] = False
    main = state.config or next((c for c in state.overrides.values() if c is not None), None)
    if main is not None:
        quant = main.to_dict()
        field = type(main).skip_modules_field
        if field is not None:
            floats = [name for name, m in model.named_modules() if type(m) is nn.Linear and name not in state.modules]
            quant[field] = sorted(set(quant.get(field) or []) | set(floats))
        config["quantization_config"] = quant
    else:
        config.pop("quantization_config", None)
    return config


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (transformers' rule for ``config.dtype``)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def _untied(model: Any) -> bool:
    try:
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if inputs is None or outputs is None:
        return False
    return getattr(inputs, "weight", None) is not getattr(outputs, "weight", None)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def _carry_over(old: Path, new: Path) -> None:
    """Copy what else the old folder held (a tokenizer, a README) into the new one; weights and the
    configs that described them (a backend's own config file) excepted."""
    stale = {*_REPLACED, *config_file_methods()}
    for entry in old.iterdir():
        name = entry.name
        if (new / name).exists() or name in stale or name.endswith((".safetensors", ".bin", ".index.json")):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / name, symlinks=True)
        else:
            shutil.copy2(entry, new / name, follow_symlinks=False)


# ====================================================================== the saved state
def read_quantization_state(
    folder: str | os.PathLike[str], files: CheckpointFiles | None = None, model: nn.Module | None = None
) -> tuple[QuantizationState, dict[str, str]] | None:
    """The quantization state of a checkpoint and its tied names, or ``None`` for a float checkpoint.

    quantcore's ``quantization_config.json`` says which module each config made. A checkpoint saved
    by transformers only has ``config.json``'s ``quantization_config``, one saved by an older tool
    only a file a backend names in :attr:`~quantcore.Backend.config_files` (AutoGPTQ's
    ``quantize_config.json``): the quantized modules are then those of ``model`` whose tensors in
    ``files`` are not plain float ones. Every config a checkpoint carries must agree.
    """
    folder = Path(folder)
    own = folder / STATE_NAME
    if own.is_file():
        data = _read_json(own)
        version = data.get("format_version", FORMAT_VERSION) if isinstance(data, dict) else None
        if not isinstance(data, dict) or "modules" not in data:
            raise CheckpointError(f"{own}: not a quantcore quantization state (no 'modules')")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{own}: format_version {version!r} is newer than this quantcore "
                f"reads ({FORMAT_VERSION}); upgrade quantcore"
            )
        try:
            state = QuantizationState.from_dict(data)
        except ConfigError as exc:
            raise CheckpointError(f"{own}: {exc}") from exc
        main = state.config or next((c for c in state.overrides.values() if c is not None), None)
        if main is not None:
            _check_configs_agree(folder, (STATE_NAME, main), _foreign_configs(folder))
        return state, dict(data.get("tied_weights") or {})
    foreign = _foreign_configs(folder)
    if not foreign:
        return None
    (where, config), others = foreign[0], foreign[1:]
    _check_configs_agree(folder, foreign[0], others)
    if model is None or files is None:
        raise CheckpointError(
            f"{folder}: inferring which modules are quantized (it has only {where}) needs the model and files"
        )
    quantizer = AutoQuantizer.from_config(config)
    return QuantizationState(config, modules=_infer_quantized(model, files, quantizer)), {}


def _transformers_quantization_config(config_file: Path) -> Any:
    """``config.json``'s ``quantization_config`` (``None`` without the file or the key)."""
    if not config_file.is_file():
        return None
    data = _read_json(config_file)
    return data.get("quantization_config") if isinstance(data, dict) else None


def _foreign_configs(folder: Path) -> list[tuple[str, QuantizationConfigMixin]]:
    """The configs other tools wrote beside the weights, each with where it was read.

    ``config.json``'s ``quantization_config`` (transformers) first, then every file a backend
    reads by its :attr:`~quantcore.Backend.config_files` (a file without ``quant_method`` belongs
    to the one backend naming it). Each one that does not load is an error naming the file.
    """
    found = []
    config_file = folder / CONFIG_NAME
    quant = _transformers_quantization_config(config_file)
    if quant:
        found.append((_TRANSFORMERS_WHERE, _config_from(config_file, quant, "quantization_config: ")))
    for name, methods in config_file_methods().items():
        path = folder / name
        if not path.is_file():
            continue
        data = _read_json(path)
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: expected a JSON object (a quantization config), got {type(data).__name__}")
        if "quant_method" not in data:
            if len(methods) > 1:
                raise CheckpointError(
                    f"{path} has no quant_method and the backends {', '.join(map(repr, methods))} all read "
                    f'{name}: add the right "quant_method" to it'
                )
            data = {**data, "quant_method": methods[0]}
        found.append((name, _config_from(path, data, "")))
    return found


def _config_from(path: Path, data: Any, key: str) -> QuantizationConfigMixin:
    try:
        return AutoQuantizationConfig.from_dict(data)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {key}{exc}") from exc


def _check_configs_agree(
    folder: Path, first: tuple[str, QuantizationConfigMixin], others: list[tuple[str, QuantizationConfigMixin]]
) -> None:
    """Refuse a checkpoint whose configs (``quantization_config.json``, ``config.json``, a backend's
    own file) say different things.

    quantcore reads ``quantization_config.json``, transformers reads ``config.json``, older tools
    read a backend's own file: if one was edited, each library would load another model. The
    skip list may differ in one way only: ``config.json`` also names the linears kept in float (see
    :func:`_transformers_config`).
    """
    where, main = first
    ours = main.to_dict()
    skips = type(main).skip_modules_field
    for other_where, other in others:
        theirs = other.to_dict()
        differences = []
        for key in dict.fromkeys([*ours, *theirs]):
            mine, their = ours.get(key, "(absent)"), theirs.get(key, "(absent)")
            if key == skips and ours.get("quant_method") == theirs.get("quant_method"):
                missing = sorted(set(mine or []) - set(their or []))
                if missing:
                    differences.append(f"{key}: {', '.join(map(repr, missing))} only in {where}")
            elif mine != their:
                differences.append(f"{key}: {json.dumps(mine)} in {where}, {json.dumps(their)} in {other_where}")
        if differences:
            raise CheckpointError(
                _listing(
                    f"{folder}: {where} and {other_where} disagree, so the libraries reading each would load "
                    "different models; make the two agree (or save the checkpoint again)",
                    differences,
                )
            )


def _infer_quantized(model: nn.Module, files: CheckpointFiles, quantizer: Quantizer) -> dict[str, str]:
    candidates = {name: m for name, m in model.named_modules() if name and quantizer.can_replace(m)}
    found: dict[str, dict[str, TensorEntry]] = {}
    for key, entry in files.entries.items():
        owner = _owner(key, candidates)
        if owner is not None:
            found.setdefault(owner, {})[key[len(owner) + 1 :]] = entry
    modules = {}
    for name, entries in found.items():
        plain = {k: t for k, t in candidates[name].named_parameters() if t is not None}
        is_float = set(entries) == set(plain) and all(
            entries[k].shape == tuple(t.shape) and entries[k].dtype.is_floating_point for k, t in plain.items()
        )
        if not is_float:
            modules[name] = "config"
    return modules


def _owner(key: str, names: Mapping[str, Any]) -> str | None:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in names:
            return prefix
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None


# ====================================================================== loading
def load_quantized(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Load a quantized checkpoint into the float skeleton ``model`` (meta device is fine), in place.

    Nothing is quantized again: the quantized modules are rebuilt from the saved state and filled
    by their backend. Every header, name and shape is checked first and every module is built off
    to the side: on any error (a missing, unexpected or mis-shaped tensor, a truncated or corrupt
    file, a config the tensors do not fit) a :class:`~quantcore.CheckpointError` names the tensor
    and the file, and ``model`` is left untouched. Loads checkpoints saved by transformers'
    bitsandbytes integration too. Returns ``model``, on ``device`` (default: where the skeleton's
    real tensors are, else the CPU).
    """
    folder = Path(path)
    files = CheckpointFiles.open(folder)
    found = read_quantization_state(folder, files, model)
    if found is None:
        raise CheckpointError(
            f"{folder} is not a quantized checkpoint (no {STATE_NAME}, no quantization_config in "
            f"{CONFIG_NAME}, no config file an installed backend reads): load a float checkpoint with "
            "load_state_dict"
        )
    state, tied = found
    if device is None:
        device = next((t.device for t in (*model.parameters(), *model.buffers()) if not t.is_meta), "cpu")
    loader = Loader.prequantized(model, state, files, tied, torch.device(device))
    loader.check()
    applied = loader.run(immediate=False, progress=progress)
    for apply in applied:
        apply()
    model.__dict__[STATE_ATTRIBUTE] = state
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        warnings.warn(
            f"still on the meta device after loading (not saved in checkpoints): {', '.join(left[:5])}"
            f"{' ...' if len(left) > 5 else ''}; build the skeleton with quantcore.empty_weights() so that "
            "non-persistent buffers are real",
            stacklevel=2,
        )
    return model


@attrs.define(eq=False)
class Slot:
    """One plain tensor of the skeleton, with every name and place it has (tied weights share one)."""

    names: list[str]
    places: list[tuple[nn.Module, str, bool]]  # (owner, attribute, is a parameter)
    like: torch.Tensor
    key: str | None = None


@attrs.define(eq=False)
class Target:
    """One module the load replaces by a quantized one."""

    name: str
    module: nn.Module
    parent: nn.Module
    child: str
    quantizer: QuantizerBase
    prequantized: bool
    source: str
    keys: dict[str, str] = attrs.Factory(dict)  # local key -> checkpoint key
    skeleton: nn.Module | None = None


def _prequantized_targets(model: nn.Module, state: QuantizationState, files: CheckpointFiles) -> dict[str, Target]:
    """The modules ``state`` says were saved quantized, each with its quantizer; every mismatch raised at once."""
    cache: dict[int, QuantizerBase] = {}
    modules = dict(model.named_modules())
    targets: dict[str, Target] = {}
    problems: list[str] = []
    for name, source in state.modules.items():
        config = state.config if source == "config" else state.overrides.get(source)
        module = modules.get(name)
        if config is None:
            problems.append(f"module {name!r}: its config {source!r} is not in the saved state")
            continue
        if module is None:
            problems.append(
                f"module {name!r} is quantized in the checkpoint but is not in the {type(model).__name__} given"
            )
            continue
        quantizer = cache.get(id(config)) or cache.setdefault(id(config), AutoQuantizer.from_config(config))
        if not quantizer.can_replace(module):
            problems.append(
                f"module {name!r} is a {type(module).__name__}, which {quantizer.describe()} "
                "cannot load into (pass a float skeleton)"
            )
            continue
        parent, _, child = name.rpartition(".")
        targets[name] = Target(name, module, modules[parent], child, quantizer, True, source)
    if problems:
        raise CheckpointError(_listing(f"checkpoint {files.folder} does not fit the model", problems))
    return targets


def _model_slots(model: nn.Module, targets: Mapping[str, Target]) -> list[Slot]:
    """One slot per parameter or buffer outside ``targets`` (tied tensors: one slot, every name)."""
    by_id: dict[int, Slot] = {}
    seen: set[tuple[int, str]] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        tensors: list[tuple[str, torch.Tensor | None, bool]] = [(k, p, True) for k, p in module._parameters.items()]
        tensors += [(k, b, False) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set]
        for attr, t, is_param in tensors:
            if t is None:
                continue
            slot = by_id.get(id(t))
            if slot is None:
                slot = by_id[id(t)] = Slot([], [], t)
            slot.names.append(prefix + attr)
            if (id(module), attr) not in seen:
                seen.add((id(module), attr))
                slot.places.append((module, attr, is_param))
        for child, sub in module._modules.items():
            if sub is not None and prefix + child not in targets:
                visit(sub, f"{prefix}{child}.")

    visit(model, "")
    return list(by_id.values())


_Plan = TypeVar("_Plan", bound="LoadPlan")


@attrs.define(eq=False)
class LoadPlan:
    """One planned load: which checkpoint tensor goes where, checked before anything is read.

    ``cast_dtype`` converts floating plain tensors and the float weights of modules to quantize
    (``None`` keeps the checkpoint's dtypes). :class:`Loader` runs a plan.
    """

    model: nn.Module
    files: CheckpointFiles
    targets: dict[str, Target]
    device: torch.device
    tied: dict[str, str] = attrs.Factory(dict)
    cast_dtype: torch.dtype | None = None
    ignore_unexpected: list[str] = attrs.Factory(list)
    slots: list[Slot] = attrs.Factory(list)
    routes: dict[str, list[tuple[Slot | Target, str | None]]] = attrs.Factory(dict)

    # ------------------------------------------------------------------ planning
    @classmethod
    def prequantized(
        cls: type[_Plan],
        model: nn.Module,
        state: QuantizationState,
        files: CheckpointFiles,
        tied: dict[str, str],
        device: torch.device,
        **kwargs: Any,
    ) -> _Plan:
        """A load of modules saved quantized, as ``state`` records them."""
        targets = _prequantized_targets(model, state, files)
        return cls(model, files, targets, device, tied, **kwargs)

    def check(self) -> None:
        """Match every checkpoint tensor to a place, or raise one :class:`CheckpointError` listing all."""
        problems: list[str] = []
        entries = self.files.entries
        self.slots = _model_slots(self.model, self.targets)
        names_of: dict[int, list[str]] = {}
        for slot in self.slots:
            names_of[id(slot.like)] = slot.names
        for slot in self.slots:
            slot.key = self._resolve(slot.names)
            if slot.key is None:
                problems.append(f"missing tensor {slot.names[0]!r}" + _aka(slot.names))
                continue
            entry = entries[slot.key]
            if entry.shape != tuple(slot.like.shape):
                problems.append(
                    f"tensor {slot.key!r} in {entry.file.name} has shape {list(entry.shape)}, "
                    f"the model expects {list(slot.like.shape)}"
                )
            elif slot.like.is_floating_point() != entry.dtype.is_floating_point or (
                not entry.dtype.is_floating_point and entry.dtype != slot.like.dtype
            ):
                problems.append(
                    f"tensor {slot.key!r} in {entry.file.name} is {entry.dtype}, the model expects {slot.like.dtype}"
                )
            self._route(slot.key, slot, None)
        for key in entries:
            owner = _owner(key, self.targets)
            if owner is not None:
                target = self.targets[owner]
                if target.prequantized:
                    target.keys[key[len(owner) + 1 :]] = key
                    self._route(key, target, key[len(owner) + 1 :])
        for target in self.targets.values():
            problems += self._check_target(target, names_of)
        ignore = [re.compile(p) for p in self.ignore_unexpected]
        for key, entry in entries.items():
            if key not in self.routes and not any(p.search(key) for p in ignore):
                problems.append(
                    f"unexpected tensor {key!r} in {entry.file.name} (no such parameter or buffer in the model)"
                )
        if problems:
            raise CheckpointError(
                _listing(f"checkpoint {self.files.folder} does not fit the {type(self.model).__name__}", problems)
            )

    def _check_target(self, target: Target, names_of: dict[int, list[str]]) -> list[str]:
        quantizer = target.quantizer
        if target.prequantized:
            if not target.keys:
                return [
                    f"missing tensors of quantized module {target.name!r} ({quantizer.describe()}): none of "
                    f"{target.name}.* is in the checkpoint"
                ]
            try:
                target.skeleton = quantizer.create_quantized_module(_meta_clone(target.module), target.name)
            except Exception as exc:
                return [
                    f"module {target.name!r}: {quantizer.describe()} cannot build its skeleton: "
                    f"{type(exc).__name__}: {exc}"
                ]
            return []
        problems = []
        for local, t in _own_tensors(target.module):
            names = [f"{target.name}.{local}", *names_of.get(id(t), [])]
            key = self._resolve(names)
            if key is None:
                problems.append(f"missing tensor {names[0]!r}")
                continue
            entry = self.files.entries[key]
            if entry.shape != tuple(t.shape) or not entry.dtype.is_floating_point:
                problems.append(
                    f"tensor {key!r} in {entry.file.name} is {entry.dtype} {list(entry.shape)}, "
                    f"module {target.name!r} expects a float tensor of shape {list(t.shape)}"
                )
            target.keys[local] = key
            self._route(key, target, local)
        return problems

    def _resolve(self, names: list[str]) -> str | None:
        entries = self.files.entries
        for name in names:
            if name in entries:
                return name
        for name in names:
            if self.tied.get(name) in entries:
                return self.tied[name]
        return None

    def _route(self, key: str, to: Slot | Target, local: str | None) -> None:
        self.routes.setdefault(key, []).append((to, local))


@attrs.define(eq=False)
class Loader(LoadPlan):
    """A :class:`LoadPlan` that reads the tensors and builds the modules."""

    def run(self, *, immediate: bool, progress: bool | None = None) -> list[Callable[[], None]]:
        """Read the tensors and build the modules; each result is put in place as it completes
        (``immediate``) or returned as a list of swaps to apply once all succeeded."""
        pending: dict[str, dict[str, torch.Tensor]] = {}
        done: list[Callable[[], None]] = []
        bar = _progress(sum(self.files.entries[k].nbytes for k in self.routes), progress)
        try:
            for entry, tensor in self.files.stream(set(self.routes), to=self._stream_device()):
                for to, local in self.routes[entry.name]:
                    if isinstance(to, Slot):
                        apply = self._place(to, tensor)
                    else:
                        assert local is not None  # a module's tensors are routed with their local names
                        parts = pending.setdefault(to.name, {})
                        parts[local] = tensor
                        if len(parts) < len(to.keys):
                            continue
                        apply = self._build(to, pending.pop(to.name), entry)
                    if immediate:
                        apply()
                    else:
                        done.append(apply)
                if bar is not None:
                    bar.update(entry.nbytes)
                # Drop this loop's hold on the float tensors of the module just built before the
                # next tensor is read: else both would be alive on the device at once.
                del tensor
                parts = {}
        finally:
            if bar is not None:
                bar.close()
        return done

    def _stream_device(self) -> torch.device | Callable[[TensorEntry], torch.device | None] | None:
        """Where the reader may copy each tensor straight away: one device for the whole load, or a
        function of the tensor (``None``: read it into host memory)."""
        return self.device

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.cast_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.cast_dtype)
        return tensor.to(self.device)

    def _place(self, slot: Slot, tensor: torch.Tensor) -> Callable[[], None]:
        value = self._cast(tensor)
        param: nn.Parameter | None = None
        if any(is_param for _, _, is_param in slot.places):
            grad = slot.like.requires_grad and value.is_floating_point()
            value = param = nn.Parameter(value, requires_grad=grad)

        def apply() -> None:
            for module, attr, is_param in slot.places:
                if is_param:
                    module._parameters[attr] = param
                else:
                    module._buffers[attr] = value

        return apply

    def _build(self, target: Target, tensors: dict[str, torch.Tensor], entry: TensorEntry) -> Callable[[], None]:
        new = self._module_for(target, tensors, entry)

        def apply() -> None:
            swap_module(target.parent, target.child, new)

        return apply

    def _module_for(self, target: Target, tensors: dict[str, torch.Tensor], entry: TensorEntry) -> nn.Module:
        """The quantized module of ``target``, from its saved quantized tensors or its float ones."""
        where = f"{entry.file.name}" if len(self.files.shards) == 1 else "the checkpoint's shards"
        if target.prequantized:
            assert target.skeleton is not None  # check() built it
            try:
                new = target.quantizer.load_quantized_state(target.skeleton, tensors, self.device)
            except Exception as exc:
                raise CheckpointError(
                    f"tensors {target.name}.* in {where} do not fit module {target.name!r} as the saved "
                    f"config builds it ({target.quantizer.describe()}): {exc}"
                ) from exc
        else:
            float_module = _with_tensors(target.module, {k: self._cast(t) for k, t in tensors.items()})
            try:
                new = target.quantizer.create_quantized_module(float_module, target.name)
            except Exception as exc:
                raise QuantizationError(
                    f"could not quantize module {target.name!r} with "
                    f"{target.quantizer.describe()}: {type(exc).__name__}: {exc}"
                ) from exc
        return new

    # ------------------------------------------------------------------ reporting
    def report(self, seconds: float) -> QuantizationReport:
        """What the load put in the model: one record per quantized module."""
        records = []
        for t in self.targets.values():
            new = t.parent.get_submodule(t.child)
            records.append(
                ModuleRecord(
                    name=t.name,
                    module_type=type(t.module).__name__,
                    action="quantized",
                    rule=f"checkpoint: {t.source}",
                    method=t.quantizer.describe(),
                    params=sum(p.numel() for p in t.module.parameters()),
                    bytes_before=module_nbytes(t.module),
                    bytes_after=module_nbytes(new),
                )
            )
        params = sum(p.numel() for p in self.model.parameters())
        after = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        before = after + sum(r.bytes_before - r.bytes_after for r in records)
        return QuantizationReport(records, params, before, after, seconds=seconds)


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out: list[tuple[str, torch.Tensor]] = [(k, p) for k, p in module._parameters.items() if p is not None]
    out += [(k, b) for k, b in module._buffers.items() if b is not None and k not in module._non_persistent_buffers_set]
    return out


def _meta_clone(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose tensors are on the meta device (``module`` itself is not touched)."""
    if all(t.is_meta for t in (*module.parameters(), *module.buffers())):
        return module
    clone = _shallow(module)
    clone._parameters = {
        k: None if p is None else nn.Parameter(p.detach().to("meta"), p.requires_grad)
        for k, p in module._parameters.items()
    }
    clone._buffers = {k: None if b is None else b.detach().to("meta") for k, b in module._buffers.items()}
    clone._modules = {k: None if m is None else _meta_clone(m) for k, m in module._modules.items()}
    return clone


def _with_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module`` holding ``tensors`` (its own parameters and buffers, by local name)."""
    clone = _shallow(module)
    clone._parameters = {
        k: nn.Parameter(tensors[k], requires_grad=False) if k in tensors else p for k, p in module._parameters.items()
    }
    clone._buffers = {k: tensors.get(k, b) for k, b in module._buffers.items()}
    return clone


def _shallow(module: nn.Module) -> nn.Module:
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = dict(module.__dict__)
    return clone


def _aka(names: list[str]) -> str:
    return f" (also named {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""


def _listing(title: str, problems: Iterable[str]) -> str:
    problems = list(problems)
    n = len(problems)
    return f"{title}: {n} problem{'s' if n != 1 else ''}\n" + "\n".join(f"  - {p}" for p in problems)


def _progress(total: int, enabled: bool | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="loading", unit="B", unit_scale=True, leave=False)
