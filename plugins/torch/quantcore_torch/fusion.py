"""Sibling projections that read the same input, run as one kernel call (q/k/v, gate/up).

A decode step of a small model is a long chain of short kernels: at batch 1, TinyLlama's k and v
projections read 256 KiB of int4 weight each, far less than what a kernel launch costs. Fusing the
projections of a block that read the same activation (``q_proj``/``k_proj``/``v_proj`` of an
attention, ``gate_proj``/``up_proj`` of a gated MLP) into one weight of their stacked outputs
turns Llama's seven linear calls per layer into four, in eager mode and under ``torch.compile``
alike. :func:`fuse_projections` does that to a model quantized by ``torch_wo`` without touching
its definition, its state dict or its checkpoints:

- The members' tensors (``qweight``, ``scale``, ``zero``, ``bias``) are concatenated once along the
  output dimension, and each member's own tensors become views into that storage: no byte is
  added (an int4 layer's kernel layout is built once, for the stack, instead of once per member).
  State dicts still hold one entry per member, with the same names and shapes.
- Each member's forward runs the stacked kernel and returns its slice of the output. In eager
  mode the first sibling called with an input computes every member's output, and the others
  take theirs from it when they get the same input object, not modified since. (Under
  ``inference_mode`` tensors have no version counter, so an input changed in place between two
  siblings' calls would go unnoticed; no transformers model does that.) ``torch.compile`` traces
  the same sharing, so its graph holds one call per group: inductor does not merge identical
  calls by itself.
- The stack follows the members: rebuilt whenever one of them is moved, converted, loaded or
  re-quantized (a merged LoRA adapter), or found stale in an eager forward. Members that stop
  matching (moved to different devices) run on their own until they match again.

It pays where a step is bound by launches: CUDA decoding at small batch. On the CPU nothing is,
and torch's int8 CPU kernel measured slower on the stacked weights than on the separate ones
(``docs/benchmarks.md``): fuse CUDA models.

Where gradients flow into the input (adapters trained before a member) members run on their own,
through the recomputing-weight path. Members called with different inputs (cross-attention's q
against its k/v) stay correct: each call computes the stack for its input and keeps its slice.
:func:`unfuse_projections` undoes it all, giving every member its own storage again.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from . import kernels
from .modules import WeightOnlyLinear
from .rms import rms_input, sumsq_counter

__all__ = [
    "ACTIVATION_PLACES",
    "DEFAULT_GROUPS",
    "GATED_MLPS",
    "NORM_LAYERS",
    "RMS_NORMS",
    "ROTARY_ATTENTIONS",
    "FusedProjections",
    "FusionReport",
    "fuse_projections",
    "unfuse_projections",
]

#: Names of sibling modules that read the same input, in the model families transformers ships.
DEFAULT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, Phi-3 before fusing, OPT, ...
    ("gate_proj", "up_proj"),  # gated MLPs: Llama, Mistral, Qwen, Gemma
    ("query", "key", "value"),  # BERT and its descendants (MiniLM, RoBERTa, ...)
    ("w1", "w3"),  # Mixtral's experts, gpt-fast's FeedForward
)

_STORAGE = ("qweight", "scale", "zero")

#: transformers' gated MLPs whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``:
#: with ``activation`` and a SiLU ``act_fn``, the activation can run in a projection's kernel.
GATED_MLPS: tuple[str, ...] = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")

#: transformers' attentions whose forward is Llama's (q/k/v projections, ``apply_rotary_pos_emb``,
#: the cache's update, the attention function, ``o_proj``): with ``rotary=True`` the rotation and
#: a static cache's writes of a decode step can run in the q/k/v kernel's epilogue.
ROTARY_ATTENTIONS: tuple[str, ...] = ("LlamaAttention", "MistralAttention", "Qwen2Attention")

# What each of them passes its attention function beyond Llama's arguments, as its forward does.
_ATTENTION_EXTRAS = {
    "MistralAttention": lambda attention: {"sliding_window": getattr(attention.config, "sliding_window", None)},
    "Qwen2Attention": lambda attention: {"sliding_window": attention.sliding_window},
}

#: Where ``fuse_projections(activation=...)`` runs a gated MLP's activation: the fused gate/up
#: kernel's epilogue (``"gate_up"``, what ``True`` means) or the int8 down projection's input
#: (``"down"``).
ACTIVATION_PLACES: tuple[str, ...] = ("gate_up", "down")


@dataclass
class FusionReport:
    """What :func:`fuse_projections` did: ``fused`` groups (``"block: a+b+c"``), ``skipped`` ones with the reason."""

    fused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    #: Gated MLPs whose activation runs inside a projection's kernel (``activation``).
    activations: list[str] = field(default_factory=list)
    #: Where it runs: ``"gate_up"`` or ``"down"`` (:data:`ACTIVATION_PLACES`), ``None`` without ``activation``.
    activation_place: str | None = None
    #: Attentions whose q/k/v kernel applies the rotary embedding and writes the cache (``rotary``).
    rotary: list[str] = field(default_factory=list)
    #: Decoder layers whose RMS norms and residual adds run in their projections' kernels (``norms``).
    norms: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} group(s) of projections, skipped {len(self.skipped)}"]
        if self.activations:
            where = "the gate/up kernel" if self.activation_place == "gate_up" else "the down projection"
            lines.append(f"  {len(self.activations)} gated MLP(s) run their activation in {where}")
        if self.rotary:
            lines.append(f"  {len(self.rotary)} attention(s) rotate q and k and write the cache in the q/k/v kernel")
        if self.norms:
            lines.append(f"  {len(self.norms)} decoder layer(s) run their norms and residual adds in the kernels")
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def mismatch(members: Sequence[nn.Module]) -> str | None:
    """Why ``members`` cannot share one stacked weight, or ``None`` if they can."""
    for m in members:
        if not isinstance(m, WeightOnlyLinear):
            return f"{type(m).__name__} is not a torch_wo layer (kept in float or quantized by another backend)"
        if m.qweight.is_meta:
            return "its weights are on the meta device (load them first)"
    first = members[0]
    for attr in ("in_features", "bits", "group_size", "compute_dtype", "weight_dtype"):
        values = {getattr(m, attr) for m in members}
        if len(values) > 1:
            return f"the members differ in {attr} ({', '.join(sorted(map(str, values)))})"
    devices = {m.qweight.device for m in members} | {m.scale.device for m in members}
    if len(devices) > 1:
        return f"the members are on different devices ({', '.join(sorted(map(str, devices)))})"
    if len({m.bias is None for m in members}) > 1:
        return "some members have a bias and some do not"
    if first.bias is not None and len({(m.bias.dtype, m.bias.device) for m in members}) > 1:
        return "the members' biases differ in dtype or device"
    return None


class FusedProjections:
    """One stacked weight that several :class:`WeightOnlyLinear` siblings read as views.

    Not a module: it owns no state of its own in the model's state dict. Each member points at it
    (``member._fused == (group, index)``); the group holds ``linear``, a :class:`WeightOnlyLinear`
    outside the module tree whose buffers are the stacked tensors.
    """

    def __init__(self, name: str, names: Sequence[str], members: Sequence[WeightOnlyLinear]):
        self.name = name
        self.names = tuple(names)
        self.members = tuple(members)
        bounds, start = [], 0
        for m in members:
            bounds.append((start, start + m.out_features))
            start += m.out_features
        self.bounds = tuple(bounds)
        self.linear: WeightOnlyLinear | None = None
        self._views: tuple[tuple[torch.Tensor | None, ...], ...] = ()
        self._cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._served = 0
        for index, m in enumerate(members):
            m._fused = (self, index)

    def __repr__(self) -> str:
        state = "active" if self.linear is not None else "inactive"
        return f"FusedProjections({self.name}, {state})"

    # ------------------------------------------------------------------ life cycle
    def is_current(self) -> bool:
        """Whether every member still reads the views of the current stack."""
        if self.linear is None:
            return False
        for m, views in zip(self.members, self._views, strict=True):
            for have, view in zip(_member_tensors(m), views, strict=True):
                if have is not view:
                    return False
        return True

    def refresh(self) -> None:
        """Stack the members' current tensors again (when they no longer are the views), and the kernel layout.

        Called when a member was moved, loaded or re-quantized. While the members do not match
        (one moved before the others), the group stays inactive and each member runs alone.
        """
        self._cache = None
        if mismatch(self.members) is not None:
            self.linear = None
            self._views = ()
            return
        if self.is_current():
            # Written in place (load_state_dict without assign): the stack holds the new values,
            # but the kernel layout derived from it does not.
            self.linear.refresh_kernel_layout()
            return
        self.linear, self._views = _stack_members(self.members, self.bounds)

    def release(self) -> None:
        """Give every member its own storage again and detach them from the group."""
        for m in self.members:
            with torch.no_grad():
                for name in _storage_names(m):
                    setattr(m, name, getattr(m, name).clone())
                if m.bias is not None:
                    m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
            m._fused = None
            m.refresh_kernel_layout()
        self.linear, self._views, self._cache = None, (), None

    # ------------------------------------------------------------------ forward
    def stacked(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole stack's output for ``x`` (the members' outputs side by side, in their order),
        or ``None`` if the group is inactive. Nothing is cached: for a caller that wants it all."""
        linear = self._active()
        return None if linear is None else linear(x)

    def gated(self, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` for ``x`` from a gated MLP's (gate, up) group (see
        :meth:`WeightOnlyLinear.gate_up_forward`), or ``None`` if the group is inactive."""
        linear = self._active()
        return None if linear is None else linear.gate_up_forward(x)

    def rotary(self, x, cos, sin, keys, values, position, q_features: int, sq=None, eps=0.0) -> torch.Tensor | None:
        """q rotated for one decode token ``x`` from an attention's (q, k, v) group, k rotated and v
        written into a static cache (see :meth:`WeightOnlyLinear.qkv_rope_forward`; ``sq``, ``eps``:
        the norm before, folded in), or ``None`` (the group inactive, or an input the kernel does
        not take), having written nothing."""
        linear = self._active()
        if linear is None:
            return None
        return linear.qkv_rope_forward(x, cos, sin, keys, values, position, q_features, sq, eps)

    def layer(self) -> WeightOnlyLinear | None:
        """The stack's :class:`WeightOnlyLinear` (stacked again first where stale), or ``None`` if
        the group is inactive."""
        return self._active()

    def _active(self) -> WeightOnlyLinear | None:
        """The stack's layer, stacked again first where stale (eager code; a compiled graph guards
        on the stack it was traced with), or ``None`` if the group is inactive."""
        if not torch.compiler.is_compiling() and not self.is_current():
            self.refresh()
        return self.linear

    def forward(self, x: torch.Tensor, index: int) -> torch.Tensor | None:
        """Member ``index``'s output for ``x`` (a slice of the stack's), or ``None`` if the group is inactive."""
        start, stop = self.bounds[index]
        if torch.compiler.is_compiling():
            # Traced: the graph guards on the stack it was traced with (no staleness check), and
            # the sharing below happens at trace time (dynamo follows the attribute writes), so
            # the graph calls the kernel once per group and leaves nothing cached behind.
            if self.linear is None:
                return None
            cache = self._cache
            if cache is not None and cache[0] is x:
                y = cache[2]
            else:
                y = self.linear(x)
                self._cache, self._served = (x, 0, y), 0
        elif (cache := self._cache) is not None and cache[0] is x and cache[1] == _version(x):
            y = cache[2]
        else:
            if not self.is_current():
                self.refresh()
                if self.linear is None:
                    return None
            y = self.linear(x)
            self._cache, self._served = (x, _version(x), y), 0
        self._served += 1
        if self._served >= len(self.members):
            # Every member has had its slice: keep no activation alive until the next step.
            self._cache = None
        return y[..., start:stop]


def _member_tensors(m: WeightOnlyLinear) -> tuple[torch.Tensor | None, ...]:
    """``m``'s quantized weight tensors and bias, the ones a stack's views replace."""
    # From the dicts, not getattr (about a microsecond a name): this runs once a step per group.
    buffers = m._buffers
    return buffers.get("qweight"), buffers.get("scale"), buffers.get("zero"), m._parameters.get("bias")


def _stack_members(
    members: Sequence[WeightOnlyLinear], bounds: Sequence[tuple[int, int]]
) -> tuple[WeightOnlyLinear, tuple[tuple[torch.Tensor | None, ...], ...]]:
    """One :class:`WeightOnlyLinear` whose buffers are the members' tensors stacked (rows
    ``bounds[i]`` member ``i``'s), each member rebound to views of them, its kernel layout
    dropped; and the views each member reads (:func:`_member_tensors`'s order)."""
    first = members[0]
    linear = WeightOnlyLinear(
        first.in_features,
        sum(m.out_features for m in members),
        bits=first.bits,
        group_size=first.group_size,
        bias=first.bias is not None,
        dtype=first.weight_dtype,
        device="meta",
        compute_dtype=first.compute_dtype,
    )
    names = _storage_names(first)
    with torch.no_grad():
        for name in names:
            setattr(linear, name, torch.cat([getattr(m, name) for m in members]))
        if first.bias is not None:
            linear.bias = nn.Parameter(torch.cat([m.bias.detach() for m in members]), requires_grad=False)
    views = []
    for m, (start, stop) in zip(members, bounds, strict=True):
        for name in names:
            setattr(m, name, getattr(linear, name)[start:stop])
        if m.bias is not None:
            # Still trainable if it was (then the member runs alone while gradients are on).
            m.bias = nn.Parameter(linear.bias[start:stop], requires_grad=m.bias.requires_grad)
        m.kernel_layout, m._layout_of = None, ()
        views.append(_member_tensors(m))
    # Built last: members' refresh hooks must not see a half-made stack.
    linear.refresh_kernel_layout()
    if linear.qweight.is_cuda:
        # CUDA graphs copy plain tensor inputs at every replay; these are the weights, never changed in a graph.
        for t in (*(getattr(linear, n) for n in names), linear.bias):
            if t is not None:
                torch._dynamo.mark_static_address(t)
    return linear, tuple(views)


def _storage_names(m: WeightOnlyLinear) -> tuple[str, ...]:
    """The quantized weight's buffers ``m`` has: ``qweight``, ``scale``, and ``zero`` for int4."""
    return tuple(name for name in _STORAGE if name in m._buffers)


def _version(x: torch.Tensor) -> int:
    # Tensors made under torch.inference_mode() have no version counter (and cannot be changed
    # in place outside of it).
    return -1 if x.is_inference() else x._version


def _groups_of(
    model: nn.Module, groups: Iterable[Sequence[str]]
) -> Iterable[tuple[str, nn.Module, Sequence[str], list[nn.Module]]]:
    for parent_name, parent in model.named_modules():
        children = parent._modules
        for names in groups:
            if all(children.get(n) is not None for n in names):
                yield parent_name, parent, names, [children[n] for n in names]


class _GatedMLP(NamedTuple):
    """What a gated MLP's patched forward runs: its projections as fused, their group, and where
    the activation runs (:data:`ACTIVATION_PLACES`)."""

    gate: WeightOnlyLinear
    up: WeightOnlyLinear
    down: nn.Module
    group: FusedProjections
    place: str


def _gated_mismatch(mlp: nn.Module, gated_mlps: Sequence[str], place: str) -> str | None:
    """Why ``mlp``'s activation cannot run in a kernel at ``place``, or ``None`` if it can."""
    if type(mlp).__name__ not in gated_mlps:
        return f"{type(mlp).__name__} is not a known gated MLP (GATED_MLPS)"
    act = getattr(mlp, "act_fn", None)
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
        return f"its activation is {type(act).__name__}, not SiLU"
    gate, up, down = (mlp._modules.get(name) for name in ("gate_proj", "up_proj", "down_proj"))
    fused = getattr(gate, "_fused", None)
    if fused is None or fused[0].members != (gate, up) or fused[0].linear is None:
        return "gate_proj and up_proj do not run as one fused group, gate first"
    if gate.out_features != up.out_features:
        return f"gate_proj and up_proj differ in outputs ({gate.out_features}, {up.out_features})"
    if place == "gate_up":
        if gate.bits == 4 and kernels.INT4_CUDA_KERNEL != "interleaved":
            return (
                "the int4 gate/up kernel takes the activation on the interleaved layout only "
                f"(QUANTCORE_INT4_CUDA_KERNEL=interleaved; it is {kernels.INT4_CUDA_KERNEL})"
            )
        return None
    if not isinstance(down, WeightOnlyLinear):
        return f"down_proj is {type(down).__name__}, not a torch_wo layer"
    if down.bits != 8:
        return "down_proj is int4: only the int8 kernel takes the activation in"
    if not (gate.out_features == up.out_features == down.in_features):
        return "gate_proj and up_proj's outputs are not down_proj's inputs"
    return None


def _plain(module: nn.Module) -> bool:
    """No hooks on ``module`` and its own forward (not accelerate's, say): running its kernel
    directly skips nothing."""
    return not (module._forward_hooks or module._forward_pre_hooks) and "forward" not in module.__dict__


def _gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gated MLP's forward with its activation in a kernel: the fused gate/up kernel's epilogue
    (``silu(gate) * up`` from ``group.gated``, then ``down_proj`` as it is) or the int8 down
    projection's input (the fused gate/up output whole to ``down_proj.gated_forward``). Anything
    it cannot vouch for (gradients into ``x``, a projection replaced or hooked since, an inactive
    group) runs the class's forward."""
    parts: _GatedMLP = self._quantcore_gated
    mods = self._modules
    if (
        not (torch.is_grad_enabled() and x.requires_grad)
        and mods["gate_proj"] is parts.gate
        and mods["up_proj"] is parts.up
        and _plain(parts.gate)
        and _plain(parts.up)
    ):
        if parts.place == "gate_up":
            a = parts.group.gated(x)
            if a is not None:
                return mods["down_proj"](a)
        elif mods["down_proj"] is parts.down and _plain(parts.down):
            h = parts.group.stacked(x)
            if h is not None:
                return parts.down.gated_forward(h)
    return type(self).forward(self, x)


def _is_gated(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _gated_mlp_forward


def _fuse_activations(model: nn.Module, gated_mlps: Sequence[str], place: str, report: FusionReport) -> None:
    report.activation_place = place
    for name, mlp, _names, (gate, up, down) in _groups_of(model, [("gate_proj", "up_proj", "down_proj")]):
        label = f"{name or '<model>'}: {'gate_proj+up_proj+silu' if place == 'gate_up' else 'silu+down_proj'}"
        if _is_gated(mlp):
            report.skipped[label] = "already fused"
            continue
        reason = _gated_mismatch(mlp, gated_mlps, place)
        if reason is not None:
            report.skipped[label] = reason
            continue
        mlp._quantcore_gated = _GatedMLP(gate, up, down, gate._fused[0], place)
        mlp.forward = types.MethodType(_gated_mlp_forward, mlp)
        report.activations.append(name or "<model>")


class _RotaryAttention(NamedTuple):
    """What a rotary attention's patched forward runs: its projections as fused, and their group."""

    q: WeightOnlyLinear
    k: WeightOnlyLinear
    v: WeightOnlyLinear
    group: FusedProjections
    #: Keyword arguments the class's forward takes by name, which it does not hand its attention function.
    named: frozenset[str]
    #: Whether SDPA attention runs as quantcore's decode attention kernels (see :func:`_decode_attention`).
    own_attention: bool = True


def _named_arguments(attention: nn.Module) -> frozenset[str]:
    """The keyword arguments ``attention``'s class forward names (the cache's, ``cache_position`` in
    transformers 4.x): the rest of its ``**kwargs`` go on to the attention function."""
    parameters = inspect.signature(type(attention).forward).parameters
    own = {name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return frozenset(own - {"self", "hidden_states", "position_embeddings", "attention_mask"}) | {
        "cache",
        "past_key_values",
        "past_key_value",
    }


def _rotary_mismatch(attention: nn.Module) -> str | None:
    """Why ``attention``'s rotation and cache writes cannot run in its q/k/v kernel, or ``None`` if they can."""
    if type(attention).__name__ not in ROTARY_ATTENTIONS:
        return f"{type(attention).__name__} is not a known rotary attention (ROTARY_ATTENTIONS)"
    q, k, v = (attention._modules.get(name) for name in ("q_proj", "k_proj", "v_proj"))
    fused = getattr(q, "_fused", None)
    if fused is None or fused[0].members != (q, k, v) or fused[0].linear is None:
        return "q_proj, k_proj and v_proj do not run as one fused group, in that order"
    if q.bits == 4 and kernels.INT4_CUDA_KERNEL != "interleaved":
        return (
            "the int4 q/k/v rotary kernel runs on the interleaved layout only "
            f"(QUANTCORE_INT4_CUDA_KERNEL=interleaved; it is {kernels.INT4_CUDA_KERNEL})"
        )
    head = getattr(attention, "head_dim", 0)
    if not head or head % 16 or q.out_features % head or k.out_features != v.out_features or k.out_features % head:
        return f"head_dim {head} (a multiple of 16) does not divide q's ({q.out_features}) and k/v's outputs"
    return None


def _static_layer(cache, index: int):
    """The static cache layer ``index`` of ``cache`` (transformers' ``StaticLayer``, made), or ``None``."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, (list, tuple)) or not 0 <= index < len(layers):
        return None
    layer = layers[index]
    if type(layer).__name__ != "StaticLayer" or not getattr(layer, "is_initialized", True):
        return None
    if not (
        isinstance(getattr(layer, "keys", None), torch.Tensor)
        and isinstance(getattr(layer, "values", None), torch.Tensor)
    ):
        return None
    return layer


def _attention_function(attention: nn.Module):
    """The attention function ``attention``'s own forward calls (its model's module's names)."""
    module = sys.modules[type(attention).__module__]
    eager = module.eager_attention_forward
    implementation = attention.config._attn_implementation
    if implementation == "eager":
        return eager
    functions = module.ALL_ATTENTION_FUNCTIONS
    get = getattr(functions, "get_interface", None)  # transformers 5; 4.x indexes the mapping
    return get(implementation, eager) if get is not None else functions[implementation]


def _rotary_attention_forward(
    self: nn.Module, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, *args, **kwargs
):
    """A Llama-family attention's forward at one decode token with a static cache: the q/k/v kernel
    rotates q and k and writes k and v into the cache (:meth:`FusedProjections.rotary`), then the
    cache advances, the attention and ``o_proj`` run as the class runs them. Anything else (the
    prefill, batches, other caches, gradients, a projection replaced or hooked since, inputs the
    kernel does not take) runs the class's forward."""
    done = _rotary_attention(self, hidden_states, position_embeddings, attention_mask, args, kwargs)
    if done is None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    out, weights = done
    return self.o_proj(out), weights


def _rotary_attention(
    self: nn.Module, hidden_states, position_embeddings, attention_mask, args: tuple, kwargs: dict, sq=None, eps=0.0
):  # fmt: skip
    """:func:`_rotary_attention_forward` up to ``o_proj``: ``(out, weights)``, ``out`` the
    attention's heads side by side (``o_proj``'s input), or ``None`` where the q/k/v kernel does
    not run, having written nothing. ``sq``, ``eps``: ``hidden_states`` is the norm's weight
    times the layer's input, the norm folded into the q/k/v kernel (:func:`_folded_layer_forward`)."""
    parts: _RotaryAttention = self._quantcore_rotary
    mods = self._modules
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layer = _static_layer(cache, self.layer_idx) if position_embeddings is not None and not args else None
    q = None
    if (
        layer is not None
        and mods["q_proj"] is parts.q
        and mods["k_proj"] is parts.k
        and mods["v_proj"] is parts.v
        and _plain(parts.q)
        and _plain(parts.k)
        and _plain(parts.v)
    ):
        # transformers 5's static layer counts its tokens and writes there; 4.x writes at cache_position.
        counter = getattr(layer, "cumulative_length", None)
        position = counter if isinstance(counter, torch.Tensor) else kwargs.get("cache_position")
        if isinstance(position, torch.Tensor):
            cos, sin = position_embeddings
            q = parts.group.rotary(
                hidden_states, cos, sin, layer.keys, layer.values, position, parts.q.out_features, sq, eps
            )
    if q is None:
        return None
    rest = {name: value for name, value in kwargs.items() if name not in parts.named}
    extras = _ATTENTION_EXTRAS.get(type(self).__name__)
    if extras is not None:
        rest.update(extras(self))
    counter = counter if isinstance(counter, torch.Tensor) else None
    out, weights = _decode_attention(
        self, q, layer.keys, layer.values, attention_mask, rest, parts.own_attention, counter
    )
    return out.reshape(*hidden_states.shape[:-1], -1).contiguous(), weights


def _decode_attention(attention: nn.Module, q, keys, values, mask, rest: dict, own: bool, counter=None):
    """The attention of one token's q (``[1, 1, heads * head_dim]``, rotated) on the static
    cache's keys and values: ``(out [1, 1, heads, head_dim], weights)``; and ``counter`` (the
    static layer's token count, transformers 5), read by the q/k/v kernel, advanced by one.

    Where the class would run transformers' SDPA attention (no weights asked for, no dropout, soft
    cap or sliding window) and ``own``, it runs as :func:`kernels.decode_attention`: the same
    function in two kernels that read the cache where it is, instead of the compiled SDPA path's
    ``repeat_kv`` copies (grouped-query attention), cuDNN's kernel and its reduction; the second
    kernel advances the counter, a launch fewer than the counter's own add. Anything the kernels
    do not take runs the class's attention function, and the counter's add."""
    if (
        own
        and attention.config._attn_implementation == "sdpa"
        and not attention.training
        and not (rest.get("output_attentions") or rest.get("softcap") is not None or rest.get("sliding_window"))
    ):
        out = kernels.decode_attention(q, keys, values, mask, attention.scaling, counter)
        if out is not None:
            return out, None
    if counter is not None:
        counter.add_(1)
    query = q.view(1, 1, -1, attention.head_dim).transpose(1, 2)
    return _attention_function(attention)(
        attention,
        query,
        keys,
        values,
        mask,
        dropout=0.0 if not attention.training else attention.attention_dropout,
        scaling=attention.scaling,
        **rest,
    )


def _is_rotary(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _rotary_attention_forward


def _fuse_rotary(model: nn.Module, report: FusionReport) -> None:
    for name, attention, _names, (q, k, v) in _groups_of(model, [("q_proj", "k_proj", "v_proj")]):
        label = f"{name or '<model>'}: q_proj+k_proj+v_proj+rotary+cache"
        if _is_rotary(attention):
            report.skipped[label] = "already fused"
            continue
        reason = _rotary_mismatch(attention)
        if reason is not None:
            report.skipped[label] = reason
            continue
        attention._quantcore_rotary = _RotaryAttention(q, k, v, q._fused[0], _named_arguments(attention))
        attention.forward = types.MethodType(_rotary_attention_forward, attention)
        report.rotary.append(name or "<model>")


#: transformers' decoder layers whose forward is Llama's (input RMS norm, attention, residual add,
#: post-attention RMS norm, MLP, residual add): with ``norms=True`` the norms and the adds of a
#: decode step run in the projections' kernels.
NORM_LAYERS: tuple[str, ...] = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")

#: RMS norms of Llama's formula (``weight * (h * rsqrt(mean(h**2) + eps))``, no offset on the weight).
RMS_NORMS: tuple[str, ...] = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")

# The counters' buffers, on a stack's first folded layer.
_SUMS = ("_quantcore_sum_mid", "_quantcore_sum_out")


class _FoldChain:
    """What the folded layers of one stack hand each other within a step: the last layer's output
    ``h``, ``g * h`` for the ``next`` layer's norm (``xn``), and whether a layer stopped between
    its kernels (``dirty``: the counters are zeroed before the next use). The two sums of squares
    live on ``owner`` as buffers (moved with the model): ``mid`` (a block's ``o_proj`` to its
    gate/up) and ``out`` (``down_proj`` to the next layer's q/k/v). Each is cleared by the kernel
    two after the one that reads it (``o_proj`` clears ``out``, ``down_proj`` clears ``mid``), so
    a step leaves ``mid`` zero and ``out`` cleared before its next add, eager and in CUDA graphs."""

    def __init__(self, owner: nn.Module):
        self.owner = owner
        self.h: torch.Tensor | None = None
        self.xn: torch.Tensor | None = None
        self.next: nn.Module | None = None
        self.dirty = False

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self.owner._buffers
        return buffers[_SUMS[0]], buffers[_SUMS[1]]

    def hand_on(self, h=None, xn=None, next_layer=None) -> None:
        self.h, self.xn, self.next = h, xn, next_layer


class _FoldedLayer(NamedTuple):
    """What a decoder layer's folded forward runs (:func:`_folded_layer_forward`)."""

    attention: nn.Module
    mlp: nn.Module
    input_norm: nn.Module
    post_norm: nn.Module
    #: The next folded layer of the stack (its input norm's weight is the down projection's gain), or ``None``.
    next: nn.Module | None
    chain: _FoldChain


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fold_projections(parts: _FoldedLayer, x: torch.Tensor):
    """``(o_proj, gate/up stack, down_proj)`` if they and the q/k/v stack each run their folded
    kernel for ``x`` and nothing was replaced or hooked since; otherwise ``None``."""
    attention, mlp = parts.attention, parts.mlp
    # The patches' own attributes, not _is_rotary / _is_gated: dynamo (torch 2.11) reads a bound
    # method's __func__ from a module's __dict__ as another object, and the fold would never trace.
    rotary: _RotaryAttention | None = getattr(attention, "_quantcore_rotary", None)
    gated: _GatedMLP | None = getattr(mlp, "_quantcore_gated", None)
    if rotary is None or gated is None or _hooked(attention) or _hooked(mlp):
        return None
    if gated.place != "gate_up" or not (_plain(gated.gate) and _plain(gated.up)):
        return None
    if mlp._modules["gate_proj"] is not gated.gate or mlp._modules["up_proj"] is not gated.up:
        return None
    o, down = attention._modules["o_proj"], mlp._modules["down_proj"]
    if not (isinstance(o, WeightOnlyLinear) and isinstance(down, WeightOnlyLinear) and _plain(o) and _plain(down)):
        return None
    qkv, gate_up = rotary.group.layer(), gated.group.layer()
    if qkv is None or gate_up is None:
        return None
    if not all(m.norm_fold_takes(x) for m in (qkv, o, gate_up, down)):
        return None
    return o, gate_up, down


def _folded_layer_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """A Llama-family decoder layer's forward at one decode token with a static cache, its RMS
    norms and residual adds in the projections' kernels (:mod:`quantcore_torch._fold`): four
    kernels and the attention's two a layer. The q/k/v kernel reads ``g * h`` and the sum of
    squares ``h`` left (the layer before's ``down_proj``, or PyTorch ops at a stack's first
    layer); ``o_proj`` adds the residual and writes the post-attention norm's input and sum;
    the gate/up kernel reads them; ``down_proj`` adds the residual and writes the next layer's.
    Anything the kernels do not take (the prefill, batches, the CPU, another cache, gradients, a
    module replaced or hooked since, a counter on another device) runs the class's forward."""
    parts: _FoldedLayer = self._quantcore_fold
    chain = parts.chain
    mods = self._modules
    norm_in, norm_post = parts.input_norm, parts.post_norm
    sums = chain.sums()
    layers = None
    if (
        not args
        and mods["self_attn"] is parts.attention
        and mods["mlp"] is parts.mlp
        and mods["input_layernorm"] is norm_in
        and mods["post_attention_layernorm"] is norm_post
        and not (_hooked(norm_in) or _hooked(norm_post))
        and sums[0].device == hidden_states.device
    ):
        layers = _fold_projections(parts, hidden_states)
    if layers is None:
        chain.hand_on()
        return type(self).forward(self, hidden_states, *args, **kwargs)
    o, gate_up, down = layers
    mid, out = sums
    if chain.h is hidden_states and chain.next is self and not chain.dirty:
        xn, sq = chain.xn, out
    else:
        if chain.dirty:  # a layer stopped between its kernels: its counters are not zero
            mid.zero_()
            chain.dirty = False
        xn, sq = rms_input(hidden_states, norm_in.weight), sumsq_counter(hidden_states)
    rest = {k: v for k, v in kwargs.items() if k not in ("position_embeddings", "attention_mask")}
    done = _rotary_attention(
        parts.attention, xn, kwargs.get("position_embeddings"), kwargs.get("attention_mask"), (), rest,
        sq, norm_in.variance_epsilon,
    )  # fmt: skip
    if done is None:
        chain.hand_on()
        return type(self).forward(self, hidden_states, *args, **kwargs)
    chain.dirty = True
    y, xn = o.residual_forward(done[0], hidden_states, norm_post.weight, mid, out)
    a = gate_up.norm_forward(xn, mid, norm_post.variance_epsilon, gate_up=True)
    following = parts.next
    gain = norm_post.weight if following is None else following._quantcore_fold.input_norm.weight
    h, xn = down.residual_forward(a, y, gain, out, mid)
    chain.dirty = False
    if following is None:
        chain.hand_on()  # the stack's end: nothing kept alive until the next step
    else:
        chain.hand_on(h, xn, following)
    return h


def _is_folded(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _folded_layer_forward


def _norm_mismatch(layer: nn.Module) -> str | None:
    """Why ``layer``'s norms and residual adds cannot run in its projections' kernels, or ``None``."""
    if type(layer).__name__ not in NORM_LAYERS:
        return f"{type(layer).__name__} is not a known decoder layer (NORM_LAYERS)"
    if "forward" in layer.__dict__:
        return "its forward is replaced (an accelerate hook, or another patch)"
    mods = layer._modules
    attention, mlp = mods.get("self_attn"), mods.get("mlp")
    if attention is None or not _is_rotary(attention):
        return "its attention does not run the rotary q/k/v kernel (fuse_projections(rotary=True))"
    if mlp is None or not _is_gated(mlp) or mlp._quantcore_gated.place != "gate_up":
        return "its MLP does not run the activation in the gate/up kernel (fuse_projections(activation=True))"
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = mods.get(name)
        if norm is None or type(norm).__name__ not in RMS_NORMS or "forward" in norm.__dict__:
            return f"{name} is {type(norm).__name__}, not an RMS norm of Llama's formula (RMS_NORMS)"
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != (attention.o_proj.out_features,):
            return f"{name}'s weight is not one value a hidden feature"
    for name, m in (("o_proj", attention._modules.get("o_proj")), ("down_proj", mlp._modules.get("down_proj"))):
        if not isinstance(m, WeightOnlyLinear) or m.bits not in (4, 8):
            return f"{name} is not an int8 or int4 torch_wo layer"
    return None


def _fuse_norms(model: nn.Module, report: FusionReport) -> None:
    """Fold each decoder layer's norms and residual adds into its kernels (:func:`_folded_layer_forward`),
    one chain a stack of layers (a ``ModuleList``), its counters on the stack's first folded layer."""
    for stack_name, stack in model.named_modules():
        if not isinstance(stack, nn.ModuleList):
            continue
        chain, before = None, None
        for index, layer in enumerate(stack):
            if type(layer).__name__ not in NORM_LAYERS:
                before = None
                continue
            label = f"{stack_name}.{index}: rms norms+residual adds"
            reason = "already folded" if _is_folded(layer) else _norm_mismatch(layer)
            if reason is not None:
                report.skipped[label] = reason
                before = None
                continue
            if chain is None:
                chain = _FoldChain(layer)
                device = layer.self_attn.o_proj.qweight.device
                for name in _SUMS:
                    layer.register_buffer(name, torch.zeros((), dtype=torch.int64, device=device), persistent=False)
                    if device.type == "cuda":
                        # Mutated in a CUDA graph: a static address, not an input copied at every replay.
                        torch._dynamo.mark_static_address(layer._buffers[name])
            if before is not None:
                before._quantcore_fold = before._quantcore_fold._replace(next=layer)
            mods = layer._modules
            layer._quantcore_fold = _FoldedLayer(
                mods["self_attn"], mods["mlp"], mods["input_layernorm"], mods["post_attention_layernorm"], None, chain
            )
            layer.forward = types.MethodType(_folded_layer_forward, layer)
            report.norms.append(f"{stack_name}.{index}")
            before = layer


def _unfuse_norms(layer: nn.Module) -> None:
    del layer.forward, layer._quantcore_fold
    for name in _SUMS:
        layer._buffers.pop(name, None)


def _activation_place(activation: bool | str) -> str | None:
    """``fuse_projections``'s ``activation`` as a place of :data:`ACTIVATION_PLACES`, or ``None``."""
    if activation is False:
        return None
    if activation is True:
        return "gate_up"
    if activation in ACTIVATION_PLACES:
        return activation
    raise ValueError(f"activation takes True, False or one of {', '.join(ACTIVATION_PLACES)}, got {activation!r}")


def fuse_projections(
    model: nn.Module,
    groups: Iterable[Sequence[str]] = DEFAULT_GROUPS,
    *,
    activation: bool | str = False,
    gated_mlps: Sequence[str] = GATED_MLPS,
    rotary: bool = False,
    norms: bool = False,
) -> FusionReport:
    """Run sibling torch_wo projections that read the same input as one stacked kernel call each.

    :param model: a model quantized with ``torch_wo`` (``quantcore.quantize`` or loaded from a
        checkpoint), on the device it will run on (fusing before a move works too; it costs a
        second concatenation).
    :param groups: tuples of child names that a module feeds the same input, e.g.
        ``[("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]`` (default:
        :data:`DEFAULT_GROUPS`). Every module holding all names of a group as children is fused.
    :param activation: also run each gated MLP's activation inside a kernel, one launch fewer a
        layer at batch-1 decode. ``True`` or ``"gate_up"``: in the fused gate/up kernel's
        epilogue, which writes ``silu(gate) * up`` instead of both halves (int8, or int4 with
        ``QUANTCORE_INT4_CUDA_KERNEL=interleaved``; ``down_proj`` may be anything). ``"down"``: in
        an int8 ``down_proj``'s one-row kernel, which reads both halves and makes the activation
        as it loads them. For MLPs of the classes ``gated_mlps`` names (default
        :data:`GATED_MLPS`) with a SiLU activation and gate/up fused; the MLP's forward is patched
        on the instance (:func:`unfuse_projections` removes it). Inputs the kernels do not take
        (several rows, the CPU) compute the activation in PyTorch, as the MLP does.
    :param rotary: also run each attention's rotary embedding and static-cache writes in its
        fused q/k/v kernel's epilogue at batch-1 decode: the kernel returns q rotated and writes k
        rotated and v into the cache, three kernels fewer a layer; where the class would run
        transformers' SDPA attention, the attention then runs as quantcore's decode attention
        (:func:`~quantcore_torch.kernels.decode_attention`). For the attentions
        :data:`ROTARY_ATTENTIONS` names (Llama, Mistral, Qwen2), int8, or int4 on the interleaved
        layout (``QUANTCORE_INT4_CUDA_KERNEL=interleaved``), with q/k/v fused; the attention's forward is
        patched on the instance (:func:`unfuse_projections` removes it). Anything else the kernel
        does not take (the prefill, batches, caches other than transformers' ``StaticCache``,
        sliding-window layers, the CPU) runs the attention's own forward.
    :param norms: also run each decoder layer's two RMS norms and two residual adds inside its
        kernels at batch-1 decode (:mod:`quantcore_torch._fold`): ``o_proj`` and ``down_proj``
        add the residual and write the next norm's input and its sum of squares, the q/k/v and
        gate/up kernels scale their sums by the norm; a layer runs four kernels and the
        attention's two instead of eight. For the decoder layers :data:`NORM_LAYERS` names
        whose attention takes ``rotary`` and whose MLP takes ``activation="gate_up"`` (asked for
        here or by an earlier call), int8 or int4 ``o_proj`` and ``down_proj``; the layer's forward is
        patched on the instance, and a stack's first folded layer holds two int64 counters as
        non-persistent buffers. The outputs are the unfolded layer's within the dtype's
        rounding (the norm's scale multiplies the projection's sums instead of its input).
        Anything else runs the layer's own forward, as ``rotary`` does.
    :returns: a :class:`FusionReport`; nothing is changed for a group it lists as skipped.

    Safe to call twice (groups already fused are reported as skipped). If stacking a group fails
    (out of memory), its members are left unfused and the error is raised; groups fused before it
    stay fused, each complete. Each output column is
    computed from its own row of the stack, as before; the outputs are the unfused ones within
    float rounding, and bit for bit where the stack runs the kernel config the members ran (the
    CPU kernels; on CUDA the stacked shape may autotune to another tile, which sums in another
    order).
    """
    if isinstance(gated_mlps, str):
        raise ValueError(f"gated_mlps takes class names, e.g. ({gated_mlps!r},), not one string")
    place = _activation_place(activation)
    groups = [tuple(g) for g in groups]
    for g in groups:
        if len(g) < 2 or len(set(g)) != len(g):
            raise ValueError(f"a group needs two or more distinct child names, got {g!r}")
    report = FusionReport()
    for parent_name, _parent, names, members in _groups_of(model, groups):
        label = f"{parent_name or '<model>'}: {'+'.join(names)}"
        if any(getattr(m, "_fused", None) is not None for m in members):
            report.skipped[label] = "already fused"
            continue
        reason = mismatch(members)
        if reason is not None:
            report.skipped[label] = reason
            continue
        try:
            FusedProjections(label, names, members).refresh()
        except BaseException:
            # Out of memory for the stack, say: the members run alone again, as they were.
            for m in members:
                m._fused = None
                m.refresh_kernel_layout()
            raise
        report.fused.append(label)
    if place is not None:
        _fuse_activations(model, tuple(gated_mlps), place, report)
    if rotary:
        _fuse_rotary(model, report)
    if norms:
        _fuse_norms(model, report)
    return report


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: every member gets its own storage back. Returns the groups undone."""
    seen: dict[int, FusedProjections] = {}
    for module in model.modules():
        if _is_folded(module):
            _unfuse_norms(module)
        if _is_gated(module):
            del module.forward, module._quantcore_gated
        if _is_rotary(module):
            del module.forward, module._quantcore_rotary
        fused = getattr(module, "_fused", None)
        if fused is not None:
            seen.setdefault(id(fused[0]), fused[0])
    for group in seen.values():
        group.release()
    return len(seen)
