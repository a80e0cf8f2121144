"""``fuse_projections(norms=True)``: a decoder layer's RMS norms and residual adds inside its projections."""

from __future__ import annotations

import copy

import pytest
import torch
from quantcore_torch import TorchWeightOnlyConfig, WeightOnlyLinear, kernels
from quantcore_torch.fusion import fuse_projections, unfuse_projections
from torch import nn

import quantcore

try:
    import transformers
except ImportError:
    transformers = None

pytestmark = pytest.mark.skipif(transformers is None, reason="needs transformers")

FORMATS = [pytest.param(8, 128, id="int8"), pytest.param(4, 32, id="int4-g32")]
LAYERS = ["model.layers.0", "model.layers.1"]


def tiny(family="llama", dtype=torch.float32, device="cpu", bits=8, group_size=128) -> nn.Module:
    common = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attention_bias=True))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    model = model.to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # norms that are not all ones: the weight must really be applied
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
    quantcore.quantize(model, TorchWeightOnlyConfig(bits=bits, group_size=group_size), progress=False)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def ids_for(device="cpu", length=5, seed=1):
    return torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)


class FoldedCalls:
    """Records each ``WeightOnlyLinear.folded_forward`` call: (out_features, norm?, residual?, gate_up)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = WeightOnlyLinear.folded_forward

        def spy(module, x, *, norm=None, residual=None, gate_up=False):
            self.calls.append((module.out_features, norm is not None, residual is not None, gate_up))
            return real(module, x, norm=norm, residual=residual, gate_up=gate_up)

        monkeypatch.setattr(WeightOnlyLinear, "folded_forward", spy)


@pytest.mark.parametrize(("bits", "group_size"), FORMATS)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_folded_layers_give_the_unfolded_outputs(family, bits, group_size, monkeypatch):
    # On the CPU every folded part runs in PyTorch's ops, as the layer runs them: bit for bit.
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")  # int4's gate/up activation needs it
    model = tiny(family, bits=bits, group_size=group_size)
    ids = ids_for()
    expected = logits(model, ids)
    report = fuse_projections(model, activation=True, norms=True)
    assert report.folded == LAYERS
    assert "2 decoder layer(s) run their norms and residual adds in the projections" in str(report)
    spy = FoldedCalls(monkeypatch)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    # Per layer: q/k/v normalized (128 + 2 * 64 rows), o_proj adds the residual, gate/up normalized
    # with its activation, down_proj adds the residual.
    assert (
        spy.calls
        == [(256, True, False, False), (128, False, True, False), (512, True, False, True), (128, False, True, False)]
        * 2
    )
    # Undone: the class's forwards again, the same outputs.
    unfuse_projections(model)
    layer = model.model.layers[0]
    assert "forward" not in layer.__dict__ and "forward" not in layer.self_attn.o_proj.__dict__
    assert not hasattr(layer, "_quantcore_folded") and not hasattr(layer.self_attn.o_proj, "_quantcore_residual")
    spy.calls.clear()
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    assert spy.calls == []


def test_calls_the_fold_cannot_vouch_for_run_the_class_forward(monkeypatch):
    model = tiny()
    fuse_projections(model, activation=True, norms=True)
    layer = model.model.layers[0]
    spy = FoldedCalls(monkeypatch)
    ids = ids_for()
    expected = logits(model, ids)
    assert len(spy.calls) == 8
    # A hook on a norm must see its call: that layer unfolds, the other stays folded.
    seen = []
    handle = layer.input_layernorm.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    spy.calls.clear()
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    handle.remove()
    assert seen == [torch.Size([1, 5, 128])] and len(spy.calls) == 4
    # Gradients into the hidden states (adapters before the layer): the class's forward.
    spy.calls.clear()
    h = torch.randn(1, 5, 128, requires_grad=True)
    position = model.model.rotary_emb(h, torch.arange(5)[None])
    out = layer(h, position_embeddings=position)
    out.sum().backward()
    assert spy.calls == [] and h.grad is not None
    # o_proj replaced (an adapter): the class's forward, the new module runs.
    original = layer.self_attn.o_proj
    layer.self_attn.o_proj = nn.Linear(128, 128)
    spy.calls.clear()
    logits(model, ids)
    assert len(spy.calls) == 4  # layer 1 only
    layer.self_attn.o_proj = original
    spy.calls.clear()
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    assert len(spy.calls) == 8


def test_what_cannot_fold_is_reported_and_bad_arguments_refused():
    model = tiny()
    with pytest.raises(
        ValueError, match="norms=True runs the MLP's norm in the gate/up kernel: it needs activation=True, got False"
    ):
        fuse_projections(model, norms=True)
    with pytest.raises(ValueError, match="it needs activation=True, got 'down'"):
        fuse_projections(model, activation="down", norms=True)
    assert "forward" not in model.model.layers[0].__dict__  # refused before anything changed
    report = fuse_projections(model, groups=[("gate_proj", "up_proj")], activation=True, norms=True)
    assert report.folded == []
    assert report.skipped["model.layers.0: norms+residuals"] == (
        "its q_proj, k_proj and v_proj do not run as one fused group, in that order"
    )
    unfuse_projections(model)
    model.model.layers[1].self_attn.o_proj = nn.Linear(128, 128)
    report = fuse_projections(model, activation=True, norms=True)
    assert report.folded == ["model.layers.0"]
    assert report.skipped["model.layers.1: norms+residuals"] == "its o_proj is not a torch_wo layer"
    report = fuse_projections(model, activation=True, norms=True)
    assert report.skipped["model.layers.0: norms+residuals"] == "already folded"


def test_folded_model_survives_deepcopy_and_compiles_fullgraph():
    model = tiny()
    fuse_projections(model, activation=True, norms=True)
    clone = copy.deepcopy(model)
    layer = clone.model.layers[0]
    assert layer.forward.__self__ is layer and layer._quantcore_folded.o_proj is layer.self_attn.o_proj
    assert layer.self_attn.o_proj._quantcore_residual is layer._quantcore_folded.residual
    ids = ids_for()
    eager = logits(model, ids)
    torch.testing.assert_close(logits(clone, ids), eager, rtol=0, atol=0)
    torch._dynamo.reset()
    try:
        out = logits(torch.compile(model, backend="eager", fullgraph=True), ids)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_folded_linear_is_the_norm_the_projection_and_the_residual(bits):
    module = WeightOnlyLinear.from_linear(nn.Linear(64, 96), bits=bits, group_size=32)
    x = torch.randn(3, 64)
    norm = kernels.NormFold(1 + torch.randn(64) * 0.3, 1e-5)
    residual = torch.randn(3, 96)
    reference = transformers.models.llama.modeling_llama.LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(norm.weight)
        torch.testing.assert_close(kernels.rms_norm(x, norm), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(
            module.folded_forward(x, norm=norm, residual=residual), residual + module(reference(x)), rtol=0, atol=0
        )
        torch.testing.assert_close(
            module.folded_forward(x, norm=norm, gate_up=True), kernels.gated_input(module(reference(x))), rtol=0, atol=0
        )
    tensors = (module.qweight, module.scale) if bits == 8 else (module.qweight, module.scale, module.zero, 32)
    folded = kernels.int8_folded_linear if bits == 8 else kernels.int4_folded_linear
    with pytest.raises(
        ValueError, match="a residual is added to a projection's output, not to a gated MLP's activation"
    ):
        folded(x, *tensors, residual=residual[:, :48], gate_up=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [8, 4])
def test_folded_layers_in_kernels_under_cuda_graphs(bits, monkeypatch):
    # One token on CUDA: every folded part runs in a kernel (int8; int4 on the interleaved layout),
    # eager and in CUDA graphs, within bf16 rounding of the unfolded model.
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    model = tiny(dtype=torch.bfloat16, device="cuda", bits=bits, group_size=128)
    unfolded = copy.deepcopy(model)
    assert fuse_projections(model, activation=True, norms=True).folded == LAYERS
    name = "int8_folded_mm" if bits == 8 else "int4_interleaved_folded_mm"
    launched, real = [], getattr(kernels._TRITON, name)
    ids = ids_for("cuda", length=1)
    with pytest.MonkeyPatch.context() as patch:  # eager only: compiled code must not trace the counter
        patch.setattr(kernels._TRITON, name, lambda *a: launched.append(a[-4] is not None) or real(*a))
        torch.testing.assert_close(logits(model, ids), logits(unfolded, ids), rtol=2e-2, atol=2e-2)
    assert launched == [True, False, True, False] * 2  # the norm's weight given to q/k/v and gate/up
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for seed in (1, 2, 3, 1):
        ids = ids_for("cuda", length=1, seed=seed)
        torch.testing.assert_close(logits(compiled, ids), logits(unfolded, ids), rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("n", "k"), [(2560, 2048), (11264, 2048), (2048, 5632), (38, 512)])
def test_folded_kernels_against_the_exact_sums(bits, n, k, monkeypatch):
    # A decoder layer's shapes in bf16 on the GPU: the folded norm is at least as close to the exact
    # sums as the unfolded path (norm rounded to bf16, then the projection); the residual is the
    # rounded projection plus the residual, rounded; the gate/up epilogue takes the norm.
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    torch.manual_seed(n + k)
    linear = nn.Linear(k, n, bias=False).to(torch.bfloat16)
    module = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=128).to("cuda")
    assert bits == 8 or module.kernel_layout.kind == "interleaved"
    h = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 3
    norm = kernels.NormFold((1 + 0.5 * torch.randn(k, device="cuda")).bfloat16(), 1e-5)
    residual = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    weight = module.dequantized_weight(torch.float64)
    hd = h.double()
    exact = (hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()) @ weight.T

    def error(y):
        return ((y.double() - exact).norm() / exact.norm()).item()

    with torch.no_grad():
        folded = module.folded_forward(h, norm=norm)
        unfolded = module(kernels.rms_norm(h, norm))
        assert error(folded) <= error(unfolded) * 1.05 and error(folded) < 1e-2
        plain = module(h)
        # The residual's key may autotune to another tile than the plain call's (another summation
        # order): a last-bit difference of the projection, before the add (exact in the interpreter).
        added = module.folded_forward(h, residual=residual)
        torch.testing.assert_close(added, (plain.float() + residual.float()).bfloat16(), rtol=1e-2, atol=2e-2)
        gated = module.folded_forward(h, norm=norm, gate_up=True)
        torch.testing.assert_close(gated, kernels.gated_input(folded), rtol=2e-2, atol=2e-2)
