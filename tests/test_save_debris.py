"""A save killed with SIGKILL: the target stays wholly old or wholly new, and the next save clears the debris.

A real save runs in a subprocess and is stopped at a chosen point (the script wraps one function
to announce the point and wait there), then killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import quantcore
from quantcore.staging import find_debris

from .conftest import TinyLM

pytest.importorskip("quantcore_torch", reason="the quantcore-torch backend is not installed")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.arange(20).reshape(2, 10) % 64
OLD = {"quant_method": "torch_wo", "bits": 4, "group_size": 32}
NEW = {"quant_method": "torch_wo", "bits": 8}

# Runs a real save of the NEW model to TARGET and stops where STAGE says, after touching READY.
SAVER = textwrap.dedent(
    """
    import sys, time, torch, quantcore, quantcore.shards, quantcore.staging
    from pathlib import Path
    from tests.conftest import TinyLM

    target, stage, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def stop_here():
        ready.touch()
        time.sleep(600)

    if stage == "writing":  # one shard of two written, the folder half done
        real = quantcore.shards.save_file
        def save_file(tensors, file, *args, **kwargs):
            real(tensors, file, *args, **kwargs)
            stop_here()
        quantcore.shards.save_file = save_file
    else:  # "swapped": the new folder is in place, the old one not yet removed
        real_discard = quantcore.staging.StagedFolder.discard
        def discard(self):
            stop_here()
        quantcore.staging.StagedFolder.discard = discard
    torch.manual_seed(0)
    model = TinyLM()
    quantcore.quantize(model, {"quant_method": "torch_wo", "bits": 8})
    quantcore.save_quantized(model, target, max_shard_size="10KB")
    """
)


def quantized(config: dict) -> TinyLM:
    torch.manual_seed(0)
    model = TinyLM()
    quantcore.quantize(model, config)
    return model


def outputs(path: Path) -> torch.Tensor:
    with quantcore.empty_weights():
        skeleton = TinyLM()
    with torch.no_grad():
        return quantcore.load_quantized(path, skeleton)(IDS)


def kill_a_save(target: Path, stage: str) -> None:
    ready = target.parent / f"ready-{stage}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target), stage, str(ready)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, f"the save ended (status {proc.returncode}) before reaching {stage!r}"
            assert time.monotonic() < deadline, f"the save never reached {stage!r}"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ready.unlink()


def beside(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


@pytest.mark.parametrize(("stage", "expected"), [("writing", "old"), ("swapped", "new")])
def test_killed_save_leaves_a_whole_checkpoint_and_the_next_save_clears_its_debris(tmp_path, capsys, stage, expected):
    target = tmp_path / "ckpt"
    quantcore.save_quantized(quantized(OLD), target)
    with torch.no_grad():  # the same kernels as outputs() (a grad-enabled forward takes the reference path)
        new = quantized(NEW)(IDS)
    old = outputs(target)
    assert not torch.equal(old, new)

    kill_a_save(target, stage)
    assert torch.equal(outputs(target), old if expected == "old" else new)  # wholly one or the other
    debris = find_debris(target)
    # .tmp: the new folder, or the old one swapped out by an atomic exchange; .old: by two renames
    assert len(debris) == 1 and debris[0].path.suffix in (".tmp", ".old") and debris[0].removable
    assert debris[0].nbytes() > 10_000  # as large as a checkpoint: worth removing
    assert len(beside(target)) == 2  # the folder and its writer's marker

    from quantcore.cli import main

    assert main(["inspect", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"debris of a killed save: {debris[0].path.name}" in out and "the next save to ckpt removes it" in out

    quantcore.save_quantized(quantized(NEW), target)
    assert beside(target) == [] and find_debris(target) == []
    assert torch.equal(outputs(target), new)


def _leftover(target: Path, ident: str, writer: dict | None) -> Path:
    folder = target.parent / f".{target.name}.{ident}.tmp"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    if writer is not None:
        marker = target.parent / f".{target.name}.{ident}.writer.json"
        marker.write_text(json.dumps({"target": target.name, **writer}))
    return folder


def test_only_provably_dead_writers_debris_is_removed(tmp_path):
    from quantcore.staging import _this_writer

    target = tmp_path / "ckpt"
    me = _this_writer()
    assert me["pid"] == os.getpid() and me["host"] == socket.gethostname()
    live = _leftover(target, "a" * 16, me)  # a save in progress (this process)
    elsewhere = _leftover(target, "b" * 16, {**me, "host": "another-host"})  # cannot be checked
    unmarked = _leftover(target, "c" * 16, None)  # no proof it is a save's
    reused = _leftover(target, "d" * 16, {**me, "started": (me["started"] or 0) + 1})  # our pid, another process
    container = _leftover(target, "f" * 16, {**me, "pid": 2**22 + 7, "pidns": "pid:[1]"})  # pids of another namespace
    legacy = target.parent / ".ckpt.k3_x9q0z.tmp"  # an older quantcore's tempfile name, no marker
    legacy.mkdir()
    other = tmp_path / ".ckpt2.eeeeeeeeeeeeeeee.tmp"  # another target's
    other.mkdir()
    quantcore.save_quantized(quantized(NEW), target)
    assert live.exists() and elsewhere.exists() and unmarked.exists() and other.exists() and container.exists()
    if me["started"] is not None:  # Linux: a reused pid is told apart by its start time
        assert not reused.exists() and not reused.with_name(f".ckpt.{'d' * 16}.writer.json").exists()
    states = {d.path.name: (d.removable, d.alive) for d in find_debris(target)}
    assert states[live.name] == (False, True)
    assert states[elsewhere.name] == (False, None) and states[unmarked.name] == (False, None)
    assert states[legacy.name] == (False, None) and legacy.exists() and other.name not in states
