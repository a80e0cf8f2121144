"""Disk offload: the tensors of modules a device map puts on ``"disk"``, and the index accelerate reads them by.

A module on disk keeps its tensors on the meta device; accelerate's dispatch hooks
(``AlignDevicesHook`` over an ``OffloadedWeightsLoader``) read them for each forward through an
index ``{tensor name: {"safetensors_file", "weight_name", "dtype"}}``, the form transformers
builds. A float tensor the checkpoint holds as it is is read from the checkpoint's own safetensors
file (cast to ``"dtype"`` when read): nothing is copied, and the load never reads it. A quantized
module has tensors no file holds: it is quantized on the CPU and its tensors are written to
``offload_folder``, one safetensors file per module, before the module goes back to the meta device.

Every file is written under a temporary name and renamed once complete, and a load that fails
removes the files it wrote: a failed or killed load leaves no half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from . import shards
from .errors import ConfigError
from .placement import count_names
from .shards import TensorEntry

__all__ = ["DiskOffload", "check_offload_folder"]


def check_offload_folder(folder: str | os.PathLike[str] | None, needs: list[str], nbytes: int) -> Path | None:
    """``folder`` as a :class:`Path` once it exists and takes files, or ``None`` when nothing is written.

    :param needs: the modules whose tensors must be written (quantized ones on disk), for the error.
    :param nbytes: what they will take; a folder on a disk with less free space is refused.
    :raises ConfigError: before anything is read: a folder needed but not given, one that cannot be
        created or written, or too little free space.
    """
    if folder is None:
        if not needs:
            return None
        raise ConfigError(
            [
                (
                    "offload_folder",
                    f"the device map puts {count_names(needs)} on disk, quantized: their quantized tensors are in no "
                    "file yet and must be written; pass offload_folder='path/to/a/folder' (float modules on disk "
                    "need none: they are read from the checkpoint)",
                )
            ],
            title="disk offload needs a folder",
        )
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".quantcore-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(
            [("offload_folder", f"{str(path)!r} cannot hold the offloaded tensors: {exc}; give a writable folder")],
            title="disk offload needs a writable folder",
        ) from None
    free = _free_bytes(path)
    if free is not None and free < nbytes:
        raise ConfigError(
            [
                (
                    "offload_folder",
                    f"{str(path)!r} is on a disk with {free / 2**20:.1f} MiB free; the quantized modules offloaded "
                    f"there need {nbytes / 2**20:.1f} MiB",
                )
            ],
            title="disk offload needs room",
        )
    return path


def _free_bytes(path: Path) -> int | None:
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):  # no statvfs (Windows): the write itself will tell
        return None
    return stats.f_bavail * stats.f_frsize


@attrs.define(eq=False)
class DiskOffload:
    """The index of every tensor on disk, built while a checkpoint loads, and the files written for it."""

    folder: Path | None
    index: dict[str, dict[str, str]] = attrs.Factory(dict)
    written: list[Path] = attrs.Factory(list)

    def serve(self, name: str, entry: TensorEntry, dtype: torch.dtype) -> None:
        """Tensor ``name`` is read from the checkpoint, where ``entry`` is, as ``dtype``."""
        self.index[name] = {
            "safetensors_file": str(entry.file),
            "weight_name": entry.name,
            "dtype": _dtype_name(dtype),
        }

    def write(self, name: str, module: nn.Module) -> nn.Module:
        """Write the tensors of ``module`` (called ``name``; on the CPU) to the folder; ``module`` on meta."""
        from accelerate.utils import named_module_tensors, set_module_tensor_to_device

        assert self.folder is not None  # check_offload_folder required it for quantized modules on disk
        # the names accelerate's hook will ask the index for
        named = named_module_tensors(module, include_buffers=True, recurse=True, remove_non_persistent=True)
        local = [key for key, _ in named]
        tensors = {}
        for key in local:
            tensor = _tensor(module, key)
            if type(tensor) not in (torch.Tensor, nn.Parameter):
                raise TypeError(
                    f"module {name!r}: tensor {key!r} is a {type(tensor).__name__}, which cannot be offloaded to "
                    "disk (only plain tensors can): map the module to a GPU or the CPU"
                )
            tensors[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
        path = self.folder / f"{name}.safetensors"
        partial = path.with_name(f".{path.name}.partial")
        self.written.append(path)
        try:
            shards.save_file(tensors, partial)
            partial.replace(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        for full, tensor in tensors.items():
            self.index[full] = {"safetensors_file": str(path), "weight_name": full, "dtype": _dtype_name(tensor.dtype)}
        for key in local:
            set_module_tensor_to_device(module, key, "meta")
        return module

    def discard(self) -> None:
        """Remove the files this load wrote (it failed: the model they were for does not exist)."""
        for path in self.written:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.written.clear()
        self.index.clear()


def _tensor(module: nn.Module, key: str) -> Any:
    owner, _, attr = key.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
