"""Writing a folder beside its target and swapping it in whole; clearing what killed writers left.

A save writes ``.NAME.<id>.tmp`` next to the folder ``NAME``, then swaps it into place. A save
killed half-way (SIGKILL, a power cut) leaves that folder behind, as large as the checkpoint. So
that a later save can prove such a folder is debris, each writer first leaves a small marker,
``.NAME.<id>.writer.json``: its process id, host, boot, pid namespace and process start time.
The marker is written before the folder is made and removed after the folder is gone, so a
leftover folder always has its marker. A later save to ``NAME`` removes the folders whose writer
is provably gone (same host, boot and pid namespace, and no such process, another process under a
reused id, or one killed and not yet reaped); it never touches a live writer's, another host's,
or a folder without a marker.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

__all__ = ["Debris", "StagedFolder", "clear_debris", "find_debris", "writer_alive"]

_MARKER = ".writer.json"
_ID = re.compile(r"[0-9a-f]{16}")
_FOLDER_ID = re.compile(r"[0-9a-f]{16}|[a-z0-9_]{8}")


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (``None`` off Linux or for no such process)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (tells a reused pid from the writer)."""
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """Which process ids this process sees (containers on one host can share a disk, not their pids)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _this_writer() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "pidns": _pid_namespace(),
        "started": _start_time(pid),
    }


def writer_alive(writer: dict[str, Any]) -> bool | None:
    """Whether the process that wrote a marker still runs: ``False`` only when that is certain.

    ``None`` when it cannot be known (another host, a marker of another shape).
    """
    pid = writer.get("pid")
    if not isinstance(pid, int) or writer.get("host") != socket.gethostname():
        return None
    if writer.get("pidns") != _pid_namespace():
        return None  # its pid means another process here, or none: nothing can be told
    boot = _boot_id()
    if boot is not None and writer.get("boot") not in (None, boot):
        return False  # the machine rebooted since: every process of that boot is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    fields = _stat(pid)
    if fields is not None:
        if fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent: it writes nothing more
            return False
        started = writer.get("started")
        if started is not None and len(fields) > 19 and int(fields[19]) != started:
            return False  # the pid now belongs to another process
    return True


@attrs.frozen
class Debris:
    """A folder a save left beside its target: ``.NAME.<id>.tmp`` or ``.NAME.<id>.old``."""

    path: Path
    marker: Path | None
    writer: dict[str, Any] | None
    alive: bool | None  # False: its writer is provably gone; None: unknown (no marker, another host)

    @property
    def removable(self) -> bool:
        """Whether a save may delete it: the writer left a marker and is provably gone."""
        return self.marker is not None and self.alive is False

    def nbytes(self) -> int:
        """Bytes of the files under it."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file() and not p.is_symlink())


def _entries(target: Path) -> Iterator[tuple[str, str, Path]]:
    """``(id, kind, path)`` of every entry beside ``target`` named like a save's, kind being
    ``tmp``, ``old`` or ``writer``. Other names (another target's) never match."""
    prefix = f".{target.name}."
    try:
        names = os.listdir(target.parent)
    except FileNotFoundError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if rest.endswith(_MARKER):
            ident, kind = rest[: -len(_MARKER)], "writer"
        else:
            ident, _, kind = rest.rpartition(".")
        # quantcore's ids are 16 hex digits; older releases' tempfile names ([a-z0-9_]{8}) are
        # recognised as folders too (reported, never removed: they have no marker)
        pattern = _ID if kind == "writer" else _FOLDER_ID if kind in ("tmp", "old") else None
        if pattern is not None and pattern.fullmatch(ident):
            yield ident, kind, target.parent / name


def _read_marker(path: Path, target: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # cut short by the kill that made it debris, or not ours: nothing proven
    return data if isinstance(data, dict) and data.get("target") == target.name else None


def find_debris(target: str | os.PathLike[str]) -> list[Debris]:
    """Every folder killed saves to ``target`` left beside it, with what is known of its writer."""
    target = Path(target).absolute()
    folders: dict[str, list[Path]] = {}
    markers: dict[str, Path] = {}
    for ident, kind, path in _entries(target):
        if kind == "writer":
            markers[ident] = path
        elif path.is_dir() and not path.is_symlink():
            folders.setdefault(ident, []).append(path)
    found = []
    for ident, paths in sorted(folders.items()):
        marker = markers.get(ident)
        writer = _read_marker(marker, target) if marker is not None else None
        alive = writer_alive(writer) if writer is not None else None
        found += [Debris(p, marker if writer is not None else None, writer, alive) for p in sorted(paths)]
    return found


def clear_debris(target: str | os.PathLike[str]) -> list[Path]:
    """Remove what saves to ``target`` whose writer is provably gone left behind; returns the folders removed.

    A folder of a live writer, of another host, or without a readable marker is left alone.
    """
    target = Path(target).absolute()
    removed = []
    for debris in find_debris(target):
        if debris.removable:
            shutil.rmtree(debris.path, ignore_errors=True)
            if not debris.path.exists():
                removed.append(debris.path)
    # a marker goes last, once its writer is gone and none of its folders is left
    for ident, kind, path in _entries(target):
        if kind == "writer" and not any(_beside(target, ident, k).exists() for k in ("tmp", "old")):
            writer = _read_marker(path, target)
            if writer is not None and writer_alive(writer) is False:
                path.unlink(missing_ok=True)
    return removed


def _beside(target: Path, ident: str, kind: str) -> Path:
    return target.parent / f".{target.name}.{ident}.{kind}"


@attrs.define
class StagedFolder:
    """A folder written beside ``target`` and swapped into its place once complete.

    ``path`` exists (empty) once :meth:`create` returns; :meth:`commit` puts it in place of
    ``target``; :meth:`discard` removes it. The marker lives from before the folder is made to
    after it is gone, so a writer killed at any moment leaves provable debris.
    """

    target: Path
    ident: str = attrs.field(factory=lambda: secrets.token_hex(8))

    @property
    def path(self) -> Path:
        """The folder being written."""
        return _beside(self.target, self.ident, "tmp")

    @property
    def backup(self) -> Path:
        """Where the old ``target`` waits while it is swapped out (systems without an atomic exchange)."""
        return _beside(self.target, self.ident, "old")

    @property
    def marker(self) -> Path:
        """The writer's marker: who writes ``path``."""
        return self.target.parent / f".{self.target.name}.{self.ident}{_MARKER}"

    @classmethod
    def create(cls, target: Path) -> StagedFolder:
        """Leave the marker, then make the empty folder."""
        staged = cls(target)
        data = json.dumps({"target": target.name, **_this_writer()})
        fd = os.open(staged.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
        try:
            os.mkdir(staged.path)
        except BaseException:
            staged.marker.unlink(missing_ok=True)
            raise
        return staged

    def commit(self) -> None:
        """Put the folder in place of ``target``: a SIGKILL at any moment leaves ``target`` wholly
        old or wholly new where the system can exchange two names atomically (Linux)."""
        if not self.target.exists():
            os.rename(self.path, self.target)
        elif _exchange(self.path, self.target):
            pass  # the old checkpoint now sits at self.path: discarded below
        else:
            # Two renames: between them ``target`` is missing and the old folder is at ``backup``.
            os.replace(self.target, self.backup)
            try:
                os.replace(self.path, self.target)
            except BaseException:
                os.replace(self.backup, self.target)
                raise
        self.discard()

    def discard(self) -> None:
        """Remove what is left of the staging (the new folder, or the old one after a commit), then the marker."""
        for path in (self.path, self.backup):
            shutil.rmtree(path, ignore_errors=True)
        if not self.path.exists() and not self.backup.exists():
            self.marker.unlink(missing_ok=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    ``False`` where the system or its file system cannot; the caller then falls back to two renames.
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not on this kernel or file system
        return False
    raise OSError(errno, os.strerror(errno), str(a), None, str(b))


_LIBC: list[Any] = []


def _renameat2() -> Any:
    if not _LIBC:
        function = None
        try:
            libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
            function = getattr(libc, "renameat2", None)
        except OSError:
            pass
        if function is not None:
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
        _LIBC.append(function)
    return _LIBC[0]
