"""safetensors files, one tensor at a time: validated headers, plain reads, sharded writes.

Reading parses the header itself and reads each tensor with ``readinto`` into memory the tensor
owns. ``safetensors.safe_open`` memory-maps the file instead, and every page a load touches stays
resident (and counted in the process's RSS) until the file is closed: streaming a whole shard
through it costs the shard's size in memory, which is what a streaming load exists to avoid.

Every header is checked before any tensor is read: JSON, dtypes, shapes, offsets that tile the data
exactly (a truncated or padded file fails here), and, for sharded checkpoints, that the index and
the shards agree. Problems raise one :class:`~quantcore.CheckpointError` naming each file and tensor.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from .errors import CheckpointError

__all__ = [
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "CheckpointFiles",
    "ShardFile",
    "TensorEntry",
    "parse_size",
    "write_shards",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@attrs.frozen
class TensorEntry:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.end - self.start


class ShardFile:
    """One safetensors file whose header was read and checked; :meth:`read` loads a tensor."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        problems = self._parse()
        if problems:
            raise CheckpointError(_format(f"{self.path} is not a valid safetensors file", problems))

    def _parse(self) -> list[str]:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return [f"the file has {size} bytes, fewer than the 8-byte header length (truncated?)"]
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    return [f"the header claims {n} bytes but the file has {size} (truncated or corrupt)"]
                raw = f.read(n)
        except OSError as exc:
            return [f"cannot read: {exc}"]
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return [f"the header is not valid JSON ({exc}) (corrupt file?)"]
        if not isinstance(header, dict):
            return ["the header is not a JSON object (corrupt file?)"]
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            return ["'__metadata__' is not a JSON object"]
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        data_start, data_size = 8 + n, size - 8 - n
        problems: list[str] = []
        for name, info in header.items():
            problem = self._entry(name, info, data_start)
            if problem:
                problems.append(f"tensor {name!r}: {problem}")
        if problems:
            return problems
        cursor = 0
        for e in sorted(self.entries.values(), key=lambda e: (e.start, e.end)):
            begin, end = e.start - data_start, e.end - data_start
            if begin != cursor:
                what = "overlaps the previous tensor" if begin < cursor else f"leaves a gap at byte {cursor}"
                problems.append(f"tensor {e.name!r}: its data {what} (corrupt header)")
            cursor = max(cursor, end)
        if cursor > data_size:
            last = max(self.entries.values(), key=lambda e: e.end)
            problems.append(
                f"tensor {last.name!r}: needs {cursor} data bytes but the file has {data_size} (truncated file)"
            )
        elif cursor < data_size:
            problems.append(f"{data_size - cursor} bytes after the last tensor (corrupt or mismatched header)")
        return problems

    def _entry(self, name: str, info: Any, data_start: int) -> str | None:
        if not isinstance(info, dict):
            return "its header entry is not a JSON object"
        dtype_name = info.get("dtype")
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            return f"unknown dtype {dtype_name!r}"
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            return f"bad shape {shape!r}"
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            return f"bad data_offsets {offsets!r}"
        expected = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != expected:
            span = offsets[1] - offsets[0]
            return f"data_offsets {offsets} span {span} bytes but {dtype} {shape} needs {expected}"
        self.entries[name] = TensorEntry(
            name, self.path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]
        )
        return None

    def read(self, entry: TensorEntry, f: Any = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``entry`` describes (``f``: this file, already open).

        In memory of its own, or a view of the start of the uint8 buffer ``into`` (reused by the caller).
        """
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        # Read straight into the tensor's storage: no zero-filled bytearray, no second copy.
        data = torch.empty(entry.nbytes, dtype=torch.uint8) if into is None else into[: entry.nbytes]
        buf = (ctypes.c_char * entry.nbytes).from_address(data.data_ptr())
        try:
            if f is None:
                with open(self.path, "rb", buffering=0) as own:
                    _read_exactly(own, entry, buf)
            else:
                _read_exactly(f, entry, buf)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {entry.name!r}: {exc}") from exc
        return data.view(entry.dtype).reshape(entry.shape)


# Host loads allocate and free one tensor after another (read, quantize, drop the float copy).
# glibc keeps such freed chunks in its heap, so without a trim the process's peak grows by the
# float model's size: measured on SmolLM2-135M NF4, 930 MiB peak RSS without, about 560 with.
_TRIM_EVERY = 32 * 2**20


@functools.cache
def _malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def _release_freed_host_memory() -> None:
    """Give memory the allocator holds but no tensor uses back to the system (glibc only)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _staging_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A host buffer for copies to ``device``: page-locked where CUDA can use that."""
    pin = device.type == "cuda" and torch.cuda.is_available()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def _read_exactly(f: Any, entry: TensorEntry, buf: Any) -> None:
    f.seek(entry.start)
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise OSError(f"the file ended after {got} of the tensor's {len(view)} bytes (truncated)")
        got += n


class CheckpointFiles:
    """The safetensors files of a checkpoint folder (one file, or shards and their index), all checked."""

    def __init__(self, folder: Path, shards: list[ShardFile]):
        self.folder = folder
        self.shards = shards
        self.entries: dict[str, TensorEntry] = {k: e for s in shards for k, e in s.entries.items()}

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> CheckpointFiles:
        """Read and check every header of the checkpoint in ``folder`` (:class:`CheckpointError`)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder (give the folder a checkpoint was saved to)")
        index = folder / INDEX_NAME
        if index.is_file():
            return cls._sharded(folder, index)
        single = folder / WEIGHTS_NAME
        if single.is_file():
            return cls(folder, [ShardFile(single)])
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(found)}; only safetensors checkpoints load)" if found else ""
        raise CheckpointError(f"{folder} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}{hint}")

    @classmethod
    def _sharded(cls, folder: Path, index: Path) -> CheckpointFiles:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("'weight_map' is not a JSON object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid index ({type(exc).__name__}: {exc})") from None
        names = sorted(set(weight_map.values()), key=_shard_order)
        problems: list[str] = []
        shards: list[ShardFile] = []
        for name in names:
            path = folder / name
            if Path(name).name != name or not path.is_file():
                problems.append(f"{index.name} lists {name!r}, which is not a file in {folder}")
                continue
            try:
                shards.append(ShardFile(path))
            except CheckpointError as exc:
                problems.append(str(exc))
        if problems:
            raise CheckpointError(_format(f"checkpoint {folder} is incomplete or corrupt", problems))
        owner: dict[str, str] = {}
        for shard in shards:
            for key in shard.entries:
                if key in owner:
                    problems.append(f"tensor {key!r} is in both {owner[key]} and {shard.path.name}")
                owner[key] = shard.path.name
                if weight_map.get(key) != shard.path.name:
                    problems.append(
                        f"tensor {key!r} is in {shard.path.name} but {index.name} says {weight_map.get(key)!r}"
                    )
        for key, name in weight_map.items():
            if key not in owner and (folder / name).is_file():
                problems.append(f"tensor {key!r}: {index.name} places it in {name}, which does not hold it")
        if problems:
            raise CheckpointError(_format(f"checkpoint {folder}: the index and the shards disagree", problems))
        return cls(folder, shards)

    def stream(
        self, keys: set[str], to: torch.device | Callable[[TensorEntry], torch.device | None] | None = None
    ) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
        """Read the tensors named in ``keys``, shard by shard, in file order (sequential reads).

        ``to`` is a device, or a function giving each tensor's (``None``: the CPU). A tensor bound
        for an accelerator is read into one reused (pinned) staging buffer and copied there: no
        fresh host allocation, and no page faults, per tensor.
        """
        staging: torch.Tensor | None = None
        since_trim = 0
        for shard in self.shards:
            wanted = sorted((e for k, e in shard.entries.items() if k in keys), key=lambda e: e.start)
            if not wanted:
                continue
            try:
                f = open(shard.path, "rb", buffering=0)  # noqa: SIM115 - only opening may raise CheckpointError
            except OSError as exc:
                raise CheckpointError(f"{shard.path}: cannot open: {exc}") from exc
            with f:
                for entry in wanted:
                    device = to(entry) if callable(to) else to
                    if device is None or device.type == "cpu" or entry.nbytes == 0:
                        yield entry, shard.read(entry, f)
                        since_trim += entry.nbytes
                        if since_trim >= _TRIM_EVERY:
                            since_trim = 0
                            _release_freed_host_memory()
                        continue
                    largest = max(e.nbytes for e in wanted)
                    if staging is None or staging.numel() < largest:
                        staging = _staging_buffer(largest, device)
                    # a copy from page-locked memory returns once done: the buffer is free again
                    yield entry, shard.read(entry, f, into=staging).to(device)


def _shard_order(name: str) -> tuple[int, str]:
    m = re.search(r"(\d+)-of-\d+", name)
    return (int(m.group(1)) if m else 0, name)


def _format(title: str, problems: list[str]) -> str:
    return title + ":\n" + "\n".join(f"  - {p}" for p in problems)


# ---------------------------------------------------------------------- writing
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> ``5_000_000_000``, ``"2GiB"`` -> ``2**31``, ints as they are (transformers' units)."""
    if isinstance(size, int) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def save_file(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write one safetensors file (the single place files are written, so tests can fail it)."""
    from safetensors.torch import save_file as _save

    _save(dict(tensors), str(path), metadata={**(metadata or {}), "format": "pt"})


def write_shards(
    tensors: Mapping[str, torch.Tensor],
    folder: Path,
    max_shard_size: int | str,
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` into ``folder``: ``model.safetensors``, or shards and an index past the limit.

    Shards are filled in order, each up to ``max_shard_size`` bytes (a bigger tensor gets its own
    shard), named and indexed as transformers names them. ``metadata`` goes into every file's
    header. Returns the file names written.
    """
    limit = parse_size(max_shard_size)
    groups: list[list[str]] = [[]]
    used = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and used + n > limit:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += n
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if len(groups) == 1:
        names = [WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, groups, strict=True):
        save_file({k: tensors[k].detach().to("cpu").contiguous() for k in keys}, folder / name, metadata)
        weight_map.update(dict.fromkeys(keys, name))
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        names.append(INDEX_NAME)
    return names
