"""``link_lookahead``: each int4 kernel of a decode step asks L2 for the weight the next one reads."""

from __future__ import annotations

import copy

import pytest
import torch
from quantcore_torch import TorchWeightOnlyConfig, WeightOnlyLinear, kernels, link_lookahead
from quantcore_torch.fusion import fuse_projections, unfuse_projections
from torch import nn

import quantcore

transformers = pytest.importorskip("transformers")


def quantized_llama(layers: int = 2) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    quantcore.quantize(model, TorchWeightOnlyConfig(bits=4, group_size=32), progress=False)
    return model


def _interleaved_everywhere(model: nn.Module) -> list[WeightOnlyLinear]:
    """Every layer that runs a kernel (fused stacks included) given its weight's interleaved
    layout, as CUDA builds it (``int4_interleaved_layout`` builds none on the CPU): the CPU
    forward does not read it, the links do."""
    runners = []
    for m in model.modules():
        if not isinstance(m, WeightOnlyLinear):
            continue
        runner = m._fused[0].linear if m._fused is not None else m
        if any(r is runner for r in runners):
            continue
        words = kernels.interleave_int4(runner.qweight, runner.in_features, runner.group_size)
        sz = torch.stack((runner.scale, runner.zero))
        runner.kernel_layout = kernels.Int4Layout("interleaved", words, sz, runner.group_size)
        runner._layout_of = (runner.qweight, runner.scale, runner.zero)  # current: not rebuilt
        runners.append(runner)
    return runners


class AheadCalls:
    """Records, for every int4 kernel call, the weight its layout holds and the weight it asks L2 for."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        plain, gate_up = kernels.int4_weight_only_linear, kernels.int4_gate_up_linear

        inside = []

        def record(real):
            def call(x, packed, scale, zero, group_size, bias=None, layout=None, ahead=None):
                if inside:  # the gate/up path's own call of the plain one, on the CPU
                    return real(x, packed, scale, zero, group_size, bias, layout, None)
                self.calls.append((layout.weight, ahead))
                inside.append(1)
                try:
                    return real(x, packed, scale, zero, group_size, bias, layout, None)
                finally:
                    inside.pop()

            return call

        monkeypatch.setattr(kernels, "int4_weight_only_linear", record(plain))
        monkeypatch.setattr(kernels, "int4_gate_up_linear", record(gate_up))

    def chain(self) -> list[bool]:
        """Whether each call asked for the weight the call after it read (the last: for nothing)."""
        following = [weight for weight, _ in self.calls[1:]] + [None]
        return [ahead is after for (_, ahead), after in zip(self.calls, following, strict=True)]


@pytest.mark.parametrize("fused", [False, True], ids=["members", "fused"])
def test_each_kernel_asks_for_the_weight_the_next_kernel_reads(fused, monkeypatch):
    model = quantized_llama()
    if fused:
        fuse_projections(model, activation=True)
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(1))
    _interleaved_everywhere(model)
    with torch.no_grad():
        expected = model(ids).logits
    assert link_lookahead(model) == 2 * 7 - 1  # q, k, v, o, gate, up, down a layer, in that order
    calls = AheadCalls(monkeypatch)
    with torch.no_grad():
        out = model(ids).logits
    # 7 kernels a layer alone; q/k/v, o, gate/up (activation in its epilogue) and down fused.
    assert len(calls.calls) == 2 * (4 if fused else 7)
    assert all(calls.chain()), calls.chain()
    assert calls.calls[-1][1] is None  # the last layer's down projection: the output head is not int4
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # a hint: nothing else changes

    # Unlinked: no kernel asks for anything.
    assert link_lookahead(model, enabled=False) == 2 * 7 - 1
    calls.calls.clear()
    with torch.no_grad():
        model(ids)
    assert [ahead for _, ahead in calls.calls] == [None] * len(calls.calls)


def test_links_follow_restacks_and_copies_without_holding_modules_or_state(monkeypatch):
    model = quantized_llama(layers=1)
    fuse_projections(model, activation=True)
    link_lookahead(model)
    layer = model.model.layers[0]
    # Plain references: no child modules, nothing in the state dict.
    assert dict(layer.self_attn.v_proj.named_children()) == {}
    assert layer.self_attn.v_proj._next_layer is layer.self_attn.o_proj
    assert set(model.state_dict()) == set(quantized_llama(layers=1).state_dict())
    # A deep copy links its own layers.
    clone = copy.deepcopy(model)
    clone_layer = clone.model.layers[0]
    assert clone_layer.self_attn.v_proj._next_layer is clone_layer.self_attn.o_proj
    # Unfused and fused again (a new stack, a new layout): the links resolve to the current stack.
    unfuse_projections(model)
    fuse_projections(model, activation=True)
    _interleaved_everywhere(model)
    o_proj = layer.self_attn.o_proj
    qkv = layer.self_attn.q_proj._fused[0].linear
    gate_up = layer.mlp.gate_proj._fused[0].linear
    assert qkv._lookahead() is o_proj.kernel_layout.weight
    assert o_proj._lookahead() is gate_up.kernel_layout.weight
    assert gate_up._lookahead() is layer.mlp.down_proj.kernel_layout.weight
    assert layer.mlp.down_proj._lookahead() is None
    # A target on another kernel's layout (the CPU one here) asks for nothing.
    o_proj.refresh_kernel_layout()
    assert o_proj.kernel_layout.kind == "cpu" and qkv._lookahead() is None


def test_int8_layers_are_not_linked():
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=100
    )
    model = transformers.LlamaForCausalLM(config).eval()
    quantcore.quantize(model, TorchWeightOnlyConfig(bits=8), progress=False)
    assert link_lookahead(model) == 0
    assert all(m._next_layer is None for m in model.modules() if isinstance(m, WeightOnlyLinear))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_linked_kernels_decode_a_folded_model_to_the_same_bits(monkeypatch):
    # The real kernels with the prefetch: every decode step's logits are the unlinked model's
    # bit for bit, eager and replayed from the CUDA graph of a compiled step; the graph's kernels
    # are the lookahead variants.
    from quantcore_torch import _triton

    from .test_torch_fusion import ATTENTIONS, decode_step, ids_for, static_decode
    from .test_torch_fusion import quantized_llama as bf16_llama

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    model = bf16_llama(4, 128, dtype=torch.bfloat16, device="cuda")
    assert fuse_projections(model, activation=True, rotary=True).rotary == ATTENTIONS
    ids = ids_for("cuda", length=7)
    eager = static_decode(model, ids, steps=6)
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    static_decode(model, ids, steps=6, step=compiled)  # recorded
    replayed = static_decode(model, ids, steps=6, step=compiled)
    torch._dynamo.reset()

    assert link_lookahead(model) == 2 * 7 - 1
    torch.testing.assert_close(static_decode(model, ids, steps=6), eager, rtol=0, atol=0)
    compiled = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    for _ in range(2):
        torch.testing.assert_close(static_decode(model, ids, steps=6, step=compiled), replayed, rtol=0, atol=0)
    torch._dynamo.reset()
    # The kept kernels of the q/k/v rotary, o and gate/up projections ask for the next weight
    # (their keys end with the lookahead's specialization); the last down projection asks for none.
    launchers = (_triton._INT4_INTERLEAVED, _triton._INT4_INTERLEAVED_ROPE)
    asking = [key for launcher in launchers for key in launcher.compiled if key[-1]]
    assert len(asking) >= 3, asking


def test_linked_layers_compile_fullgraph(monkeypatch):
    # Dynamo follows the links (plain references to other layers, a fused stack's group) with no
    # graph break; the compiled model gives the eager logits.
    model = quantized_llama()
    fuse_projections(model, activation=True)
    _interleaved_everywhere(model)
    link_lookahead(model)
    ids = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    calls = AheadCalls(monkeypatch)
    with torch.no_grad():
        eager = model(ids).logits
    eager_chain = calls.chain()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(ids).logits
    torch._dynamo.reset()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert all(eager_chain) and len(calls.calls) == 2 * len(eager_chain)  # traced once, each call seen
    assert calls.chain()[len(eager_chain) :] == eager_chain
