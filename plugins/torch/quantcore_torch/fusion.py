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

import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from . import kernels
from .modules import WeightOnlyLinear

__all__ = [
    "ACTIVATION_PLACES",
    "DEFAULT_GROUPS",
    "FOLDED_LAYERS",
    "GATED_MLPS",
    "RMS_NORMS",
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
    #: Decoder layers whose norms and residual adds run in their projections' kernels (``norms``).
    folded: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} group(s) of projections, skipped {len(self.skipped)}"]
        if self.activations:
            where = "the gate/up kernel" if self.activation_place == "gate_up" else "the down projection"
            lines.append(f"  {len(self.activations)} gated MLP(s) run their activation in {where}")
        if self.folded:
            lines.append(f"  {len(self.folded)} decoder layer(s) run their norms and residual adds in the projections")
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
        #: ``(hidden_state, norm)`` while a folded decoder layer (``fuse_projections(norms=True)``)
        #: runs its attention: the members get the un-normalized hidden state and the stack's
        #: kernel applies the norm.
        self.norm_input: tuple[torch.Tensor, kernels.NormFold] | None = None
        for index, m in enumerate(members):
            m._fused = (self, index)

    def __repr__(self) -> str:
        state = "active" if self.linear is not None else "inactive"
        return f"FusedProjections({self.name}, {state})"

    # ------------------------------------------------------------------ life cycle
    @staticmethod
    def _member_tensors(m: WeightOnlyLinear) -> tuple[torch.Tensor | None, ...]:
        # From the dicts, not getattr (about a microsecond a name): this runs once a step per group.
        buffers = m._buffers
        return buffers.get("qweight"), buffers.get("scale"), buffers.get("zero"), m._parameters.get("bias")

    def is_current(self) -> bool:
        """Whether every member still reads the views of the current stack."""
        if self.linear is None:
            return False
        for m, views in zip(self.members, self._views, strict=True):
            for have, view in zip(self._member_tensors(m), views, strict=True):
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
        self._stack()

    def _stack(self) -> None:
        members = self.members
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
        for m, (start, stop) in zip(members, self.bounds, strict=True):
            for name in names:
                setattr(m, name, getattr(linear, name)[start:stop])
            if m.bias is not None:
                # Still trainable if it was (then the member runs alone while gradients are on).
                m.bias = nn.Parameter(linear.bias[start:stop], requires_grad=m.bias.requires_grad)
            m.kernel_layout, m._layout_of = None, ()
            views.append(self._member_tensors(m))
        self._views = tuple(views)
        # Built last: members' refresh hooks must not see a half-made stack.
        linear.refresh_kernel_layout()
        if linear.qweight.is_cuda:
            # CUDA graphs copy plain tensor inputs at every replay; these are the weights, never changed in a graph.
            for t in (*(getattr(linear, n) for n in names), linear.bias):
                if t is not None:
                    torch._dynamo.mark_static_address(t)
        self.linear = linear

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

    def gated(self, x: torch.Tensor, norm: kernels.NormFold | None = None) -> torch.Tensor | None:
        """``silu(gate) * up`` for ``x`` from a gated MLP's (gate, up) group (see
        :meth:`WeightOnlyLinear.gate_up_forward`), or ``None`` if the group is inactive. ``norm``:
        ``x`` is the hidden state before the MLP's norm, which the kernel applies."""
        linear = self._active()
        if linear is None:
            return None
        return linear.gate_up_forward(x) if norm is None else linear.folded_forward(x, norm=norm, gate_up=True)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The stack's output for ``x``, normalized first while a folded layer asks (``norm_input``)."""
        pending = self.norm_input
        if pending is None:
            return self.linear(x)
        if x is not pending[0]:
            # The attention transformed its input before the projections: the fold cannot vouch
            # for it (fuse_projections(norms=True) takes only the decoder layers it knows).
            raise RuntimeError(
                f"{self.name}: a folded norm expected the decoder layer's hidden state, got another tensor"
            )
        return self.linear.folded_forward(x, norm=pending[1])

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
                y = self._project(x)
                self._cache, self._served = (x, 0, y), 0
        elif (cache := self._cache) is not None and cache[0] is x and cache[1] == _version(x):
            y = cache[2]
        else:
            if not self.is_current():
                self.refresh()
                if self.linear is None:
                    return None
            y = self._project(x)
            self._cache, self._served = (x, _version(x), y), 0
        self._served += 1
        if self._served >= len(self.members):
            # Every member has had its slice: keep no activation alive until the next step.
            self._cache = None
        return y[..., start:stop]


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


class _Slot:
    """A value a patched forward leaves for one it calls (a decoder layer's residual for its
    ``o_proj``, its norm and residual for its MLP), taken by that call. A plain object: dynamo
    follows its attribute writes as it follows ``FusedProjections``'."""

    def __init__(self) -> None:
        self.value = None

    def take(self):
        value, self.value = self.value, None
        return value


class _GatedMLP(NamedTuple):
    """What a gated MLP's patched forward runs: its projections as fused, their group, and where
    the activation runs (:data:`ACTIVATION_PLACES`)."""

    gate: WeightOnlyLinear
    up: WeightOnlyLinear
    down: nn.Module
    group: FusedProjections
    place: str
    #: ``(norm, residual)`` from a folded decoder layer for the next call, or ``None``.
    fold: _Slot


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
    norm, residual = parts.fold.take() or (None, None)
    mods = self._modules
    if (
        not (torch.is_grad_enabled() and x.requires_grad)
        and mods["gate_proj"] is parts.gate
        and mods["up_proj"] is parts.up
        and _plain(parts.gate)
        and _plain(parts.up)
    ):
        if parts.place == "gate_up":
            a = parts.group.gated(x, norm)
            if a is not None:
                down = mods["down_proj"]
                if residual is None:
                    return down(a)
                if isinstance(down, WeightOnlyLinear) and _plain(down):
                    return down.folded_forward(a, residual=residual)
                return residual + down(a)
        elif norm is None and residual is None and mods["down_proj"] is parts.down and _plain(parts.down):
            h = parts.group.stacked(x)
            if h is not None:
                return parts.down.gated_forward(h)
    return kernels.unfolded(lambda xn: type(self).forward(self, xn), x, norm, residual, False)


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
        mlp._quantcore_gated = _GatedMLP(gate, up, down, gate._fused[0], place, _Slot())
        mlp.forward = types.MethodType(_gated_mlp_forward, mlp)
        report.activations.append(name or "<model>")


#: transformers' decoder layers whose forward is ``h = h + attn(input_layernorm(h)); h = h +
#: mlp(post_attention_layernorm(h))``, the attention's projections fed its input as it is and its
#: output ``o_proj``'s: with ``norms``, the norms and residual adds can run in the projections' kernels.
FOLDED_LAYERS: tuple[str, ...] = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
#: Their RMS norms: ``weight * (h * rsqrt(mean(h**2) + variance_epsilon)).to(dtype)`` (:func:`kernels.rms_norm`).
RMS_NORMS: tuple[str, ...] = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_QKV = ("q_proj", "k_proj", "v_proj")


class _FoldedLayer(NamedTuple):
    """What a folded decoder layer's patched forward runs: its modules as fused, and the slots
    it hands its residuals through."""

    attn: nn.Module
    mlp: nn.Module
    input_norm: nn.Module
    post_norm: nn.Module
    qkv: FusedProjections
    o_proj: WeightOnlyLinear
    residual: _Slot  # for o_proj: the attention's residual


def _norm_of(module: nn.Module) -> kernels.NormFold:
    return kernels.NormFold(module.weight, module.variance_epsilon)


def _layer_mismatch(layer: nn.Module) -> str | None:
    """Why ``layer``'s norms and residual adds cannot run in its projections' kernels, or ``None``."""
    if type(layer).__name__ not in FOLDED_LAYERS:
        return f"{type(layer).__name__} is not a known decoder layer (FOLDED_LAYERS)"
    mods = layer._modules
    attn, mlp = mods.get("self_attn"), mods.get("mlp")
    for name in ("input_layernorm", "post_attention_layernorm"):
        norm = mods.get(name)
        if type(norm).__name__ not in RMS_NORMS or not hasattr(norm, "variance_epsilon"):
            return f"its {name} is {type(norm).__name__}, not a known RMS norm (RMS_NORMS)"
    if attn is None or mlp is None:
        return "it has no self_attn or no mlp"
    q = attn._modules.get("q_proj")
    fused = getattr(q, "_fused", None)
    if fused is None or fused[0].members != tuple(attn._modules.get(n) for n in _QKV) or fused[0].linear is None:
        return "its q_proj, k_proj and v_proj do not run as one fused group, in that order"
    if not isinstance(attn._modules.get("o_proj"), WeightOnlyLinear):
        return "its o_proj is not a torch_wo layer"
    if not _is_gated(mlp) or mlp._quantcore_gated.place != "gate_up":
        return "its MLP does not run its activation in the gate/up kernel (activation=True)"
    return None


def _no_hooks(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def _layer_fold_ready(layer: nn.Module, parts: _FoldedLayer, h: torch.Tensor) -> bool:
    """Whether the folded forward can vouch for this call: no gradients into ``h``, the modules
    fused still in place and unhooked (the fold skips the norms' calls), the stacks active."""
    if torch.is_grad_enabled() and h.requires_grad:
        return False
    mods, amods = layer._modules, parts.attn._modules
    if not (
        mods["self_attn"] is parts.attn
        and mods["mlp"] is parts.mlp
        and mods["input_layernorm"] is parts.input_norm
        and mods["post_attention_layernorm"] is parts.post_norm
        and _no_hooks(parts.input_norm)
        and _no_hooks(parts.post_norm)
        and amods["o_proj"] is parts.o_proj
        and _no_hooks(parts.o_proj)
        and _is_gated(parts.mlp)
    ):
        return False
    for name, member in zip(_QKV, parts.qkv.members, strict=True):
        if amods[name] is not member or not _plain(member):
            return False
        bias = member._parameters["bias"]
        if torch.is_grad_enabled() and bias is not None and bias.requires_grad:
            return False
    return parts.qkv._active() is not None and parts.mlp._quantcore_gated.group._active() is not None


def _folded_layer_forward(self: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A decoder layer's forward with its norms and residual adds in its projections' kernels:
    the q/k/v stack normalizes the hidden state it is given (``input_layernorm``), ``o_proj``
    adds the residual to its output, the gate/up kernel normalizes (``post_attention_layernorm``)
    and ``down_proj`` adds the residual. Two kernels fewer a layer at batch-1 decode. A call it
    cannot vouch for (positional arguments, gradients, a module replaced or hooked since) runs the
    class's forward."""
    parts: _FoldedLayer = self._quantcore_folded
    if args or not _layer_fold_ready(self, parts, hidden_states):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    h = hidden_states
    parts.qkv.norm_input = (h, _norm_of(parts.input_norm))
    parts.residual.value = h
    try:
        out, _ = self.self_attn(hidden_states=h, **kwargs)
    finally:
        parts.qkv.norm_input = None
    if parts.residual.take() is not None:  # o_proj ran without it (another input shape): add it here
        out = h + out
    gated = parts.mlp._quantcore_gated
    gated.fold.value = (_norm_of(parts.post_norm), out)
    try:
        return self.mlp(out)
    finally:
        gated.fold.value = None


def _residual_forward(self: WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """A folded layer's ``o_proj``: the layer's residual added in the kernel's epilogue, when the
    layer left one (:func:`_folded_layer_forward`); else the class's forward."""
    residual = self._quantcore_residual.take()
    if residual is None:
        return type(self).forward(self, x)
    return self.folded_forward(x, residual=residual)


def _is_folded(module: nn.Module) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _folded_layer_forward


def _fold_norms(model: nn.Module, report: FusionReport) -> None:
    for name, layer in model.named_modules():
        if not (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")):
            continue
        label = f"{name or '<model>'}: norms+residuals"
        if _is_folded(layer):
            report.skipped[label] = "already folded"
            continue
        reason = _layer_mismatch(layer)
        if reason is not None:
            report.skipped[label] = reason
            continue
        attn, mods = layer.self_attn, layer._modules
        o_proj = attn.o_proj
        parts = _FoldedLayer(
            attn, layer.mlp, mods["input_layernorm"], mods["post_attention_layernorm"],
            attn.q_proj._fused[0], o_proj, _Slot(),
        )  # fmt: skip
        o_proj._quantcore_residual = parts.residual
        o_proj.forward = types.MethodType(_residual_forward, o_proj)
        layer._quantcore_folded = parts
        layer.forward = types.MethodType(_folded_layer_forward, layer)
        report.folded.append(name or "<model>")


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
    :param norms: also run each decoder layer's two RMS norms and two residual adds inside its
        projections' kernels, two launches fewer a layer at batch-1 decode: the q/k/v and gate/up
        kernels normalize the hidden state they read, ``o_proj``'s and ``down_proj``'s add the
        residual to what they write. Needs ``activation=True`` (or ``"gate_up"``), q/k/v fused
        and a torch_wo ``o_proj``, in the decoder layers of :data:`FOLDED_LAYERS` with the norms
        of :data:`RMS_NORMS`; the layer's forward is patched on the instance (and ``o_proj``'s).
        The kernels never round the normalized hidden state to the model's dtype, as the norm
        does, so outputs differ from the unfolded ones by float rounding. Inputs the kernels do
        not take run the norms and adds in PyTorch, as the layer does.
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
    if norms and place != "gate_up":
        raise ValueError(
            f"norms=True runs the MLP's norm in the gate/up kernel: it needs activation=True, got {activation!r}"
        )
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
    if norms:
        _fold_norms(model, report)
    return report


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: every member gets its own storage back. Returns the groups undone."""
    seen: dict[int, FusedProjections] = {}
    for module in model.modules():
        if _is_folded(module):
            o_proj = module._quantcore_folded.o_proj
            if getattr(o_proj.__dict__.get("forward"), "__func__", None) is _residual_forward:
                del o_proj.forward, o_proj._quantcore_residual
            del module.forward, module._quantcore_folded
    for module in model.modules():
        if _is_gated(module):
            del module.forward, module._quantcore_gated
        fused = getattr(module, "_fused", None)
        if fused is not None:
            seen.setdefault(id(fused[0]), fused[0])
    for group in seen.values():
        group.release()
    return len(seen)
