"""``from_pretrained``: a transformers checkpoint, quantized while it streams in.

The architecture is built with its parameters on the meta device (no memory, no initialisation),
then the tensors are read one at a time, shard by shard. Each linear layer to quantize gets its
float weight, is quantized by its backend and swapped in as soon as its tensors are complete, so
the peak memory is about the quantized model plus the largest tensor, not the float model.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from .checkpoint import CONFIG_NAME, Loader, Target, read_quantization_state
from .config import QuantizationConfigMixin
from .errors import CheckpointError
from .shards import CheckpointFiles
from .state import STATE_ATTRIBUTE, QuantizationState

__all__ = ["REPORT_ATTRIBUTE", "empty_weights", "from_pretrained"]

REPORT_ATTRIBUTE = "quantcore_report"


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

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def from_pretrained(
    path: str | os.PathLike[str],
    quantization_config: QuantizationConfigMixin | Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | int | torch.device | Mapping[str, Any] | None = None,
    *,
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
    :param device_map: where to put the model: ``None`` (the CPU), a device (``"cuda"``, ``0``,
        ``torch.device``), or a dict whose values are all one device (``{"": 0}``). Spreading a
        model over several devices is not supported yet.
    :param overrides: ``{pattern: config | None}`` as in :func:`quantcore.quantize`.
    :param skip_modules: more module names or patterns to keep in float.
    :param default_skips: keep the output head and tied linears in float (default).
    :param auto_class: the transformers auto class (default: ``AutoModelForCausalLM``, falling back
        to ``AutoModel``).
    :param progress: a progress bar (default: when stderr is a terminal).
    :param kwargs: passed to ``AutoConfig.from_pretrained`` (``trust_remote_code``, config overrides).
    :returns: the model in eval mode; ``model.quantcore_report`` is the
        :class:`~quantcore.QuantizationReport` of the load, and :func:`quantcore.save_quantized`
        saves it.
    """
    import transformers

    start = time.perf_counter()
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{folder} has no {CONFIG_NAME}: give a local transformers checkpoint folder "
            "(download one first, e.g. with huggingface_hub.snapshot_download)"
        )
    device = _device(device_map)
    files = CheckpointFiles.open(folder)
    config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs)
    saved_quantization = getattr(config, "quantization_config", None)
    if saved_quantization is not None:
        config.quantization_config = None  # transformers' model classes must not act on it
    dtype = _dtype(dtype, config, files)
    with empty_weights():
        model = _auto_class(auto_class, config).from_config(config, dtype=dtype)
    if saved_quantization is not None:
        config.quantization_config = saved_quantization
    ignore = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])

    found = read_quantization_state(folder, files, model)
    if found is not None:
        if quantization_config is not None or overrides:
            import warnings

            warnings.warn(
                f"{folder} is already quantized: the quantization_config / overrides given are ignored "
                "and the checkpoint loads as it was saved",
                stacklevel=2,
            )
        state, tied = found
        loader = Loader.prequantized(model, state, files, tied, device, cast_dtype=dtype, ignore_unexpected=ignore)
        loader.check()
        loader.run(immediate=True, progress=progress)
        report = loader.report(time.perf_counter() - start)
    else:
        state, loader, plan = _quantizing_loader(
            model, files, device, dtype, quantization_config, overrides, skip_modules, default_skips, ignore
        )
        loader.check()
        if plan is not None:
            from .plugins import call_observers

            call_observers("before_quantize", model=model, config=state.config, plan=plan)
        loader.run(immediate=True, progress=progress)
        report = None
        if plan is not None:
            report = attrs.evolve(plan, dry_run=False, seconds=time.perf_counter() - start)
            call_observers("after_quantize", model=model, config=state.config, report=report)
    if state is not None:
        model.__dict__[STATE_ATTRIBUTE] = state
    _load_generation_config(model, folder)
    model.eval()
    model.__dict__[REPORT_ATTRIBUTE] = report
    return model


def _quantizing_loader(
    model: nn.Module,
    files: CheckpointFiles,
    device: torch.device,
    dtype: torch.dtype,
    quantization_config: Any,
    overrides: Mapping[str, Any] | None,
    skip_modules: list[str] | None,
    default_skips: bool,
    ignore: list[str],
) -> tuple[QuantizationState | None, Loader, Any]:
    """A float checkpoint: the modules the rules choose are quantized from their float weights."""
    from .auto import AutoQuantizer
    from .walk import Walk

    kwargs = {"cast_dtype": dtype, "ignore_unexpected": ignore}
    if quantization_config is None and not overrides:
        return None, Loader(model, files, {}, device, **kwargs), None
    main = AutoQuantizer.from_config(quantization_config) if quantization_config is not None else None
    walk = Walk.build(main, model, overrides, skip_modules, default_skips)
    for quantizer in walk.quantizers:
        quantizer.check_environment()
    targets: dict[str, Target] = {}
    for d in walk.decide():
        rule = d.rule
        if rule is None or rule.quantizer is None or not rule.quantizer.can_replace(d.module) or d.parent is None:
            continue
        targets[d.name] = Target(d.name, d.module, d.parent, d.child, rule.quantizer, False, rule.source)
    state = QuantizationState(
        main.config if main is not None else None,
        {t.source: walk.overrides[t.source] for t in targets.values() if t.source != "config"},
        list(skip_modules or []),
        default_skips,
        {name: t.source for name, t in targets.items()},
    )
    return state, Loader(model, files, targets, device, **kwargs), walk.plan()


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


def _device(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, Mapping):
        devices = {_device(v) for v in device_map.values()}
        if len(devices) != 1:
            raise NotImplementedError(
                f"device_map places modules on {len(devices)} devices "
                f"({', '.join(sorted(map(str, devices)))}): "
                "quantcore.from_pretrained puts the whole model on one device for now; pass one device "
                "(device_map='cuda:0' or {'': 0})"
            )
        return devices.pop()
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise NotImplementedError(
            f"device_map={device_map!r} (spreading a model over devices) is not supported yet: "
            "pass one device (device_map='cuda', 'cpu', 0 or {'': 0})"
        )
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device_map: not a device: {device_map!r} ({exc})") from None


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    if (folder / "generation_config.json").is_file() and hasattr(model, "generation_config"):
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
