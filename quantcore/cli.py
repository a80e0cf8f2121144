"""The ``quantcore`` command: backends, validate, plan, quantize, inspect, eval and demo.

Every command prints a readable table, or JSON on stdout with ``--json``. An error is one line that
says what is wrong and what to do (``--debug`` shows the traceback); a config error lists every
problem. Exit status: 0 success, 1 failure, 2 usage error (bad flags, missing files).

``MODEL`` is always a local folder (``config.json`` + safetensors): the process runs with
``HF_HUB_OFFLINE=1`` unless the environment says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .presets import PRESETS, UnknownPresetError, resolve_method

__all__ = ["PRESETS", "main", "resolve_method"]


class UsageError(Exception):
    """The command line asks for something impossible (exit status 2)."""


# ---------------------------------------------------------------------- output helpers
def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text columns; numbers (and ``-``) right-aligned."""
    cells = [[str(c) for c in header], *([str(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = zip(r, widths, numeric, strict=False)
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in cells).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])


def _is_number(text: str) -> bool:
    text = text.rstrip("%x").removesuffix(" s").removesuffix(" MiB").removesuffix(" KiB").removesuffix(" GiB")
    try:
        float(text.lstrip("+"))
        return True
    except ValueError:
        return text in ("-", "")


def _bytes(n: float) -> str:
    from .report import format_bytes

    return format_bytes(n)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _quiet(args: argparse.Namespace) -> bool:
    """Whether the command prints no progress (--json or --quiet)."""
    return bool(args.json or getattr(args, "quiet", False))


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    """Progress lines on stderr (quiet with --json or --quiet)."""
    if _quiet(args):
        return lambda message: None
    return lambda message: print(f"... {message}", file=sys.stderr, flush=True)


def _peak_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---------------------------------------------------------------------- argument helpers
def _model_dir(path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise UsageError(
            f"{path} {what}; MODEL must be a local transformers checkpoint folder (config.json + *.safetensors)"
        )
    return folder


def _config(args: argparse.Namespace) -> Any:
    """The config from ``--config FILE`` or ``--method NAME`` (exactly one)."""
    from .auto import AutoQuantizationConfig

    if bool(args.config) == bool(args.method):
        raise UsageError(f"give exactly one of --config FILE or --method NAME (methods: {', '.join(PRESETS)})")
    if args.method:
        return resolve_method(args.method)
    if not Path(args.config).is_file():
        raise UsageError(f"config file {args.config} does not exist")
    return AutoQuantizationConfig.from_json_file(args.config)


def _transformers() -> Any:
    from .evaluate import _transformers

    transformers = _transformers()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def _meta_model(model_dir: Path, dtype: str) -> Any:
    """The checkpoint's architecture built on the meta device from its config.json: no weights read."""
    import torch

    from .evaluate import _dtype

    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    architecture = next((getattr(transformers, a, None) for a in (config.architectures or [])), None)
    with torch.device("meta"):
        if architecture is not None:
            return architecture._from_config(config, dtype=_dtype(dtype, config))
        return transformers.AutoModel.from_config(config, dtype=_dtype(dtype, config))


# ---------------------------------------------------------------------- commands
def cmd_backends(args: argparse.Namespace) -> int:
    """The registry: each quantization method, its plugin and version, usable here or why not."""
    from .registry import available_backends

    infos = available_backends()
    data = [{**i.to_dict(), "description": i.backend.description if i.backend else ""} for i in infos]
    rows = [
        (
            d["quant_method"],
            d["plugin"],
            d["version"] or "-",
            "yes" if d["usable"] else f"no: {d['reason']}",
            d["description"],
        )
        for d in data
    ]
    text = (
        table(("method", "plugin", "version", "usable", "description"), rows)
        if rows
        else ("no backends installed: pip install 'quantcore[bnb]' or 'quantcore[torch-backend]'")
    )
    _emit(args, data, text)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a config file; every problem at once."""
    from .auto import AutoQuantizationConfig
    from .errors import ConfigError

    if not Path(args.file).is_file():
        raise UsageError(f"config file {args.file} does not exist")
    try:
        config = AutoQuantizationConfig.from_json_file(args.file)
    except ConfigError as exc:
        problems = [{"field": f, "message": m} for f, m in exc.errors]
        lines = [f"{args.file}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"]
        lines += [f"  - {p['field']}: {p['message']}" if p["field"] else f"  - {p['message']}" for p in problems]
        _emit(args, {"file": args.file, "valid": False, "problems": problems}, "\n".join(lines))
        return 1
    data = {"file": args.file, "valid": True, "config_class": type(config).__name__, "config": config.to_dict()}
    _emit(args, data, f"{args.file}: valid {type(config).__name__}\n{config.to_json_string(use_diff=False)}".rstrip())
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The dry run on a meta-device skeleton of the model."""
    import quantcore

    model_dir = _model_dir(args.model)
    config = _config(args)
    model = _meta_model(model_dir, args.dtype)
    report = quantcore.quantize(model, config, skip_modules=args.skip or None, dry_run=True)
    data = {"model": str(model_dir), "config": config.to_dict(), "report": report.to_dict()}
    _emit(args, data, report.table(max_rows=None if args.all else 40))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize while loading (one tensor at a time), then save the quantized checkpoint."""
    import quantcore

    from .loading import get_report

    model_dir = _model_dir(args.model)
    config = _config(args)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UsageError(f"{out} exists and is not an empty folder; choose another --out or pass --overwrite")
    log = _log(args)
    _transformers()
    start = time.perf_counter()
    log(f"loading {model_dir} and quantizing it as it streams in")
    model = quantcore.from_pretrained(
        model_dir,
        quantization_config=config,
        dtype=args.dtype,
        skip_modules=args.skip or None,
        progress=False if _quiet(args) else None,
    )
    loaded = time.perf_counter() - start
    log(f"saving to {out}")
    quantcore.save_quantized(model, out)
    copied = _copy_side_files(model_dir, out)
    seconds = time.perf_counter() - start
    report = get_report(model)
    assert report is not None  # a load with a quantization config always has a report
    files_before, files_after = _weights_bytes(model_dir), _weights_bytes(out)
    peak = _peak_rss()
    data = {
        "model": str(model_dir),
        "out": str(out),
        "config": config.to_dict(),
        "copied": copied,
        "params": report.model_params,
        "counts": report.counts(),
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "files_bytes_before": files_before,
        "files_bytes_after": files_after,
        "bits_per_param_before": 8.0 * report.bytes_before / report.model_params,
        "bits_per_param": report.bits_per_param,
        "quantized_bits_per_param": report.quantized_bits_per_param,
        "seconds_load_and_quantize": loaded,
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "report": report.to_dict(),
    }
    counts = ", ".join(f"{n} {action}" for action, n in sorted(report.counts().items()))
    rows = [
        ("model in memory", _bytes(report.bytes_before), _bytes(report.bytes_after)),
        ("safetensors files", _bytes(files_before), _bytes(files_after)),
        ("bits per parameter", f"{data['bits_per_param_before']:.2f}", f"{report.bits_per_param:.2f}"),
    ]
    text = "\n".join(
        [
            f"saved {out}: {report.model_params / 1e6:.1f}M parameters, {counts} "
            f"({report.quantized_bits_per_param:.2f} bits per parameter in quantized modules)",
            table(("", "before", "after"), rows),
            f"time: {loaded:.1f} s to load and quantize, {seconds:.1f} s in all; peak memory (RSS) {_bytes(peak)}",
        ]
    )
    _emit(args, data, text)
    return 0


#: Files of a checkpoint folder that ``quantize`` leaves to ``save_quantized`` (the rest is copied).
_WEIGHT_FILES = ("config.json", "generation_config.json", "quantization_config.json", "model.safetensors.index.json")


def _copy_side_files(source: Path, out: Path) -> list[str]:
    """Copy the tokenizer and other small top-level files so that ``out`` is a complete checkpoint."""
    import shutil

    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in _WEIGHT_FILES and path.suffix not in (".safetensors", ".bin", ".pt"):
            shutil.copy2(path, out / path.name)
            copied.append(path.name)
    return copied


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def cmd_inspect(args: argparse.Namespace) -> int:
    """What a quantized checkpoint holds: configs, quantized modules and their sizes, files."""
    from .checkpoint import STATE_NAME, read_quantization_state
    from .shards import CheckpointFiles

    folder = Path(args.dir)
    debris = _debris(folder)
    if not folder.is_dir():
        raise UsageError(
            f"{folder} is not a folder; give the --out folder of 'quantcore quantize'"
            + (f" ({debris[0]})" if debris else "")
        )
    files = CheckpointFiles.open(folder)
    model = None
    if not (folder / STATE_NAME).is_file() and (folder / "config.json").is_file():
        model = _meta_model(folder, "auto")  # a transformers-saved checkpoint: infer the quantized modules
    found = read_quantization_state(folder, files, model)
    if found is None:
        raise UsageError(
            f"{folder} is not a quantized checkpoint (no {STATE_NAME}, no quantization_config in config.json, "
            "no config file an installed backend reads)"
        )
    state, tied = found
    modules: dict[str, dict[str, Any]] = {
        name: {"name": name, "source": source, "tensors": 0, "bytes": 0} for name, source in state.modules.items()
    }
    float_bytes = float_params = 0
    for key, entry in files.entries.items():
        owner = _owner(key, modules)
        if owner is None:
            float_bytes += entry.nbytes
            float_params += math.prod(entry.shape)
        else:
            modules[owner]["tensors"] += 1
            modules[owner]["bytes"] += entry.nbytes
    for record in modules.values():
        config = state.config_for(record["name"])
        record["method"] = _describe(config)
    total = sum(e.nbytes for e in files.entries.values())
    configs = {
        "config": state.config.to_dict() if state.config else None,
        **{p: (c.to_dict() if c else None) for p, c in state.overrides.items()},
    }
    data = {
        "dir": str(folder),
        "quant_methods": sorted({c["quant_method"] for c in configs.values() if c}),
        "configs": configs,
        "skip_modules": state.skip_modules,
        "tied_weights": tied,
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
        "tensors": len(files.entries),
        "tensor_bytes": total,
        "quantized_bytes": sum(m["bytes"] for m in modules.values()),
        "float_bytes": float_bytes,
        "float_params": float_params,
        "modules": list(modules.values()),
        "debris": debris,
    }
    rows = [(m["name"], m["method"], m["source"], m["tensors"], _bytes(m["bytes"])) for m in modules.values()]
    if not args.all and len(rows) > 40:
        rows = [*rows[:20], (f"... {len(rows) - 40} more ...", "", "", "", ""), *rows[-20:]]
    lines = [f"{folder}: quantcore checkpoint, method {', '.join(data['quant_methods']) or '-'}"]
    for source, saved in configs.items():
        if saved is not None:
            label = "config" if source == "config" else f"override {source!r}"
            lines.append(f"  {label}: {json.dumps(saved, default=str)}")
    lines += [
        f"  {len(modules)} quantized modules ({_bytes(data['quantized_bytes'])}), "
        f"{_bytes(float_bytes)} of float tensors ({float_params / 1e6:.2f}M parameters); "
        f"{len(files.entries)} tensors, {_bytes(total)} in all"
        + (f"; {len(tied)} tied names stored once" if tied else ""),
        *(f"  {line}" for line in debris),
        "",
        table(("module", "method", "config", "tensors", "size"), rows),
    ]
    _emit(args, data, "\n".join(lines))
    return 0


def _debris(folder: Path) -> list[str]:
    """One line per folder that killed saves to ``folder`` left beside it."""
    from .staging import find_debris

    lines = []
    for d in find_debris(folder):
        writer = d.writer or {}
        if d.removable:
            whose = f"its writer (pid {writer.get('pid')}) is gone; the next save to {folder.name} removes it"
        elif d.alive:
            whose = f"a save in progress (pid {writer.get('pid')})"
        elif d.writer is not None:
            whose = f"written on {writer.get('host')!r}: its writer cannot be checked from here; remove it by hand"
        else:
            whose = "no writer marker (an older quantcore, or not a save): remove it by hand if no save is running"
        lines.append(f"debris of a killed save: {d.path.name} ({_bytes(d.nbytes())}); {whose}")
    return lines


def _owner(key: str, names: dict[str, Any]) -> str | None:
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in names:
            return ".".join(parts[:i])
    return None


def _describe(config: Any) -> str:
    """The backend's label for a config (``"bitsandbytes nf4"``), or its method when it can't run here."""
    from .auto import AutoQuantizer

    try:
        return AutoQuantizer.from_config(config).describe()
    except Exception:
        return config.quant_method


def cmd_eval(args: argparse.Namespace) -> int:
    """Quality of quantized versions of MODEL against the float model, as a table."""
    from .evaluate import Evaluation

    model_dir = _model_dir(args.model)
    text = None
    if args.text:
        if not Path(args.text).is_file():
            raise UsageError(f"text file {args.text} does not exist")
        text = Path(args.text).read_text(encoding="utf-8")
    configs = _eval_configs(args)
    if not configs and not args.quantized:
        raise UsageError("give what to compare: --method NAME, --config FILE or --quantized DIR")
    _transformers()
    evaluation = Evaluation(
        model_dir,
        dtype=args.dtype,
        text=text,
        max_tokens=args.max_tokens,
        decode=args.decode,
        progress=False if _quiet(args) else None,
        log=_log(args),
    )
    rows = evaluation.compare(configs)
    if args.quantized:
        rows.append(_score_checkpoint(evaluation, Path(args.quantized)))
    _emit(
        args,
        {"model": str(model_dir), "kind": evaluation.kind, "rows": [r.to_dict() for r in rows]},
        quality_table(rows, evaluation.kind),
    )
    return 0


def _eval_configs(args: argparse.Namespace) -> dict[str, Any]:
    from .auto import AutoQuantizationConfig

    configs: dict[str, Any] = {name: resolve_method(name) for name in args.method or []}
    for path in args.config or []:
        if not Path(path).is_file():
            raise UsageError(f"config file {path} does not exist")
        configs[Path(path).stem] = AutoQuantizationConfig.from_json_file(path)
    return configs


def _score_checkpoint(evaluation: Any, folder: Path) -> Any:
    """Load a saved quantized checkpoint (no quantizing again) and score it like the others."""
    import quantcore

    from .loading import get_report

    if not (folder / "config.json").is_file():
        raise UsageError(
            f"--quantized {folder} is not a checkpoint folder; give the --out folder of 'quantcore quantize'"
        )
    start = time.perf_counter()
    model = quantcore.from_pretrained(folder, dtype=evaluation.dtype, progress=False)
    seconds = time.perf_counter() - start
    report = get_report(model)
    methods = sorted({m.method for m in report.quantized if m.method}) if report is not None else []
    # the tensors saved (quantization constants included; tied weights once), as for the other rows
    from .shards import CheckpointFiles

    nbytes = sum(e.nbytes for e in CheckpointFiles.open(folder).entries.values())
    return evaluation.score(
        f"{folder.name} (saved)", model, ", ".join(methods) or "checkpoint", nbytes=nbytes, seconds=seconds
    )


def quality_table(rows: Sequence[Any], kind: str) -> str:
    """The comparison as text: size, bits per parameter, time and the kind's metrics."""
    header: tuple[str, ...]
    metrics: list[tuple[str, ...]]
    if kind == "causal-lm":
        header = ("model", "method", "size", "bits/param", "linear bits", "time", "perplexity", "change")
        metrics = [
            (
                f"{r.metrics['perplexity']:.3f}",
                "-" if r.label == "float" else f"{100 * r.metrics['perplexity_change']:+.2f}%",
            )
            for r in rows
        ]
    else:
        header = (
            "model",
            "method",
            "size",
            "bits/param",
            "linear bits",
            "time",
            "cos mean",
            "cos min",
            "neighbours kept",
        )
        metrics = [
            (
                f"{r.metrics['cosine_mean']:.4f}",
                f"{r.metrics['cosine_min']:.4f}",
                f"{100 * r.metrics['neighbours_kept']:.0f}%" if "neighbours_kept" in r.metrics else "-",
            )
            for r in rows
        ]
    body = [
        (
            r.label,
            r.method,
            _bytes(r.bytes),
            f"{r.bits_per_param:.2f}",
            "-" if r.quantized_bits_per_param is None else f"{r.quantized_bits_per_param:.2f}",
            "-" if r.seconds is None else f"{r.seconds:.2f} s",
            *m,
        )
        for r, m in zip(rows, metrics, strict=False)
    ]
    return table(header, body)


def cmd_demo(args: argparse.Namespace) -> int:
    """Quantize the real all-MiniLM-L6-v2 encoder several ways and compare its embeddings."""
    from . import demo

    start = time.perf_counter()
    result = demo.run(methods=args.method or None, log=_log(args))
    seconds = time.perf_counter() - start
    data = {**result, "rows": [r.to_dict() for r in result["rows"]], "seconds": seconds}
    text = "\n".join(
        [
            f"{result['model_name']} ({result['params'] / 1e6:.1f}M parameters), "
            f"{len(result['sentences'])} sentences, mean-pooled embeddings vs float:",
            quality_table(result["rows"], "encoder"),
            f"done in {seconds:.1f} s",
        ]
    )
    _emit(args, data, text)
    return 0


# ---------------------------------------------------------------------- parser and main
class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the command's --help (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``quantcore`` command."""
    from . import __version__

    common = _Parser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print machine-readable JSON on stdout"
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
    )
    parser = _Parser(
        prog="quantcore",
        parents=[common],
        description="Quantize PyTorch / transformers models with any installed backend.",
    )
    parser.add_argument("--version", action="version", version=f"quantcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        return p

    def config_args(p: argparse.ArgumentParser, many: bool = False) -> None:
        action = "append" if many else "store"
        p.add_argument(
            "--config",
            action=action,
            metavar="FILE",
            help="quantization config JSON (or a transformers config.json with a quantization_config)",
        )
        p.add_argument(
            "--method",
            action=action,
            metavar="NAME",
            choices=list(PRESETS),
            help="a preset instead of --config: " + ", ".join(f"{k} ({v[1]})" for k, v in PRESETS.items()),
        )

    def dtype_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dtype",
            default="auto",
            help="float dtype of the unquantized weights: auto (the checkpoint's), float32, bfloat16, float16",
        )

    command("backends", cmd_backends, "list the quantization backends and whether they can run here")

    p = command("validate", cmd_validate, "check a quantization config file and list every problem")
    p.add_argument("file", metavar="CONFIG.json")

    p = command("plan", cmd_plan, "show what quantizing MODEL would do, without loading its weights")
    p.add_argument("model", metavar="MODEL", help="local transformers checkpoint folder")
    config_args(p)
    dtype_arg(p)
    p.add_argument("--skip", action="append", metavar="PATTERN", help="also keep these modules in float")
    p.add_argument("--all", action="store_true", help="list every module (default: at most 40 rows)")

    p = command("quantize", cmd_quantize, "quantize MODEL while loading it and save the quantized checkpoint")
    p.add_argument("model", metavar="MODEL", help="local transformers checkpoint folder")
    config_args(p)
    dtype_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the quantized checkpoint to")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it is not empty")
    p.add_argument("--skip", action="append", metavar="PATTERN", help="also keep these modules in float")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = command("inspect", cmd_inspect, "show what a quantized checkpoint holds")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--all", action="store_true", help="list every module (default: at most 40 rows)")

    p = command("eval", cmd_eval, "compare quantized versions of MODEL with the float model")
    p.add_argument("model", metavar="MODEL", help="local transformers checkpoint folder (the float model)")
    config_args(p, many=True)
    p.add_argument("--quantized", metavar="DIR", help="a checkpoint saved by 'quantcore quantize'")
    p.add_argument(
        "--text",
        metavar="FILE",
        help="text to score (causal LMs; default: Shakespeare) or sentences, one a line (encoders)",
    )
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens of the text to score (default 1024)")
    p.add_argument(
        "--decode",
        action="store_true",
        help="score causal LMs a token at a time through a static cache, the path generation takes "
        "(quantized layers may run other kernels there), instead of in one window",
    )
    dtype_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")

    from .demo import DEFAULT_METHODS

    p = command("demo", cmd_demo, "quantize the bundled all-MiniLM-L6-v2 encoder several ways and compare")
    p.add_argument(
        "--method",
        action="append",
        metavar="NAME",
        choices=list(PRESETS),
        help=f"methods to compare (default: {', '.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def _fail(args: argparse.Namespace | None, message: str, status: int, problems: list | None = None) -> int:
    if args is not None and getattr(args, "json", False):
        data: dict[str, Any] = {"error": message, "status": status}
        if problems is not None:
            data["problems"] = problems
        print(json.dumps(data, indent=2))
    print(f"quantcore: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.json = getattr(args, "json", False)
        if not debug:
            # bitsandbytes warns on CPU that an optional faster kernel is missing; it still works.
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        if not getattr(args, "command", None):
            parser.print_help()
            return 2
        return args.func(args)
    except BrokenPipeError:  # `quantcore inspect DIR | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if args is None and "--json" in argv:
            args = argparse.Namespace(json=True)
        if debug:
            import traceback

            traceback.print_exc()
        return _handle(args, exc)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)


def _handle(args: argparse.Namespace | None, exc: Exception) -> int:
    """One line (a config error: every problem) and the exit status for ``exc``."""
    from .errors import BackendUnavailableError, ConfigError, QuantcoreError

    if isinstance(exc, UsageError | UnknownPresetError):
        return _fail(args, str(exc), 2)
    if isinstance(exc, ConfigError):
        problems = [{"field": f, "message": m} for f, m in exc.errors]
        return _fail(args, str(exc), 1, problems)
    if isinstance(exc, BackendUnavailableError | QuantcoreError):
        return _fail(args, str(exc), 1)
    if isinstance(exc, ImportError) and exc.name:
        hint = {
            "transformers": "pip install 'quantcore[transformers]'",
            "bitsandbytes": "pip install 'quantcore[bnb]'",
        }.get(exc.name.split(".")[0], f"pip install {exc.name}")
        return _fail(args, f"{exc.name} is not installed: {hint}", 1)
    if isinstance(exc, OSError | ValueError):
        return _fail(args, f"{exc} (run with --debug for the traceback)", 1)
    return _fail(args, f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
