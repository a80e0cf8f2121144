#!/usr/bin/env python
"""Decode speed of quantized models against bf16, in one run: tokens/s, time to first token, peak memory.

Each method (``bf16`` or a quantcore CLI preset name from ``quantcore.cli.PRESETS``: ``int8-torch``,
``int4-torch``, ``int8``, ``nf4``, and any preset another backend adds) quantizes a copy of the
same bf16 model in memory with ``quantcore.quantize``. Generation is greedy, gpt-fast style: a
``--prompt``-token prompt (random token ids) is prefilled eagerly into a transformers
``StaticCache``, then ``--new`` tokens are decoded one step at a time. Modes:

- ``eager``: the decode step as it is;
- ``compiled``: the step under ``torch.compile(mode="reduce-overhead", fullgraph=True)``, which
  captures CUDA graphs. The cache's tensors are marked static first: transformers' static cache
  mutates its own tensors (``cumulative_length.add_``), and inductor skips CUDA graphs for
  mutated inputs unless they are static. The ``cudagraph_skips`` column must read 0 for the
  figure to mean what it says. A method whose layers cannot compile with ``fullgraph=True`` is
  compiled without it (``fullgraph`` column) and reported as such.

Reported per method, mode and batch: decode tokens/s (all sequences; the first token, from the
prefill, excluded), time to first token (the eager prefill), ``torch.cuda.max_memory_allocated``
during generation (model included), the bytes one decode step must read (every parameter and
buffer except the input embeddings, of which it reads a row per sequence) and the floor that
sets: those bytes over the measured copy bandwidth (a large device-to-device copy, bytes read +
written), as tokens/s for batch 1. On the CPU, also the 1-token forward without a cache (best of
``--forward-repeats``), the figure the CPU targets use.

Models: ``--model llama-1.1b`` (TinyLlama-1.1B's shape from a ``LlamaConfig``, random weights,
built on the device: no download), ``--model llama-7b`` (Llama-2-7B's shape, the same way: a step
that is mostly its linears, where the 1.1B step is half attention, norms and launches),
``--model smollm2`` (SmolLM2-135M, ``bench/prepare_models.py`` first), ``--model tiny`` (a small
random Llama, for smoke tests).

A method suffix ``@triton``, ``@interleaved`` or ``@tinygemm`` (``int4-torch@interleaved``) picks the
kernel torch_wo int4 runs on CUDA (``QUANTCORE_INT4_CUDA_KERNEL``, for the quantization and the
fusion; without one, the environment's, ``interleaved`` where unset), to compare them. A suffix ``+fused``
(``int8-torch+fused``, ``int4-torch@triton+fused``) also runs ``quantcore_torch.fuse_projections``
on the quantized model: q/k/v and gate/up as one kernel call each; ``+glu`` (``int8-torch+glu``,
``int4-torch@interleaved+glu``) does that and runs each MLP's activation in the fused gate/up
kernel's epilogue (``fuse_projections(activation=True)``), ``+glu-down`` inside the int8 down
projection's kernel instead (``activation="down"``); ``+rope`` (``int4-torch@interleaved+glu+rope``,
``int8-torch+glu+rope``) fuses too and runs each attention's rotary embedding and static-cache writes in the q/k/v
kernel's epilogue (``fuse_projections(rotary=True)``) and its attention as quantcore's decode
attention kernels; ``+rope-sdpa`` folds the same but leaves the attention to the class's SDPA
function; ``+norms`` (``int4-torch@interleaved+glu+rope+norms``, ``int8-torch+glu+rope+norms``)
also runs each decoder layer's RMS norms and residual adds in its projections' kernels
(``fuse_projections(norms=True)``), and
``+attn`` (``bf16+attn``) runs any model's SDPA attention at one token as those
kernels: the float baseline with the same attention. ``+autotune`` autotunes the interleaved
int4 kernels at every shape, where by default the shapes ``INT4_INTERLEAVED_PINNED`` names run
the config pinned for the card (``QUANTCORE_TRITON_PINNED=0``). ``+pdl`` launches torch_wo's
Triton kernels programmatically inside CUDA graphs (``QUANTCORE_TRITON_PDL``, Hopper and later;
``+pdl-early`` the same, each kernel letting the next launch right after its wait,
``QUANTCORE_TRITON_PDL_TRIGGER=early``; ``+pdl-auto`` with ``auto``, the early trigger and the
first tile dequantized before the wait for the int4 kernels whose tile is small enough, the late
trigger for the rest; ``+pre`` with any, the interleaved int4 kernels dequantizing their first
weight tile before the wait, ``QUANTCORE_TRITON_PDL_PRE=1``; without it, ``+pdl`` and
``+pdl-early`` run with ``QUANTCORE_TRITON_PDL_PRE`` unset, which under them means off),
``+inductor-pdl`` inductor's kernels
(``TORCHINDUCTOR_ENABLE_PDL``); suffixes combine (``int8-torch+fused+pdl+inductor-pdl``,
``bf16+inductor-pdl``). ``+pdl+inductor-pdl`` is what a user gets from
``TORCHINDUCTOR_ENABLE_PDL=1`` (ours follow inductor's setting); each alone isolates one side.
Without either, a method runs as the environment says (both off by default).
``+head`` quantizes the output head too (``quantize(..., default_skips=False)``; it stays in
bf16 by default, as in transformers). ``+graph`` (compiled, CUDA) captures the compiled step in
a ``torch.cuda.CUDAGraph`` of its own, inductor's CUDA graphs off, the graph feeding each step's
token and position to the next: a step is one replay, without dynamo's guards and cudagraph
trees' checks on the host, which can bound a short step (``bound_decode.py``'s cut steps take it).
``+pins=SPEC`` pins the interleaved int4 kernels' configs on the model's fused linears (q+k+v, o,
gate+up, down; ``+pins=8x2048x8s/8x2048x8s/-/-``: see :func:`pin_spec`), to compare configs in
a whole step. ``+group=N`` quantizes with groups of ``N`` columns (``int4-torch+group=64``).

Usage::

    python bench/bench_decode.py --device cpu --model smollm2 --modes eager --out bench/_results/decode_cpu.json
    python bench/bench_decode.py --device cuda --model llama-1.1b --out decode_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import torch

from quantcore.evaluate import mark_cache_static

LLAMA = {
    "llama-1.1b": _common.LLAMA_SHAPES["1.1b"],
    "llama-7b": _common.LLAMA_SHAPES["7b"],
    "tiny": _common.LLAMA_SHAPES["tiny"],
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(name: str, device: str, max_len: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "smollm2":
        model = AutoModelForCausalLM.from_pretrained(_common.smollm2_bf16_dir(), dtype=torch.bfloat16)
        return model.to(device).eval()
    config = LlamaConfig(**LLAMA[name], max_position_embeddings=max(2048, max_len), tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


SUFFIXES = ("fused", "glu", "glu-down", "rope", "rope-sdpa", "attn", "autotune", "pdl", "pdl-early", "pdl-auto")
SUFFIXES += ("inductor-pdl",)
SUFFIXES += ("head", "pre", "graph", "norms")
# The programmatic-launch suffixes and the trigger each sets (QUANTCORE_TRITON_PDL_TRIGGER).
TRIGGERS = {"pdl": "late", "pdl-early": "early", "pdl-auto": "auto"}
# The suffixes that fold the rotary embedding into the q/k/v kernel.
ROTARY = {"rope", "rope-sdpa"}
# The suffixes that fuse projections, and where each runs the MLP's activation (fuse_projections' activation).
FUSING = {"fused": False, "glu": True, "glu-down": "down"}


def split_method(method: str) -> tuple[str, set[str]]:
    """``method`` as its preset (with its ``@kernel``) and its ``+`` suffixes (``pins=SPEC`` and
    ``group=N`` among them as they are: see :func:`pinned_from`, :func:`preset_config`)."""
    spec, *suffixes = method.split("+")
    unknown = {s for s in suffixes if not s.startswith(("pins=", "group="))} - set(SUFFIXES)
    if unknown:
        raise ValueError(f"{method}: unknown suffix {sorted(unknown)} (known: {', '.join(SUFFIXES)})")
    return spec, set(suffixes)


def pinned_from(method: str, model: str) -> dict | None:
    """The configs ``method``'s ``+pins=SPEC`` suffix pins the interleaved int4 kernels to on
    ``model``'s fused linears (:func:`pin_spec`; ``-`` keeps a shape's), or ``None`` without one."""
    specs = [s.removeprefix("pins=") for s in split_method(method)[1] if s.startswith("pins=")]
    if not specs:
        return None
    if len(specs) > 1 or model not in LLAMA:
        raise ValueError(f"{method}: +pins= once, on a Llama shape ({', '.join(LLAMA)}), got {model}")
    return pin_spec(specs[0], llama_linears(model, fused=True)[1])


@contextlib.contextmanager
def launch_options(method: str, model: str | None = None):
    """The launch settings of ``method``'s suffixes while it runs: ``+pdl``, programmatic dependent
    launches of quantcore_torch's one-row kernels in CUDA graphs (``QUANTCORE_TRITON_PDL``);
    ``+inductor-pdl``, of inductor's kernels (``TORCHINDUCTOR_ENABLE_PDL``); ``+pins=SPEC``, the
    interleaved int4 kernels' configs on ``model``'s shapes (:func:`pinned_from`)."""
    _, suffixes = split_method(method)
    pins = pinned_from(method, model)
    with contextlib.ExitStack() as stack:
        if pins is not None:
            _triton_for(f"{method}: +pins=")
            stack.enter_context(pinned_configs(pins))
        if "attn" in suffixes:
            stack.enter_context(_decode_attention_for_sdpa())
        if "autotune" in suffixes:
            stack.enter_context(_autotuned())
        triggers = suffixes & set(TRIGGERS)
        if len(triggers) > 1:
            raise ValueError(f"{method}: one trigger at most, got {' and '.join(sorted(triggers))}")
        if "pre" in suffixes and not triggers:
            names = " or ".join(f"+{t}" for t in TRIGGERS)
            raise ValueError(f"{method}: +pre dequantizes before a programmatic launch's wait: add {names}")
        if triggers:
            stack.enter_context(_programmatic(method, TRIGGERS[triggers.pop()], "pre" in suffixes))
        if "inductor-pdl" in suffixes:
            import torch._inductor.config

            stack.enter_context(torch._inductor.config.patch({"triton.enable_pdl": True}))
        yield


def _triton_for(what: str):
    """quantcore_torch's Triton kernels module, which ``what`` needs; a ValueError without it."""
    try:
        from quantcore_torch import _triton
    except ImportError as exc:
        raise ValueError(f"{what} needs Triton and CUDA ({exc})") from exc
    return _triton


@contextlib.contextmanager
def _programmatic(method: str, trigger: str, pre: bool = False):
    """torch_wo's kernels launched programmatically in CUDA graphs, with ``trigger`` (``pre``: the
    interleaved int4 kernels dequantize their first tile before the wait); the variants earlier
    methods built (perhaps with the other trigger) are dropped on the way in and out."""
    _triton = _triton_for(f"{method}: +pdl")
    _triton.forget_pdl_variants()
    try:
        with (
            _patched(_triton, "PDL", True),
            _patched(_triton, "PDL_TRIGGER", trigger),
            _patched(_triton, "PDL_PRE", True if pre else None),
        ):
            yield
    finally:
        _triton.forget_pdl_variants()


@contextlib.contextmanager
def _autotuned():
    """The interleaved int4 kernels autotuned for every shape, the pinned configs set aside
    (``QUANTCORE_TRITON_PINNED=0``); the tuning kept by earlier methods is dropped on the way in
    and out, so that each side tunes for itself."""
    _triton = _triton_for("+autotune")

    def forget():
        for launcher in (_triton._INT4_INTERLEAVED, _triton._INT4_INTERLEAVED_ROPE):
            launcher.compiled.clear()
            launcher.kernel.cache.clear()

    forget()
    try:
        with _patched(_triton, "PINNED", False):
            yield
    finally:
        forget()


@contextlib.contextmanager
def _decode_attention_for_sdpa():
    """transformers' SDPA attention run as quantcore's decode attention kernels at one token
    (``quantcore_torch.kernels.decode_attention``, what the ``+rope`` fold runs), for any model:
    ``bf16+attn`` is the float baseline with the same attention."""
    from quantcore_torch import kernels
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    sdpa = mapping["sdpa"]

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if query.shape[0] == 1 and query.shape[2] == 1 and not dropout and scaling is not None:
            out = kernels.decode_attention(query, key, value, attention_mask, scaling)
            if out is not None:
                return out, None
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    mapping["sdpa"] = attention
    try:
        yield
    finally:
        mapping["sdpa"] = sdpa


@contextlib.contextmanager
def _patched(owner, name: str, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def make_variant(base, method: str):
    """A copy of ``base`` quantized with the preset ``method`` (``bf16``: the copy as it is)."""
    spec, suffixes = split_method(method)
    if spec == "bf16":
        if suffixes & {*FUSING, *ROTARY, "head", "norms"} or any(s.startswith("group=") for s in suffixes):
            raise ValueError(f"{method}: bf16 has no quantized projections to fuse, output head to quantize or groups")
        return copy.deepcopy(base)
    import quantcore

    kernel = spec.partition("@")[2]
    model = copy.deepcopy(base)
    # The kernel choice holds through the fusion too: a fused stack builds its own layout.
    chosen = contextlib.nullcontext()
    if kernel:
        from quantcore_torch import kernels

        if kernel not in kernels.INT4_CUDA_KERNELS:
            raise ValueError(f"{method}: @{kernel} is not an int4 CUDA kernel ({', '.join(kernels.INT4_CUDA_KERNELS)})")
        chosen = _patched(kernels, "INT4_CUDA_KERNEL", kernel)
    with chosen:
        quantcore.quantize(model, preset_config(method), progress=False, default_skips="head" not in suffixes)
        fusing = sorted(suffixes & FUSING.keys())
        if len(fusing) > 1:
            raise ValueError(f"{method}: one of {', '.join('+' + f for f in FUSING)}, not {fusing}")
        rotary = bool(suffixes & ROTARY)
        norms = "norms" in suffixes
        if norms and not (rotary and fusing == ["glu"]):
            raise ValueError(f"{method}: +norms folds a layer's norms with +glu and +rope")
        if fusing or rotary:
            from quantcore_torch.fusion import fuse_projections

            activation = FUSING[fusing[0]] if fusing else False
            report = fuse_projections(model, activation=activation, rotary=rotary, norms=norms)
            if not report.fused:
                raise ValueError(f"{method}: no projections were fused ({report})")
            if activation and not report.activations:
                raise ValueError(f"{method}: no MLP runs its activation in a kernel ({report})")
            if rotary and not report.rotary:
                raise ValueError(f"{method}: no attention rotates q and k in its kernel ({report})")
            if norms and not report.norms:
                raise ValueError(f"{method}: no decoder layer runs its norms in the kernels ({report})")
            if "rope-sdpa" in suffixes:  # the class's attention function after the kernel
                for module in model.modules():
                    if hasattr(module, "_quantcore_rotary"):
                        module._quantcore_rotary = module._quantcore_rotary._replace(own_attention=False)
    return model


def preset_config(method: str):
    """The config of ``method``'s preset, with the group size its ``+group=N`` suffix sets
    (``int4-torch+group=64``: SmolLM2's 576 columns are whole groups of 64, not of 128)."""
    from quantcore.cli import resolve_method

    spec, suffixes = split_method(method)
    config = resolve_method(spec.partition("@")[0])
    groups = [s.removeprefix("group=") for s in suffixes if s.startswith("group=")]
    if not groups:
        return config
    if len(groups) > 1 or not groups[0].isdigit() or "group_size" not in config.to_dict():
        raise ValueError(f"{method}: +group=N once, on a preset with a group size")
    return type(config).from_dict({**config.to_dict(), "group_size": int(groups[0])})


def llama_linears(model: str, fused: bool = False) -> tuple[int, list[tuple[int, int]]]:
    """A Llama shape's layer count and its linears' ``[out, in]``, in the order a layer calls them
    (q, k, v, o, gate, up, down), from the shapes this benchmark builds its models with.
    ``fused``: as ``quantcore_torch.fuse_projections`` runs them (q+k+v, o, gate+up, down)."""
    shape = LLAMA[model]
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    if fused:
        return shape["num_hidden_layers"], [(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)]
    return shape["num_hidden_layers"], [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


# The int4 group a pinned config's BLOCK_K must hold whole (the benchmarks quantize in groups of 128).
PIN_GROUP = 128


def pin_spec(spec: str, shapes: list[tuple[int, int]]) -> dict:
    """Pinned configs of the interleaved int4 kernels, as ``bench_gemv.py``'s stack methods take
    them after ``@`` and this benchmark's methods after ``+pins=``: one a shape, in the order of
    ``shapes`` (:func:`llama_linears`, fused), separated by ``/``,
    each ``BLOCK_NxBLOCK_KxWARPS`` with an optional ``x1`` (prefetch) or a trailing ``s`` (the
    rows in each thread's registers: ``SPREAD``), ``-`` for the pinned one
    (``2x2048x2/-/8x1024x4x1/8x2048x8s``)."""
    parts = spec.split("/")
    if len(parts) != len(shapes):
        raise ValueError(f"configs {spec!r}: {len(shapes)} configs expected (one a shape: {shapes}), got {len(parts)}")
    configs = {}
    for shape, part in zip(shapes, parts, strict=True):
        if part == "-":
            continue
        spread = part.endswith("s")
        try:
            block_n, block_k, warps, *prefetch = (int(v) for v in part.removesuffix("s").split("x"))
        except ValueError:
            raise ValueError(
                f"configs {spec!r}: {part!r} is not BLOCK_NxBLOCK_KxWARPS[x1] or BLOCK_NxBLOCK_KxWARPSs"
            ) from None
        if len(prefetch) > 1 or block_k % PIN_GROUP or block_n & (block_n - 1) or block_k & (block_k - 1):
            raise ValueError(
                f"configs {spec!r}: {part!r}: powers of two, BLOCK_K a multiple of {PIN_GROUP}, at most 4 fields"
            )
        if spread and prefetch and prefetch[0]:
            raise ValueError(f"configs {spec!r}: {part!r}: a spread config does not prefetch")
        configs[shape] = (block_n, block_k, warps, bool(prefetch and prefetch[0])) + ((True,) if spread else ())
    return configs


@contextlib.contextmanager
def pinned_configs(configs: dict):
    """The interleaved kernels pinned, on this card, to ``configs`` (``(n, k)``: ``(BLOCK_N,
    BLOCK_K, num_warps, PREFETCH[, SPREAD])``). The compiled kernels and the pins are restored on
    the way out."""
    from quantcore_torch import _triton

    name = torch.cuda.get_device_name()
    card = next((c for c in _triton.INT4_INTERLEAVED_PINNED if c in name), name)  # a card without pins: one for now
    pins = _triton.INT4_INTERLEAVED_PINNED.setdefault(card, {})
    saved = dict(pins)

    def forget():
        for launcher in (_triton._INT4_INTERLEAVED, _triton._INT4_INTERLEAVED_ROPE):
            launcher.compiled.clear()
            launcher.kernel.cache.clear()

    forget()
    pins.update(configs)
    try:
        yield
    finally:
        pins.clear()
        pins.update(saved)
        if not saved:
            del _triton.INT4_INTERLEAVED_PINNED[card]
        forget()


def step_bytes(model) -> int:
    """Bytes of parameters and buffers one decode step reads (input embeddings excluded)."""
    from quantcore.quantizer import module_nbytes

    embed = model.get_input_embeddings()
    return module_nbytes(model) - module_nbytes(embed)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large copy on ``device``, counting bytes read and written."""
    n = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / min(times[2:])


class Decoder:
    """Greedy generation with one static cache, reused (reset) across runs so graphs stay valid."""

    def __init__(self, model, batch: int, prompt: int, new: int, device: str, compiled: bool):
        from transformers import StaticCache

        self.model, self.device, self.new, self.prompt = model, device, new, prompt
        self.cache = StaticCache(config=model.config, max_cache_len=prompt + new)
        g = torch.Generator().manual_seed(1)
        vocab = model.config.vocab_size
        self.ids = torch.randint(0, vocab, (batch, prompt), generator=g).to(device)
        self.fullgraph = True
        self.step = self._step
        self.compiled = compiled
        self.compile_mode = "reduce-overhead" if device == "cuda" else None
        self.marked = False
        # graph_step: the compiled step captured once in a torch.cuda.CUDAGraph of its own (inductor
        # without its CUDA graphs), which also feeds its token and position to the next step: a
        # step is one replay, with none of dynamo's guards or cudagraph trees' checks on the host.
        self.graph_step = False
        self.graph = None

    def _step(self, token, position):
        out = self.model(
            input_ids=token,
            past_key_values=self.cache,
            cache_position=position,
            position_ids=position.unsqueeze(0).expand(token.shape[0], -1),
            use_cache=True,
        )
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def run(self):
        """``(tokens [batch, new], prefill seconds, decode seconds)``."""
        if self.compiled and self.graph_step:
            return self._run_graph()
        self.cache.reset()
        sync(self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            token = self._prefill()
            sync(self.device)
            t1 = time.perf_counter()
            if self.compiled and not self.marked:
                mark_cache_static(self.cache)
                self.step = self._compile()
                self.marked = True
            out = [token]
            position = torch.tensor([self.prompt], device=self.device)
            for _ in range(self.new - 1):
                token = self.step(token, position).clone()
                position = position + 1
                out.append(token)
            sync(self.device)
            t2 = time.perf_counter()
        return torch.cat(out, dim=1), t1 - t0, t2 - t1

    def _graph_body(self, step) -> None:
        """One decode step on the static token and position, its token kept and fed to the next."""
        token = step(self.static_token, self.static_position)
        self.tokens.index_copy_(1, self.static_position - (self.prompt - 1), token)
        self.static_token.copy_(token)
        self.static_position.add_(1)

    def _prefill(self) -> torch.Tensor:
        with torch.no_grad():
            return self._step(self.ids, torch.arange(self.prompt, device=self.device))

    def _capture(self) -> None:
        """Compile the step (no CUDA graphs of inductor's), warm it up on a side stream, capture it."""
        if self.device != "cuda":
            raise ValueError("+graph captures the step in a CUDA graph: CUDA only")
        self.cache.reset()
        token = self._prefill()  # the cache's tensors exist before the capture
        self.static_token = token.clone()
        self.static_position = torch.tensor([self.prompt], device=self.device)
        self.tokens = torch.zeros(token.shape[0], self.new, dtype=token.dtype, device=self.device)
        self.compile_mode = None
        step = self._compile()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(3):  # compiles, keeps the kernels and their programmatic variants
                self._graph_body(step)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._graph_body(step)

    def _run_graph(self):
        """:meth:`run` with each decode step one replay of the captured graph."""
        if self.graph is None:
            self._capture()
        self.cache.reset()
        sync(self.device)
        t0 = time.perf_counter()
        token = self._prefill()
        sync(self.device)
        t1 = time.perf_counter()
        self.tokens[:, :1].copy_(token)
        self.static_token.copy_(token)
        self.static_position.fill_(self.prompt)
        for _ in range(self.new - 1):
            self.graph.replay()
        sync(self.device)
        t2 = time.perf_counter()
        return self.tokens.clone(), t1 - t0, t2 - t1

    def _compile(self):
        mode = self.compile_mode
        compiled = torch.compile(self._step, mode=mode, fullgraph=True)
        probe = torch.tensor([self.prompt], device=self.device)
        token = torch.zeros((self.ids.shape[0], 1), dtype=torch.long, device=self.device)
        try:
            compiled(token, probe)
        except Exception as exc:  # a layer that breaks the graph: compile what can be, and say so
            print(f"    fullgraph=True failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", flush=True)
            torch._dynamo.reset()
            self.fullgraph = False
            compiled = torch.compile(self._step, mode=mode)
        return compiled


def forward_ms(model, device: str, repeats: int) -> float:
    """Best 1-token forward (no cache) in ms: the CPU targets' measure."""
    token = torch.tensor([[1]], device=device)
    times = []
    with torch.no_grad():
        model(token, use_cache=False)
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            model(token, use_cache=False)
            sync(device)
            times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def forward_only(base, methods: list[str], args) -> list[dict]:
    """1-token forwards (no cache) of every method, interleaved round by round; best of ``--forward-repeats``.

    Interleaving keeps a shared machine's changing load from favouring the methods timed first.
    """
    models = {m: make_variant(base, m) for m in methods}
    best = dict.fromkeys(methods, float("inf"))
    token = torch.tensor([[1]], device=args.device)
    with torch.no_grad():
        for model in models.values():
            model(token, use_cache=False)
        for _ in range(args.forward_repeats):
            for method, model in models.items():
                sync(args.device)
                t = time.perf_counter()
                model(token, use_cache=False)
                sync(args.device)
                best[method] = min(best[method], 1e3 * (time.perf_counter() - t))
    for method in methods:
        ratio = best[method] / best[methods[0]]
        print(f"  {method:<20} 1-token forward {best[method]:.2f} ms  {ratio:.2f}x {methods[0]}")
    return [dict(method=m, forward_1tok_ms=best[m], ratio=best[m] / best[methods[0]]) for m in methods]


def _row(method: str, mode: str, batch: int, runs: list, args, warm: float, peak_mib, step_bytes: int) -> dict:
    """One figure from ``runs`` (``Decoder.run`` results): medians of prefill and decode times."""
    prefill = statistics.median(r[1] for r in runs)
    decode = statistics.median(r[2] for r in runs)
    return dict(
        method=method,
        mode=mode,
        batch=batch,
        tokens_per_s=batch * (args.new - 1) / decode,
        ms_per_step=1e3 * decode / (args.new - 1),
        ttft_ms=1e3 * prefill,
        warmup_s=warm,
        peak_mib=peak_mib,
        step_mib=step_bytes / 2**20,
        repeatable=all(torch.equal(r[0], runs[0][0]) for r in runs),
    )


def measure_eager_interleaved(base, methods: list[str], args, bandwidth: float, rows: list[dict]) -> None:
    """Eager decode of every method in rounds (bf16, int8, int4, bf16, int8, int4, ...), medians per method.

    An eager step is bound by the host (Python and launches), whose speed drifts with its load
    over a run: methods timed one after another differed by more than their kernels do (int4
    eager came out at 0.94x, 1.44x and 1.60x bf16 in three runs of the same code). Rounds expose
    every method to the same drift. All variants stay in memory at once, so no peak memory is given.
    """
    models, quantize_s = {}, {}
    for method in methods:
        t = time.perf_counter()
        models[method] = make_variant(base, method)
        quantize_s[method] = time.perf_counter() - t
    for batch in args.batch:
        decoders = {m: Decoder(models[m], batch, args.prompt, args.new, args.device, compiled=False) for m in methods}
        warm = {}
        for method, dec in decoders.items():
            t = time.perf_counter()
            dec.run()
            warm[method] = time.perf_counter() - t
        runs: dict[str, list] = {m: [] for m in methods}
        for _ in range(args.repeats):
            for method, dec in decoders.items():
                runs[method].append(dec.run())
        for method in methods:
            nbytes = step_bytes(models[method])
            row = _row(method, "eager", batch, runs[method], args, warm=warm[method], peak_mib=None, step_bytes=nbytes)
            row.update(floor_tokens_per_s=bandwidth / nbytes, quantize_s=quantize_s[method], interleaved=True)
            rows.append(row)
            print(_line(row), flush=True)


def measure(base, method: str, args, bandwidth: float, rows: list[dict]) -> None:
    """Append a row per mode and batch to ``rows`` as each is measured (a timeout keeps the earlier ones)."""
    t = time.perf_counter()
    model = make_variant(base, method)
    quantize_s = time.perf_counter() - t
    nbytes = step_bytes(model)
    extra = {}
    if args.device == "cpu":
        extra["forward_1tok_ms"] = forward_ms(model, args.device, args.forward_repeats)
    for mode in args.modes:
        for batch in args.batch:
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            skips0 = _cudagraph_skips()
            dec = Decoder(model, batch, args.prompt, args.new, args.device, compiled=mode == "compiled")
            dec.graph_step = "graph" in split_method(method)[1]
            t = time.perf_counter()
            tokens, _, _ = dec.run()  # warm-up: compiles, records the graphs
            warm = time.perf_counter() - t
            counters = zeroed_fold_counters(model)
            runs = [dec.run() for _ in range(args.repeats)]
            peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
            row = _row(method, mode, batch, runs, args, warm=warm, peak_mib=peak, step_bytes=nbytes)
            row.update(
                floor_tokens_per_s=bandwidth / nbytes,
                fullgraph=dec.fullgraph if mode == "compiled" else None,
                cudagraph_skips=_cudagraph_skips() - skips0 if mode == "compiled" else None,
                quantize_s=quantize_s,
                folded=folded(counters),
                tokens_head=tokens[0, :8].tolist(),
                **extra,
            )
            rows.append(row)
            print(_line(row), flush=True)
            del dec
            torch._dynamo.reset()
    del model


def zeroed_fold_counters(model) -> list[torch.Tensor]:
    """The ``out`` counters of ``fuse_projections(norms=True)``'s stacks (none without ``+norms``),
    set to zero: the residual kernels leave them non-zero, so :func:`folded` after a run tells
    whether the fold ran."""
    found = (getattr(m, "_quantcore_sum_out", None) for m in model.modules())
    counters = [c for c in found if isinstance(c, torch.Tensor)]
    for counter in counters:
        counter.zero_()
    return counters


def folded(counters: list[torch.Tensor]) -> bool | None:
    """Whether every counter of :func:`zeroed_fold_counters` moved since (``None``: no fold)."""
    return all(bool(c.item()) for c in counters) if counters else None


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise ``TimeoutError`` in this (the main) thread after ``seconds``; 0 means no limit."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"the method took more than {seconds} s (--method-timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def _line(r: dict) -> str:
    fwd = f" fwd1={r['forward_1tok_ms']:.1f}ms" if "forward_1tok_ms" in r else ""
    peak = f" peak={r['peak_mib']:.0f}MiB" if r["peak_mib"] is not None else ""
    extra = f" fullgraph={r['fullgraph']} skips={r['cudagraph_skips']}" if r["mode"] == "compiled" else ""
    extra += f" folded={r['folded']}" if r.get("folded") is not None else ""
    return (
        f"  {r['method']:<20} {r['mode']:<8} b={r['batch']:<3} {r['tokens_per_s']:9.1f} tok/s "
        f"({r['ms_per_step']:.3f} ms/step) ttft={r['ttft_ms']:.1f}ms{peak} step={r['step_mib']:.0f}MiB "
        f"floor={r['floor_tokens_per_s']:.0f}tok/s{fwd}{extra} warm={r['warmup_s']:.1f}s"
    )


def summary(rows: list[dict]) -> str:
    base = {(r["mode"], r["batch"]): r for r in rows if r["method"] == "bf16"}
    lines = [
        "| method | mode | batch | tokens/s | x bf16 | % of floor | TTFT ms | peak MiB |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        b = base.get((r["mode"], r["batch"]))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"
        floor = 100 * r["tokens_per_s"] / (r["floor_tokens_per_s"] * r["batch"]) if r["batch"] == 1 else None
        peak = f"{r['peak_mib']:,.0f}" if r["peak_mib"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['batch']} | {r['tokens_per_s']:,.1f} | {ratio} | "
            f"{'-' if floor is None else f'{floor:.0f}%'} | {r['ttft_ms']:,.1f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("llama-1.1b", "llama-7b", "smollm2", "tiny"), default=None)
    parser.add_argument("--methods", default="bf16,int8-torch,int4-torch,int8,nf4")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per figure (median)")
    parser.add_argument("--forward-repeats", type=int, default=10, help="1-token forwards (CPU; best of)")
    parser.add_argument(
        "--forward-only", action="store_true", help="only 1-token forwards, all methods interleaved (the CPU targets)"
    )
    parser.add_argument(
        "--method-timeout",
        type=_common.int_at_least(0),
        default=0,
        help="seconds one method may take (0: no limit); it is then skipped",
    )
    parser.add_argument(
        "--interleave-eager",
        action="store_true",
        help="time eager decoding in rounds over all methods (robust to the host's drifting load)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.model = args.model or ("llama-1.1b" if args.device == "cuda" else "smollm2")
    args.modes = args.modes.split(",")
    args.batch = [int(b) for b in args.batch.split(",")]
    if args.interleave_eager and "eager" not in args.modes:
        parser.error("--interleave-eager times the eager mode: add eager to --modes")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    for method in args.methods.split(","):
        try:
            split_method(method)
            pinned_from(method, args.model)
        except ValueError as exc:
            parser.error(f"--methods: {exc}")

    bandwidth = copy_bandwidth(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"{device_name}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; torch {torch.__version__}", flush=True)
    base = build_model(args.model, args.device, args.prompt + args.new)
    import transformers

    meta = dict(
        device=device_name,
        torch=torch.__version__,
        transformers=transformers.__version__,
        bandwidth_bytes_per_s=bandwidth,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )
    if args.forward_only:
        rows = forward_only(base, args.methods.split(","), args)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        return 0
    rows: list[dict] = []

    def save() -> None:  # after each part, so a run cut short keeps what it measured
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))

    if args.interleave_eager:
        args.modes = [m for m in args.modes if m != "eager"]
        try:
            measure_eager_interleaved(base, args.methods.split(","), args, bandwidth, rows)
        except Exception as exc:  # the compiled figures that follow must not be lost with it
            print(f"  eager, interleaved: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            rows.append(dict(method="(all)", mode="eager", error=f"{type(exc).__name__}: {exc}"))
        gc.collect()
        save()
    for method in args.methods.split(",") if args.modes else []:
        try:
            with _time_limit(args.method_timeout), launch_options(method, args.model):
                measure(base, method, args, bandwidth, rows)
        except Exception as exc:  # one method failing must not lose the others' figures
            print(f"  {method}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            rows.append(dict(method=method, error=f"{type(exc).__name__}: {exc}"))
            torch._dynamo.reset()
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        save()
    print(summary([r for r in rows if "error" not in r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
