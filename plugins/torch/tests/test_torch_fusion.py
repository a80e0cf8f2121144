"""``fuse_projections``: q/k/v and gate/up as one kernel call each, with nothing else changed."""

from __future__ import annotations

import copy

import pytest
import torch
from quantcore_torch import TorchWeightOnlyConfig, WeightOnlyLinear
from quantcore_torch.fusion import FusedProjections, fuse_projections, unfuse_projections
from quantcore_torch.kernels import gated_input
from quantcore_torch.rms import SUMSQ_SCALE, rms_input, sumsq_counter
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import quantcore
from quantcore.quantizer import module_nbytes

try:
    import transformers
except ImportError:  # the tests that build a transformers model skip; the plain-module ones run
    transformers = None

needs_transformers = pytest.mark.skipif(transformers is None, reason="needs transformers")

FORMATS = [pytest.param(8, 128, id="int8"), pytest.param(4, 32, id="int4-g32")]
KERNEL_OPS = ("_weight_int8pack_mm", "_weight_int4pack_mm", "int8_mm", "int4_mm")


def tiny_llama(dtype=torch.float32, device="cpu", layers=2) -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        attention_bias=True,  # q/k/v with biases: the stack carries them too
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def quantized_llama(bits, group_size, dtype=torch.float32, device="cpu") -> nn.Module:
    model = tiny_llama(dtype, device)
    quantcore.quantize(model, TorchWeightOnlyConfig(bits=bits, group_size=group_size), progress=False)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


class KernelCalls(TorchDispatchMode):
    """Counts the weight-only kernel calls that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in KERNEL_OPS):
            self.count += 1
        return func(*args, **(kwargs or {}))


def assert_cuda_graph_replays_match(model, unfused) -> None:
    """``model`` compiled with CUDA graphs gives ``unfused``'s logits within bf16 rounding, recorded
    and then replayed with new inputs."""
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for seed in (1, 2, 3, 1):
        ids = ids_for("cuda", length=1, seed=seed)
        torch.testing.assert_close(logits(compiled, ids), logits(unfused, ids), rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


def ids_for(device="cpu", length=6, seed=1):
    return torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize(("bits", "group_size"), FORMATS)
@needs_transformers
def test_fused_model_gives_the_same_outputs_with_fewer_kernel_calls(bits, group_size, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = quantized_llama(bits, group_size, device=device, dtype=dtype)
    ids = ids_for(device)
    with KernelCalls() as calls:
        ref = logits(model, ids)
    report = fuse_projections(model)
    assert report.fused == [
        "model.layers.0.self_attn: q_proj+k_proj+v_proj",
        "model.layers.0.mlp: gate_proj+up_proj",
        "model.layers.1.self_attn: q_proj+k_proj+v_proj",
        "model.layers.1.mlp: gate_proj+up_proj",
    ]
    assert report.skipped == {}
    with KernelCalls() as fused_calls:
        out = logits(model, ids)
    # Seven linears a layer become four (the CPU's reference path has no kernel to count).
    if calls.count:
        assert (calls.count, fused_calls.count) == (14, 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize(("bits", "group_size"), FORMATS)
@needs_transformers
def test_members_are_views_of_one_stack_and_the_state_dict_is_unchanged(bits, group_size):
    model = quantized_llama(bits, group_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = module_nbytes(model)
    fuse_projections(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert module_nbytes(model) == nbytes
    attn = model.model.layers[0].self_attn
    group = attn.q_proj._fused[0]
    assert isinstance(group, FusedProjections) and group.linear is not None
    stack = group.linear.qweight.untyped_storage().data_ptr()
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert m.qweight.untyped_storage().data_ptr() == stack
        assert m.kernel_layout is None  # only the stack keeps a kernel layout
    # Nothing new in the module tree: the group is not a module.
    assert [n for n, _ in model.named_modules() if "fused" in n] == []


@needs_transformers
def test_checkpoint_of_a_fused_model_loads_into_an_unfused_one(tmp_path):
    model = quantized_llama(4, 32)
    ids = ids_for()
    ref = logits(model, ids)
    fuse_projections(model)
    quantcore.save_quantized(model, tmp_path / "ckpt")
    loaded = quantcore.load_quantized(tmp_path / "ckpt", tiny_llama(), progress=False)
    torch.testing.assert_close(logits(loaded, ids), ref, rtol=0, atol=0)
    assert loaded.model.layers[0].self_attn.q_proj._fused is None
    fuse_projections(loaded)
    torch.testing.assert_close(logits(loaded, ids), ref, rtol=0, atol=0)


@pytest.mark.parametrize("assign", [False, True])
@needs_transformers
def test_loading_new_weights_into_fused_members_reaches_the_stack(assign):
    # Different weights altogether: quantize another random model.
    other = tiny_llama()
    torch.manual_seed(5)
    for p in other.parameters():
        nn.init.normal_(p, std=0.05)
    quantcore.quantize(other, TorchWeightOnlyConfig(bits=4, group_size=32), progress=False)
    state = other.state_dict()
    ids = ids_for()
    expected = logits(other, ids)

    target = quantized_llama(4, 32)
    fuse_projections(target)
    target.load_state_dict(state, assign=assign)
    group = target.model.layers[0].self_attn.q_proj._fused[0]
    assert group.is_current()
    torch.testing.assert_close(logits(target, ids), expected, rtol=0, atol=0)


@needs_transformers
def test_moving_or_converting_the_model_restacks_it():
    model = quantized_llama(8, 128)
    fuse_projections(model)
    model.to(torch.bfloat16)
    group = model.model.layers[1].mlp.gate_proj._fused[0]
    assert group.is_current() and group.linear.scale.dtype == torch.bfloat16
    gate = model.model.layers[1].mlp.gate_proj
    assert gate.scale.dtype == torch.bfloat16
    assert gate.qweight.untyped_storage().data_ptr() == group.linear.qweight.untyped_storage().data_ptr()
    ids = ids_for()
    unfused = copy.deepcopy(model)
    unfuse_projections(unfused)
    torch.testing.assert_close(logits(model, ids), logits(unfused, ids), rtol=0, atol=0)


@needs_transformers
def test_merging_a_new_weight_into_a_member_requantizes_the_stack():
    model = quantized_llama(8, 128)
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 128)
    new = torch.randn(attn.k_proj.out_features, 128) * 0.05
    attn.k_proj.weight.data = new  # how PEFT merges an adapter
    expected = torch.nn.functional.linear(x, attn.k_proj.dequantize(), attn.k_proj.bias)
    torch.testing.assert_close(attn.q_proj(x), attn.q_proj.reference_forward(x))
    torch.testing.assert_close(attn.k_proj(x), expected)
    exact = torch.nn.functional.linear(x, new, attn.k_proj.bias)
    assert ((attn.k_proj(x) - exact).norm() / exact.norm()).item() < 0.01  # int8's bound: the new weight is in


@needs_transformers
def test_members_called_with_different_inputs_each_get_their_own_output():
    model = quantized_llama(4, 32)
    fuse_projections(model)
    attn = model.model.layers[0].self_attn
    a, b = torch.randn(2, 128), torch.randn(2, 128)
    with torch.no_grad():
        # Cross-attention's pattern: q reads one input, k and v another.
        outs = [attn.q_proj(a), attn.k_proj(b), attn.v_proj(b)]
        refs = [attn.q_proj.reference_forward(a), attn.k_proj.reference_forward(b), attn.v_proj.reference_forward(b)]
        for out, ref in zip(outs, refs, strict=True):
            torch.testing.assert_close(out, ref)
        # The same input object changed in place in between: not served from the first call.
        q = attn.q_proj(a)
        a.mul_(2)
        torch.testing.assert_close(attn.k_proj(a), attn.k_proj.reference_forward(a))
        torch.testing.assert_close(q, attn.q_proj.reference_forward(a / 2))
    group = attn.q_proj._fused[0]
    attn.v_proj(a)
    assert group._cache is None  # every member served: no activation kept


@needs_transformers
def test_gradients_into_the_input_take_the_members_own_path():
    model = quantized_llama(8, 128)
    fuse_projections(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 128, requires_grad=True)
    (mlp.gate_proj(x).sum() + 2 * mlp.up_proj(x).sum()).backward()
    expected = mlp.gate_proj.dequantize().sum(0) + 2 * mlp.up_proj.dequantize().sum(0)
    torch.testing.assert_close(x.grad, expected.expand(4, -1))


@needs_transformers
def test_mismatched_or_unquantized_siblings_are_reported_not_fused():
    model = tiny_llama()
    config = TorchWeightOnlyConfig(bits=8, modules_to_not_convert=["model.layers.0.self_attn.k_proj"])
    quantcore.quantize(model, config, progress=False)
    mlp = model.model.layers[1].mlp
    mlp.up_proj = WeightOnlyLinear.from_linear(mlp.up_proj.to_linear(), bits=4, group_size=32)
    report = fuse_projections(model)
    assert report.fused == ["model.layers.0.mlp: gate_proj+up_proj", "model.layers.1.self_attn: q_proj+k_proj+v_proj"]
    assert report.skipped["model.layers.0.self_attn: q_proj+k_proj+v_proj"].startswith("Linear is not a torch_wo layer")
    assert report.skipped["model.layers.1.mlp: gate_proj+up_proj"] == "the members differ in bits (4, 8)"
    assert "skipped 2" in str(report)
    assert model.model.layers[0].self_attn.q_proj._fused is None
    again = fuse_projections(model)
    assert again.fused == [] and set(again.skipped.values()) >= {"already fused"}


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="two or more distinct"):
        fuse_projections(nn.Linear(2, 2), groups=[("q_proj",)])
    with pytest.raises(ValueError, match="two or more distinct"):
        fuse_projections(nn.Linear(2, 2), groups=[("a", "a")])


@needs_transformers
def test_real_bert_model_query_key_value():
    from quantcore.demo import model_dir

    try:
        path = model_dir()
    except Exception as exc:  # pragma: no cover - the demo extra is part of the test set-up
        pytest.skip(str(exc))
    model = transformers.AutoModel.from_pretrained(path).eval()
    quantcore.quantize(model, TorchWeightOnlyConfig(bits=8), progress=False)
    ids = torch.tensor([[101, 7592, 2088, 1010, 2129, 2024, 2017, 102]])
    with torch.no_grad():
        ref = model(ids).last_hidden_state
    report = fuse_projections(model)
    assert len(report.fused) == 6 and all(r.endswith("query+key+value") for r in report.fused)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, ref, rtol=0, atol=0)


@needs_transformers
def test_unfuse_gives_every_member_its_own_storage():
    model = quantized_llama(4, 32)
    fuse_projections(model)
    assert unfuse_projections(model) == 4
    attn = model.model.layers[0].self_attn
    assert attn.q_proj._fused is None
    assert attn.q_proj.qweight.untyped_storage().nbytes() == attn.q_proj.qweight.nbytes
    assert attn.q_proj.kernel_layout is not None  # its own layout again (the CPU kernel's)
    assert unfuse_projections(model) == 0


@needs_transformers
def test_deepcopy_keeps_the_fusion():
    model = quantized_llama(8, 128)
    fuse_projections(model)
    clone = copy.deepcopy(model)
    group = clone.model.layers[0].self_attn.q_proj._fused[0]
    assert group is not model.model.layers[0].self_attn.q_proj._fused[0]
    assert group.is_current() and group.members[0] is clone.model.layers[0].self_attn.q_proj
    ids = ids_for()
    torch.testing.assert_close(logits(clone, ids), logits(model, ids), rtol=0, atol=0)


class _GraphCalls:
    """A torch.compile backend that counts the kernel calls in the graphs it is given."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        self.count += sum(any(op in str(n.target) for op in KERNEL_OPS) for n in gm.graph.nodes)
        return gm.forward


@pytest.mark.parametrize(("bits", "group_size"), FORMATS)
@needs_transformers
def test_compiled_fullgraph_traces_one_call_per_group(bits, group_size):
    model = quantized_llama(bits, group_size)
    fuse_projections(model)
    ids = ids_for()
    eager = logits(model, ids)
    torch._dynamo.reset()
    backend = _GraphCalls()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = logits(compiled, ids)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert backend.count == 8
    assert model.model.layers[0].self_attn.q_proj._fused[0]._cache is None
    logits(compiled, ids_for(seed=2))  # no recompilation needed, nothing left behind
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("bits", "group_size", "kernel"),
    [(8, 128, "triton"), (4, 128, "tinygemm"), (4, 128, "triton")],
    ids=["int8", "int4-tinygemm", "int4-triton"],
)
@needs_transformers
def test_fused_model_under_cuda_graphs(bits, group_size, kernel, monkeypatch):
    from quantcore_torch import kernels

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", kernel)
    model = quantized_llama(bits, group_size, dtype=torch.bfloat16, device="cuda")
    unfused = copy.deepcopy(model)
    fuse_projections(model)
    layout = model.model.layers[0].self_attn.q_proj._fused[0].linear.kernel_layout
    assert (layout is not None) == (bits == 4 and kernel == "tinygemm")
    ids = ids_for("cuda", length=1)
    eager = logits(model, ids)
    torch.testing.assert_close(eager, logits(unfused, ids), rtol=0, atol=0)
    assert_cuda_graph_replays_match(model, unfused)


@needs_transformers
@pytest.mark.parametrize("activation", [False, "gate_up", "down"], ids=["projections", "gate-up-too", "down-too"])
def test_lora_on_fused_members_trains_and_merges(activation, monkeypatch):
    # With the activation in a kernel too: an adapter on up_proj replaces it, so the MLP runs
    # its class's forward while adapted and its folded one again once merged.
    peft = pytest.importorskip("peft")
    model = quantized_llama(8, 128)
    fuse_projections(model, activation=activation)
    reference = copy.deepcopy(model)
    unfuse_projections(reference)
    assert "forward" not in reference.model.layers[0].mlp.__dict__
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    fused, plain = peft.get_peft_model(model, config), peft.get_peft_model(reference, config)
    plain.load_state_dict(fused.state_dict())  # the same adapters
    ids = ids_for()
    for m in (fused, plain):
        m.train()
        m(ids).logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, p in plain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad)
    # Merging re-quantizes q_proj / v_proj / up_proj: the stacks follow, outputs match the unfused merge.
    merged, merged_plain = fused.merge_and_unload(), plain.merge_and_unload()
    assert merged.model.layers[0].self_attn.q_proj._fused[0].is_current()
    calls = []
    for name in ("gated_forward", "gate_up_forward"):
        real = getattr(WeightOnlyLinear, name)
        monkeypatch.setattr(WeightOnlyLinear, name, lambda self, h, real=real: calls.append(1) or real(self, h))
    torch.testing.assert_close(logits(merged.eval(), ids), logits(merged_plain.eval(), ids), rtol=0, atol=0)
    assert len(calls) == (2 if activation else 0)  # merged: each MLP folds its activation again


@needs_transformers
def test_dequantizing_a_fused_model_gives_the_unfused_models_linears():
    model = quantized_llama(4, 32)
    reference = copy.deepcopy(model)
    fuse_projections(model)
    quantcore.dequantize(model)
    quantcore.dequantize(reference)
    for (name, a), (_, b) in zip(model.named_modules(), reference.named_modules(), strict=True):
        assert type(a) is type(b), name
        if isinstance(a, nn.Linear):
            assert torch.equal(a.weight, b.weight) and a.weight.untyped_storage().nbytes() == a.weight.nbytes


@needs_transformers
def test_transformers_save_pretrained_of_a_fused_model_reloads(tmp_path):
    pytest.importorskip("accelerate")
    try:
        import quantcore.integrations.transformers as qt
    except ImportError as exc:  # transformers 4.x: the integration says it needs 5.x
        pytest.skip(str(exc))
    qt.register()
    tiny_llama().save_pretrained(tmp_path / "float")
    config = TorchWeightOnlyConfig(bits=4, group_size=32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    assert len(fuse_projections(model).fused) == 4
    ids = ids_for()
    model.save_pretrained(tmp_path / "saved")  # the members' views share a storage: saved one by one
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, WeightOnlyLinear)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)


class Block(nn.Module):
    """An attention-and-MLP block in plain torch: q/k/v read one input, gate/up another."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(width, width), nn.Linear(width, 32), nn.Linear(width, 32)
        self.o_proj = nn.Linear(width, width)
        self.gate_proj, self.up_proj = nn.Linear(width, 128, bias=False), nn.Linear(width, 128, bias=False)
        self.down_proj = nn.Linear(128, width, bias=False)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        x = x + self.o_proj(q * torch.cat((k, v), dim=-1).sum(-1, keepdim=True).sigmoid())
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def plain_model(bits: int, group_size: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    quantcore.quantize(model, TorchWeightOnlyConfig(bits=bits, group_size=group_size), progress=False)
    return model


@pytest.mark.parametrize(("bits", "group_size"), FORMATS)
def test_plain_blocks_fuse_with_the_same_outputs_eager_and_compiled(bits, group_size):
    model = plain_model(bits, group_size)
    x = torch.randn(3, 64)
    with torch.no_grad(), KernelCalls() as calls:
        ref = model(x)
    assert [r.split(":")[1].strip() for r in fuse_projections(model).fused] == [
        "q_proj+k_proj+v_proj",
        "gate_proj+up_proj",
    ] * 2
    with torch.no_grad(), KernelCalls() as fused_calls:
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert (calls.count, fused_calls.count) == (14, 8)
    torch._dynamo.reset()
    backend = _GraphCalls()
    with torch.no_grad():
        compiled = torch.compile(model, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(compiled, ref, rtol=0, atol=0)
    assert backend.count == 8
    torch._dynamo.reset()


def test_a_group_that_fails_to_stack_is_left_unfused(monkeypatch):
    model = plain_model(8, 128)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
    real_cat = torch.cat
    calls = []

    def failing_cat(tensors, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:  # the first group's three tensors stack; the second group's fail
            raise torch.OutOfMemoryError("no memory for the stack")
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", failing_cat)
    with pytest.raises(torch.OutOfMemoryError, match="no memory"):
        fuse_projections(model)
    monkeypatch.setattr(torch, "cat", real_cat)
    block = model[0]  # its q/k/v stacked, then its gate/up failed
    assert block.q_proj._fused is not None and block.q_proj._fused[0].is_current()
    assert all(m._fused is None for m in (block.gate_proj, block.up_proj))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the activation in a kernel
MLPS = ["model.layers.0.mlp", "model.layers.1.mlp"]
LABELS = {"gate_up": "gate_proj+up_proj+silu", "down": "silu+down_proj"}
WHERE = {"gate_up": "the gate/up kernel", "down": "the down projection"}


@needs_transformers
@pytest.mark.parametrize("place", ["gate_up", "down"])
def test_activation_in_a_kernel_gives_the_unfused_outputs(device, place):
    # int8: each gated MLP's forward runs silu(gate) * up in the fused gate/up kernel's epilogue
    # ("gate_up") or hands the fused gate/up output whole to down_proj, whose kernel makes it
    # ("down"); both on one CUDA row. Other inputs compute it in PyTorch, as the MLP does: several
    # tokens (prefill) are bit for bit; one CUDA token runs the folded kernel.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = quantized_llama(8, 128, device=device, dtype=dtype)
    unfused = copy.deepcopy(model)
    report = fuse_projections(model, activation=True if place == "gate_up" else place)
    assert report.activations == MLPS and report.skipped == {} and report.activation_place == place
    assert f"2 gated MLP(s) run their activation in {WHERE[place]}" in str(report)
    ids = ids_for(device)
    torch.testing.assert_close(logits(model, ids), logits(unfused, ids), rtol=0, atol=0)
    one = ids_for(device, length=1)
    tol = 2e-2 if device == "cuda" else 0
    torch.testing.assert_close(logits(model, one), logits(unfused, one), rtol=tol, atol=tol)
    # Twice is a no-op; unfusing restores the class's forward.
    again = fuse_projections(model, activation=place)
    assert again.activations == [] and again.skipped[f"{MLPS[0]}: {LABELS[place]}"] == "already fused"
    assert unfuse_projections(model) == 4
    assert "forward" not in model.model.layers[0].mlp.__dict__
    torch.testing.assert_close(logits(model, ids), logits(unfused, ids), rtol=0, atol=0)


@needs_transformers
def test_activation_in_the_down_projection_runs_through_gated_forward_and_falls_back(monkeypatch):
    model = quantized_llama(8, 128)
    fuse_projections(model, activation="down")
    mlp = model.model.layers[0].mlp
    calls = []
    gated = WeightOnlyLinear.gated_forward
    monkeypatch.setattr(WeightOnlyLinear, "gated_forward", lambda self, h: calls.append(h.shape) or gated(self, h))
    x = torch.randn(1, 3, 128)
    with torch.no_grad():
        expected = type(mlp).forward(mlp, x)  # the class's forward: gate/up still fused
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    assert calls == [torch.Size([1, 3, 512])]  # gate and up halves of 256 each, whole
    # Gradients into the input: the class's forward (the kernels have no backward).
    calls.clear()
    x.requires_grad_()
    mlp(x).sum().backward()
    assert calls == [] and x.grad is not None and x.grad.abs().sum() > 0
    # A hook on a projection must see its call: the class's forward, hook included.
    seen = []
    handle = mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    handle.remove()
    assert calls == [] and seen == [torch.Size([1, 3, 256])]
    # A projection replaced since (an adapter, say): the class's forward runs the new one.
    mlp.down_proj = nn.Linear(256, 128)
    with torch.no_grad():
        mlp(x.detach())
    assert calls == []


@needs_transformers
def test_activation_in_the_gate_up_kernel_runs_through_gate_up_forward_and_falls_back(monkeypatch):
    model = quantized_llama(8, 128)
    fuse_projections(model, activation=True)
    mlp = model.model.layers[0].mlp
    calls = []
    gate_up = WeightOnlyLinear.gate_up_forward
    monkeypatch.setattr(
        WeightOnlyLinear, "gate_up_forward", lambda self, x: calls.append(self.out_features) or gate_up(self, x)
    )
    x = torch.randn(1, 3, 128)
    with torch.no_grad():
        expected = type(mlp).forward(mlp, x)
        # down_proj runs as a module: its hooks see the activation's output, the fold stays.
        seen = []
        handle = mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
        handle.remove()
    assert calls == [512] and seen == [torch.Size([1, 3, 256])]  # the stack: 256 gate rows, 256 up rows
    # Gradients into the input: the class's forward.
    calls.clear()
    x.requires_grad_()
    mlp(x).sum().backward()
    assert calls == [] and x.grad is not None and x.grad.abs().sum() > 0
    # A hook on gate_proj must see its call: the class's forward.
    handle = mlp.gate_proj.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x.detach()), expected, rtol=0, atol=0)
    handle.remove()
    assert calls == [] and seen[-1] == torch.Size([1, 3, 256])
    # down_proj replaced by a float layer: still folded (down_proj runs as whatever it is).
    mlp.down_proj = nn.Linear(256, 128)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x.detach()), type(mlp).forward(mlp, x.detach()), rtol=0, atol=0)
    assert calls == [512]


@needs_transformers
def test_activation_fusion_reports_what_it_cannot_take(monkeypatch):
    from quantcore_torch import kernels

    model = quantized_llama(4, 32)
    report = fuse_projections(model, activation="down")
    assert report.activations == []
    assert (
        report.skipped[f"{MLPS[0]}: silu+down_proj"]
        == "down_proj is int4: only the int8 kernel takes the activation in"
    )
    assert "forward" not in model.model.layers[0].mlp.__dict__
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "tinygemm")
    report = fuse_projections(model, activation=True)
    assert report.skipped[f"{MLPS[0]}: gate_proj+up_proj+silu"] == (
        "the int4 gate/up kernel takes the activation on the interleaved layout only "
        "(QUANTCORE_INT4_CUDA_KERNEL=interleaved; it is tinygemm)"
    )
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    unfuse_projections(model)
    assert fuse_projections(model, activation=True).activations == MLPS  # int4, with the interleaved kernel
    model = quantized_llama(8, 128)
    model.model.layers[1].mlp.act_fn = nn.GELU()
    report = fuse_projections(model, groups=[("q_proj", "k_proj", "v_proj")], activation=True)
    assert report.activations == []
    assert report.skipped[f"{MLPS[0]}: gate_proj+up_proj+silu"] == (
        "gate_proj and up_proj do not run as one fused group, gate first"
    )
    with pytest.raises(ValueError, match=r"gated_mlps takes class names, e.g. \('LlamaMLP',\), not one string"):
        fuse_projections(model, activation=True, gated_mlps="LlamaMLP")
    with pytest.raises(ValueError, match="activation takes True, False or one of gate_up, down, got 'up'"):
        fuse_projections(model, activation="up")
    report = fuse_projections(model, activation=True, gated_mlps=("SomeOtherMLP",))
    assert report.skipped[f"{MLPS[0]}: gate_proj+up_proj+silu"] == "LlamaMLP is not a known gated MLP (GATED_MLPS)"
    report = fuse_projections(model, activation=True)
    assert report.activations == [MLPS[0]]
    assert report.skipped[f"{MLPS[1]}: gate_proj+up_proj+silu"] == "its activation is GELU, not SiLU"


@needs_transformers
@pytest.mark.parametrize("place", ["gate_up", "down"])
def test_activation_fusion_survives_deepcopy_and_compiles_fullgraph(place):
    model = quantized_llama(8, 128)
    fuse_projections(model, activation=place)
    clone = copy.deepcopy(model)
    mlp = clone.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp and mlp._quantcore_gated.down is mlp.down_proj
    ids = ids_for()
    eager = logits(model, ids)
    torch.testing.assert_close(logits(clone, ids), eager, rtol=0, atol=0)
    torch._dynamo.reset()
    backend = _GraphCalls()
    out = logits(torch.compile(model, backend=backend, fullgraph=True), ids)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    assert backend.count == 8
    torch._dynamo.reset()


def test_gated_forward_is_the_layer_on_silu_gate_times_up():
    from quantcore_torch import kernels

    linear = nn.Linear(64, 32)
    module = WeightOnlyLinear.from_linear(linear, bits=8)
    h = torch.randn(3, 128)
    gate, up = h.chunk(2, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(module.gated_forward(h), module(torch.nn.functional.silu(gate) * up), rtol=0, atol=0)
    with pytest.raises(ValueError, match="gate and up halves of 64 features each \\(128 in all\\), got 96"):
        kernels.int8_gated_linear(h[:, :96], module.qweight, module.scale)


@pytest.mark.parametrize("bits", [8, 4])
def test_gate_up_forward_is_silu_of_the_gate_times_the_up_half(bits):
    from quantcore_torch import kernels

    module = WeightOnlyLinear.from_linear(nn.Linear(64, 96), bits=bits, group_size=32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(module.gate_up_forward(x), kernels.gated_input(module(x)), rtol=0, atol=0)
        assert module.gate_up_forward(x[:1]).shape == (1, 48)
    odd = WeightOnlyLinear.from_linear(nn.Linear(64, 95), bits=bits, group_size=32)
    with pytest.raises(ValueError, match="an even number of outputs, got 95"):
        odd.gate_up_forward(x)
    gate_up = kernels.int8_gate_up_linear if bits == 8 else kernels.int4_gate_up_linear
    tensors = (odd.qweight, odd.scale) if bits == 8 else (odd.qweight, odd.scale, odd.zero, 32)
    with pytest.raises(ValueError, match="an even number of outputs, got 95"):
        gate_up(x, *tensors)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_transformers
@pytest.mark.parametrize("bits", [8, 4])
def test_activation_in_the_gate_up_kernel_under_cuda_graphs(bits, monkeypatch):
    # One token on CUDA: the fused gate/up kernel (int8; int4 on the interleaved layout) writes
    # silu(gate) * up from its epilogue, eager and in CUDA graphs; within bf16 rounding of the
    # unfused model.
    from quantcore_torch import kernels

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    model = quantized_llama(bits, 128, dtype=torch.bfloat16, device="cuda")
    unfused = copy.deepcopy(model)
    assert fuse_projections(model, activation=True).activations == MLPS
    name = "int8_gate_up_mm" if bits == 8 else "int4_interleaved_gate_up_mm"
    folded, real = [], getattr(kernels._TRITON, name)
    ids = ids_for("cuda", length=1)
    with pytest.MonkeyPatch.context() as patch:  # eager only: compiled code must not trace the counter
        patch.setattr(kernels._TRITON, name, lambda *a: folded.append(1) or real(*a))
        torch.testing.assert_close(logits(model, ids), logits(unfused, ids), rtol=2e-2, atol=2e-2)
    assert len(folded) == len(MLPS)
    assert_cuda_graph_replays_match(model, unfused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_transformers
def test_activation_in_the_down_kernel_under_cuda_graphs():
    # One token on CUDA: down_proj's int8 kernel reads the fused gate/up output and makes
    # silu(gate) * up itself, eager and in CUDA graphs; within bf16 rounding of the unfused model.
    from quantcore_torch import kernels

    model = quantized_llama(8, 128, dtype=torch.bfloat16, device="cuda")
    unfused = copy.deepcopy(model)
    assert fuse_projections(model, activation="down").activations == MLPS
    folded = []
    glu_mm = kernels._TRITON.int8_glu_mm
    ids = ids_for("cuda", length=1)
    with pytest.MonkeyPatch.context() as patch:  # eager only: compiled code must not trace the counter
        patch.setattr(kernels._TRITON, "int8_glu_mm", lambda *a: folded.append(1) or glu_mm(*a))
        torch.testing.assert_close(logits(model, ids), logits(unfused, ids), rtol=2e-2, atol=2e-2)
    assert len(folded) == len(MLPS)
    assert_cuda_graph_replays_match(model, unfused)


# ---------------------------------------------------------------------------- rotary in the q/k/v kernel
ATTENTIONS = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def _static_cache(model, length: int):
    try:
        return transformers.StaticCache(config=model.config, max_cache_len=length)
    except TypeError:  # transformers 4.x before the cache refactor wants the batch too
        return transformers.StaticCache(config=model.config, max_batch_size=1, max_cache_len=length)


def decode_step(model, token, cache, position):
    """One forward on the static ``cache`` at ``position``: its logits (what a test compiles)."""
    return model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits


def static_decode(model, ids, steps: int, step=None) -> torch.Tensor:
    """Greedy decoding with transformers' static cache, gpt-fast style: the prompt's prefill, then
    ``steps`` one-token steps (through ``step(model, token, cache, position)`` where given); the
    last position's logits of every call, ``[1, steps + 1, vocab]``."""
    cache = _static_cache(model, ids.shape[1] + steps)
    step = step or decode_step
    out = []
    with torch.no_grad():
        last = decode_step(model, ids, cache, torch.arange(ids.shape[1], device=ids.device))[:, -1:]
        out.append(last)
        for i in range(steps):
            position = torch.tensor([ids.shape[1] + i], device=ids.device)
            last = step(model, last.argmax(-1), cache, position)[:, -1:].clone()
            out.append(last)
    return torch.cat(out, dim=1)


def _normed(layer, x, sq, eps):
    """``layer`` on ``rms_norm(h)`` from ``x = g * h`` and the counter ``sq`` (``sum(h**2)``), as
    the folded kernels compute it: the sums scaled by ``rsqrt(sum / K + eps)``, then the bias."""
    r = torch.rsqrt(sq.double() / SUMSQ_SCALE / x.shape[-1] + eps).float()
    y = (x.float() @ layer.dequantized_weight(torch.float32).T) * r
    return (y if layer.bias is None else y + layer.bias.float()).to(x.dtype)


def _rotary_in_pytorch(calls):
    """``WeightOnlyLinear.qkv_rope_forward`` as its kernel computes it, in PyTorch ops: the stacked
    projections (after a folded norm: :func:`_normed`), transformers' rotation, the cache's writes
    at the position (counted in ``calls``)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def qkv_rope_forward(self, x, cos, sin, keys, values, position, q_features, sq=None, eps=0.0):
        calls.append(self.out_features)
        head = keys.shape[-1]
        kv = keys.shape[1] * head
        y = self(x) if sq is None else _normed(self, x, sq, eps)
        q, k, v = y.split((q_features, kv, kv), dim=-1)
        shape = (*x.shape[:-1], -1, head)
        q, k = apply_rotary_pos_emb(q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), cos, sin)
        keys.index_copy_(2, position.view(1), k)
        values.index_copy_(2, position.view(1), v.view(shape).transpose(1, 2))
        return q.transpose(1, 2).reshape(*x.shape[:-1], q_features)

    return qkv_rope_forward


def tiny_causal(family: str) -> nn.Module:
    """A small random model of ``family`` (``llama``, ``mistral``, ``qwen2``), torch_wo int4 g32."""
    if family == "llama":
        return quantized_llama(4, 32)
    sizes = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    if family == "mistral":
        config = transformers.MistralConfig(**sizes, vocab_size=300, sliding_window=None)
        model_class = transformers.MistralForCausalLM
    else:  # Qwen2: q/k/v with biases, full attention in every layer by default
        config = transformers.Qwen2Config(**sizes, vocab_size=300)
        model_class = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = model_class(config).eval()
    quantcore.quantize(model, TorchWeightOnlyConfig(bits=4, group_size=32), progress=False)
    return model


@needs_transformers
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_rotary_in_the_qkv_kernel_gives_the_unfolded_decoding(family, monkeypatch):
    # The attention's patched forward around the kernel (its position, the cache's count, the
    # attention on the cache with the class's own arguments, o_proj), with the kernel's function
    # in PyTorch: every decode step takes it, the prefill does not, and the logits are the fused
    # model's bit for bit.
    from quantcore_torch import kernels

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    model = tiny_causal(family)
    fuse_projections(model, activation=True)
    unfolded = copy.deepcopy(model)
    report = fuse_projections(model, rotary=True)
    assert report.rotary == ATTENTIONS and "rotate q and k" in str(report)
    calls = []
    monkeypatch.setattr(WeightOnlyLinear, "qkv_rope_forward", _rotary_in_pytorch(calls))
    ids = ids_for()
    expected = static_decode(unfolded, ids, steps=5)
    torch.testing.assert_close(static_decode(model, ids, steps=5), expected, rtol=0, atol=0)
    assert calls == [256] * 5 * len(ATTENTIONS)  # 128 q rows, 64 k rows, 64 v rows: decode steps only
    if family != "llama":
        return
    # Without a static cache (a dynamic one, or none), the attention's own forward.
    calls.clear()
    torch.testing.assert_close(logits(model, ids), logits(unfolded, ids), rtol=0, atol=0)
    with torch.no_grad():
        out = model(ids[:, :3], use_cache=True)
        dynamic = model(ids[:, 3:4], past_key_values=out.past_key_values, use_cache=True).logits
    assert calls == [] and torch.isfinite(dynamic).all()
    # A hook on k_proj must see its call: the attention's own forward.
    seen = []
    handle = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    # (The hooked member may run on its own rows rather than the stack's: fp32 rounding apart.)
    torch.testing.assert_close(static_decode(model, ids, steps=2), expected[:, :3], rtol=1e-5, atol=1e-6)
    handle.remove()
    assert len(seen) == 3 and calls == [256] * 2  # layer 1 still folds; layer 0's hook saw every call
    # Undone, and kept through a deep copy.
    clone = copy.deepcopy(model)
    assert clone.model.layers[0].self_attn.forward.__self__ is clone.model.layers[0].self_attn
    assert unfuse_projections(model) == 4 and "forward" not in model.model.layers[0].self_attn.__dict__


@needs_transformers
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_rotary_fold_runs_sdpa_attention_as_the_decode_attention_kernels(family, implementation, monkeypatch):
    # Where the class would run SDPA, the folded attention hands q, the cache and the mask to
    # kernels.decode_attention (here its function in PyTorch, SDPA on the repeated key/value
    # heads): the unfolded model's logits within fp32 rounding. The eager attention function
    # stays the class's, bit for bit.
    from quantcore_torch import kernels

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    model = tiny_causal(family)
    model.config._attn_implementation = implementation
    fuse_projections(model, activation=True)
    unfolded = copy.deepcopy(model)
    fuse_projections(model, rotary=True)
    monkeypatch.setattr(WeightOnlyLinear, "qkv_rope_forward", _rotary_in_pytorch([]))
    calls = []

    # The kernels advance transformers 5's token count (4.x's static cache writes at cache_position).
    layers = getattr(_static_cache(model, 8), "layers", None)
    counted = bool(layers) and hasattr(layers[0], "cumulative_length")

    def decode_attention(q, keys, values, mask, scale, counter=None):
        assert (counter is not None) == counted
        calls.append((tuple(q.shape), tuple(keys.shape), None if mask is None else tuple(mask.shape), scale))
        if counter is not None:
            counter.add_(1)
        groups = q.numel() // keys.shape[1] // keys.shape[-1]
        query = q.view(1, -1, 1, keys.shape[-1])
        k, v = (t.repeat_interleave(groups, dim=1) for t in (keys, values))
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2)

    monkeypatch.setattr(kernels, "decode_attention", decode_attention)
    ids = ids_for()
    expected = static_decode(unfolded, ids, steps=5)
    out = static_decode(model, ids, steps=5)
    if implementation == "eager":
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert calls == []
        return
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.argmax(-1), expected.argmax(-1))
    length = ids.shape[1] + 5
    head = model.config.hidden_size // model.config.num_attention_heads
    step = ((1, 1, 128), (1, 2, length, head), (1, 1, 1, length), head**-0.5)
    assert calls == [step] * 5 * len(ATTENTIONS)
    # Without it (bench_decode's +rope-sdpa), the class's attention function: bit for bit.
    for name in ATTENTIONS:
        attention = model.get_submodule(name)
        attention._quantcore_rotary = attention._quantcore_rotary._replace(own_attention=False)
    calls.clear()
    torch.testing.assert_close(static_decode(model, ids, steps=5), expected, rtol=0, atol=0)
    assert calls == []


@needs_transformers
def test_rotary_in_the_qkv_kernel_compiles_fullgraph(monkeypatch):
    # The folded attention traced whole: the compiled decode steps give the eager tokens.
    from quantcore_torch import kernels

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    model = quantized_llama(4, 32)
    fuse_projections(model, activation=True, rotary=True)
    calls = []
    monkeypatch.setattr(WeightOnlyLinear, "qkv_rope_forward", _rotary_in_pytorch(calls))
    ids = ids_for()
    eager = static_decode(model, ids, steps=4)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda model, token, cache, position: (
            model(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits
        ),
        fullgraph=True,
    )
    out = static_decode(model, ids, steps=4, step=compiled)
    torch._dynamo.reset()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.argmax(-1), eager.argmax(-1))


@needs_transformers
def test_rotary_fusion_reports_what_it_cannot_take(monkeypatch):
    from quantcore_torch import kernels

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "tinygemm")
    model = quantized_llama(4, 32)
    report = fuse_projections(model, rotary=True)
    label = f"{ATTENTIONS[0]}: q_proj+k_proj+v_proj+rotary+cache"
    assert report.rotary == [] and report.skipped[label] == (
        "the int4 q/k/v rotary kernel runs on the interleaved layout only "
        "(QUANTCORE_INT4_CUDA_KERNEL=interleaved; it is tinygemm)"
    )
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    unfuse_projections(model)
    report = fuse_projections(model, groups=[("gate_proj", "up_proj")], rotary=True)
    assert report.skipped[label] == "q_proj, k_proj and v_proj do not run as one fused group, in that order"
    unfuse_projections(model)
    assert fuse_projections(model, rotary=True).rotary == ATTENTIONS
    assert fuse_projections(model, rotary=True).skipped[label] == "already fused"
    # int8 has its own rotary kernel, whatever the int4 setting says.
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "tinygemm")
    assert fuse_projections(quantized_llama(8, 128), rotary=True).rotary == ATTENTIONS


@needs_transformers
def test_int8_rotary_in_the_qkv_kernel_gives_the_unfolded_decoding(monkeypatch):
    # An int8 Llama folds as an int4 one does: every decode step takes the q/k/v rotary path (its
    # kernel's function in PyTorch), the logits are the fused model's bit for bit. On the CPU the
    # real path declines (None, nothing written) and the attention's own forward runs.
    model = quantized_llama(8, 128)
    fuse_projections(model, activation=True)
    unfolded = copy.deepcopy(model)
    assert fuse_projections(model, rotary=True).rotary == ATTENTIONS
    ids = ids_for()
    expected = static_decode(unfolded, ids, steps=4)
    torch.testing.assert_close(static_decode(model, ids, steps=4), expected, rtol=0, atol=0)
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WeightOnlyLinear, "qkv_rope_forward", _rotary_in_pytorch(calls))
        torch.testing.assert_close(static_decode(model, ids, steps=4), expected, rtol=0, atol=0)
    assert len(calls) == 4 * len(ATTENTIONS)
    qkv = model.model.layers[0].self_attn.q_proj._fused[0].linear
    x = torch.randn(1, 1, qkv.in_features)
    keys = torch.zeros(1, 2, 8, 32)
    one = torch.ones(32)
    assert qkv.qkv_rope_forward(x, one, one, keys, keys.clone(), torch.tensor(0), 128) is None
    assert not keys.any()
    counter = torch.zeros((), dtype=torch.int64)
    assert qkv.qkv_rope_forward(x, one, one, keys, keys.clone(), torch.tensor(0), 128, sq=counter) is None
    assert not qkv.norm_fold_takes(x.half())  # the CPU: the norm fold's kernels are CUDA only
    with pytest.raises(ValueError, match="int8 kernels take one fp16 / bf16 row on CUDA"):
        qkv.norm_forward(x, counter, 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_transformers
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_rotary_in_the_qkv_kernel_on_cuda_eager_and_in_cuda_graphs(bits, monkeypatch):
    # The real kernel (int4 interleaved, or int8): q rotated, k and v in the cache, at every
    # decode step; eager and replayed from CUDA graphs, within bf16 rounding of the unfolded
    # model's decoding.
    from quantcore_torch import kernels

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    model = quantized_llama(bits, 128, dtype=torch.bfloat16, device="cuda")
    fuse_projections(model, activation=True)
    unfolded = copy.deepcopy(model)
    assert fuse_projections(model, rotary=True).rotary == ATTENTIONS
    ids = ids_for("cuda", length=7)
    expected = static_decode(unfolded, ids, steps=6)
    name = "int4_interleaved_qkv_rope" if bits == 4 else "int8_qkv_rope"
    folded, real = [], getattr(kernels._TRITON, name)
    with pytest.MonkeyPatch.context() as patch:  # eager only: compiled code must not trace the counter
        patch.setattr(kernels._TRITON, name, lambda *a: folded.append(1) or real(*a))
        torch.testing.assert_close(static_decode(model, ids, steps=6), expected, rtol=2e-2, atol=2e-2)
    assert len(folded) == 6 * len(ATTENTIONS)
    torch._dynamo.reset()

    compiled = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    for _ in range(2):  # recorded, then replayed on a fresh cache
        torch.testing.assert_close(static_decode(model, ids, steps=6, step=compiled), expected, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("trigger", ["late", "early"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_programmatic_launches_decode_a_folded_model_to_the_same_bits(bits, trigger, monkeypatch):
    # TORCHINDUCTOR_ENABLE_PDL=1's settings: inductor's kernels and ours (the q/k/v rotary kernel,
    # the attention's two, the o, gate/up and down projections) launched programmatically in the
    # captured graph of a compiled step, each letting the next one start early. The logits of
    # every step are the ones the same graph gives with ordinary launches, bit for bit.
    import torch._inductor.config
    from quantcore_torch import kernels

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    triton_mod = kernels._TRITON
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    model = quantized_llama(bits, 128, dtype=torch.bfloat16, device="cuda")
    fuse_projections(model, activation=True)
    assert fuse_projections(model, rotary=True).rotary == ATTENTIONS
    ids = ids_for("cuda", length=7)

    torch._dynamo.reset()
    compiled = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    static_decode(model, ids, steps=6, step=compiled)  # recorded
    expected = static_decode(model, ids, steps=6, step=compiled)  # replayed
    torch._dynamo.reset()
    monkeypatch.setattr(triton_mod, "PDL", True)
    monkeypatch.setattr(triton_mod, "PDL_TRIGGER", trigger)
    triton_mod.forget_pdl_variants()
    with torch._inductor.config.patch({"triton.enable_pdl": True}):
        compiled = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
        for _ in range(2):
            torch.testing.assert_close(static_decode(model, ids, steps=6, step=compiled), expected, rtol=0, atol=0)
    built = [e for launcher in triton_mod._LAUNCHERS for e in launcher.compiled.values() if e.pdl]
    names = {e.pdl[0].name for e in built}
    ours = ["_int4_interleaved_rope_kernel", "_int4_interleaved_kernel"]
    if bits == 8:
        ours = ["_int8_rope_kernel", "_int8_row_kernel"]
    for kernel in (*ours, "_decode_attention_split_kernel"):
        assert kernel in names, names
    torch._dynamo.reset()
    triton_mod.forget_pdl_variants()


# ----------------------------------------------------------------------------- norms folded
LAYERS = ["model.layers.0", "model.layers.1"]


def _fold_in_pytorch(monkeypatch, calls):
    """The folded kernels' functions in PyTorch ops, as they compute (``WeightOnlyLinear``'s
    ``qkv_rope_forward`` with a counter, ``norm_forward``, ``residual_forward``), taking one row
    as the kernels do; each call is logged in ``calls`` with the counters it got."""
    rotary = _rotary_in_pytorch([])

    def qkv_rope_forward(self, x, cos, sin, keys, values, position, q_features, sq=None, eps=0.0):
        if x.numel() != x.shape[-1]:
            return None  # one token only, as the kernel
        calls.append(("qkv", sq))
        return rotary(self, x, cos, sin, keys, values, position, q_features, sq, eps)

    def norm_forward(self, x, sq, eps, gate_up=False):
        calls.append(("norm", sq))
        y = _normed(self, x, sq, eps)
        return gated_input(y) if gate_up else y

    def residual_forward(self, x, h, gain, sq, clear):
        y = (h.float() + self(x).float()).to(h.dtype)
        calls.append(("residual", sq, clear, y))
        sq.add_(sumsq_counter(y))
        clear.zero_()
        return y, rms_input(y, gain)

    monkeypatch.setattr(WeightOnlyLinear, "norm_fold_takes", lambda self, x: x.numel() == x.shape[-1])
    monkeypatch.setattr(WeightOnlyLinear, "qkv_rope_forward", qkv_rope_forward)
    monkeypatch.setattr(WeightOnlyLinear, "norm_forward", norm_forward)
    monkeypatch.setattr(WeightOnlyLinear, "residual_forward", residual_forward)


def folded_causal(family: str, monkeypatch, dtype=torch.float32, device="cpu", bits=4):
    """``tiny_causal(family)`` (``bits``: 8, a Llama in int8) with random norm weights (ones would
    hide a norm's weight in the wrong place), fused with the activation and the rotary fold:
    ``(model, unfolded copy)``, the model's norms folded too."""
    from quantcore_torch import kernels

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    group = 32 if device == "cpu" and bits == 4 else 128
    model = quantized_llama(bits, group, dtype, device) if family == "llama" else tiny_causal(family)
    torch.manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    fuse_projections(model, activation=True, rotary=True)
    unfolded = copy.deepcopy(model)
    report = fuse_projections(model, norms=True)
    assert report.norms == LAYERS and "2 decoder layer(s) run their norms and residual adds" in str(report)
    return model, unfolded


FOLDED = [("llama", 4), ("mistral", 4), ("qwen2", 4), ("llama", 8)]


@needs_transformers
@pytest.mark.parametrize(("family", "bits"), FOLDED, ids=["llama", "mistral", "qwen2", "llama-int8"])
def test_folded_norms_give_the_unfolded_decoding(family, bits, monkeypatch):
    # Each decode step runs q/k/v, o, gate/up and down a layer with the norms and adds folded in
    # (their functions in PyTorch here): the unfolded model's logits within fp32 rounding. The
    # counters pass as the kernels need: layer 0 reads one made from its input, o_proj adds to
    # ``mid`` and clears ``out``, down_proj adds to ``out`` and clears ``mid``; a step leaves
    # ``mid`` zero and ``out`` holding the last layer's sum.
    model, unfolded = folded_causal(family, monkeypatch, bits=bits)
    calls = []
    _fold_in_pytorch(monkeypatch, calls)
    ids = ids_for()
    expected = static_decode(unfolded, ids, steps=5)
    calls.clear()
    out = static_decode(model, ids, steps=5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.argmax(-1), expected.argmax(-1))
    assert [c[0] for c in calls] == ["qkv", "residual", "norm", "residual"] * len(LAYERS) * 5  # decode only
    owner = model.model.layers[0]
    mid, last = owner._quantcore_sum_mid, owner._quantcore_sum_out
    step = calls[-8:]
    assert step[0][1] is not mid and step[0][1] is not last  # made from layer 0's input
    assert step[1][1] is mid and step[1][2] is last and step[2][1] is mid
    assert step[3][1] is last and step[3][2] is mid and step[4][1] is last
    assert step[5][1] is mid and step[5][2] is last and step[7][1] is last and step[7][2] is mid
    assert mid.item() == 0 and last.item() == sumsq_counter(step[7][3]).item() > 0
    assert model.model.layers[0]._quantcore_fold.chain.h is None  # nothing kept alive between steps
    # The state dict has no counters, and the unfolded model loads it.
    assert model.state_dict().keys() == unfolded.state_dict().keys()


@needs_transformers
def test_folded_norms_fall_back_per_layer_and_recover_a_step_stopped_midway(monkeypatch):
    # A hook on a layer's norm: that layer runs its own forward (its attention still rotary), the
    # other still folds, and the next layer starts from its input. A step stopped between o_proj
    # and down_proj leaves ``mid`` non-zero: the next step zeroes it first.
    model, unfolded = folded_causal("llama", monkeypatch)
    calls = []
    _fold_in_pytorch(monkeypatch, calls)
    ids = ids_for()
    expected = static_decode(unfolded, ids, steps=4)
    seen = []
    handle = model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda *a: seen.append(1))
    calls.clear()
    torch.testing.assert_close(static_decode(model, ids, steps=4), expected, rtol=1e-4, atol=1e-4)
    handle.remove()
    assert [c[0] for c in calls] == ["qkv", "residual", "norm", "residual", "qkv"] * 4
    assert calls[-1][1] is None and len(seen) == 5  # layer 1: its own norm, prefill included

    def stop(self, x, sq, eps, gate_up=False):
        raise RuntimeError("stopped")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WeightOnlyLinear, "norm_forward", stop)
        with pytest.raises(RuntimeError, match="stopped"):
            static_decode(model, ids, steps=1)
    assert model.model.layers[0]._quantcore_sum_mid.item() > 0
    torch.testing.assert_close(static_decode(model, ids, steps=4), expected, rtol=1e-4, atol=1e-4)
    assert model.model.layers[0]._quantcore_sum_mid.item() == 0
    # What a step stopped in layer 1 leaves handed on (an output of layer 0's, here a stale one
    # with a wrong norm input): the next step's layer 0 gets another tensor and makes its own.
    chain, first = model.model.layers[0]._quantcore_fold.chain, model.model.layers[0]

    def stale_then_step(*args):
        chain.hand_on(torch.zeros(1, 1, 128), torch.randn(1, 1, 128), first)
        return decode_step(*args)

    torch.testing.assert_close(static_decode(model, ids, 4, stale_then_step), expected, rtol=1e-4, atol=1e-4)


@needs_transformers
def test_folded_norms_compile_fullgraph(monkeypatch):
    # The folded layers traced whole, the counters mutated in the graph: the eager tokens.
    model, _ = folded_causal("llama", monkeypatch)
    _fold_in_pytorch(monkeypatch, [])
    ids = ids_for()
    eager = static_decode(model, ids, steps=4)
    torch._dynamo.reset()
    compiled = torch.compile(decode_step, fullgraph=True)
    counter = model.model.layers[0]._quantcore_sum_out
    for _ in range(2):
        counter.zero_()
        out = static_decode(model, ids, steps=4, step=compiled)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.argmax(-1), eager.argmax(-1))
        assert counter.item() > 0  # the compiled steps folded
    torch._dynamo.reset()


@needs_transformers
def test_norm_fold_reports_what_it_cannot_take_and_unfuses(monkeypatch):
    from quantcore_torch import kernels

    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    model = quantized_llama(4, 32)
    label = "model.layers.0: rms norms+residual adds"
    report = fuse_projections(model, activation=True, norms=True)
    assert report.norms == [] and report.skipped[label] == (
        "its attention does not run the rotary q/k/v kernel (fuse_projections(rotary=True))"
    )
    report = fuse_projections(model, rotary=True, norms=True)
    assert report.norms == LAYERS and fuse_projections(model, norms=True).skipped[label] == "already folded"
    clone = copy.deepcopy(model)
    fold = clone.model.layers[1]._quantcore_fold
    assert (
        fold.chain.owner is clone.model.layers[0]
        and clone.model.layers[0]._quantcore_fold.next is clone.model.layers[1]
    )
    assert (
        fold.attention is clone.model.layers[1].self_attn
        and clone.model.layers[1].forward.__self__ is clone.model.layers[1]
    )
    assert unfuse_projections(model) == 4
    layer = model.model.layers[0]
    assert "forward" not in layer.__dict__ and not hasattr(layer, "_quantcore_fold")
    assert not [name for name, _ in model.named_buffers() if "_quantcore" in name]
    model = quantized_llama(8, 128)
    report = fuse_projections(model, activation=True, rotary=True, norms=True)
    # int8 folds as int4 does: the rotary embedding, the activation, the norms.
    assert report.rotary == ATTENTIONS and report.norms == LAYERS
    model = quantized_llama(8, 128)
    model.model.layers[0].self_attn.o_proj = nn.Linear(128, 128)
    report = fuse_projections(model, activation=True, rotary=True, norms=True)
    assert report.skipped[label] == "o_proj is not an int8 or int4 torch_wo layer"
    model = quantized_llama(4, 32)
    model.model.layers[1].forward = model.model.layers[1].forward  # as accelerate's hooks do
    report = fuse_projections(model, activation=True, rotary=True, norms=True)
    assert report.norms == ["model.layers.0"]
    assert report.skipped["model.layers.1: rms norms+residual adds"].startswith("its forward is replaced")
    assert model.model.layers[0]._quantcore_fold.next is None


def test_norm_fold_kernels_refuse_what_they_cannot_take():
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32)
    x = torch.randn(1, 64)
    assert not layer.norm_fold_takes(x)
    with pytest.raises(ValueError, match="one fp16 / bf16 row on CUDA and a weight in the interleaved int4 layout"):
        layer.norm_forward(x, sumsq_counter(x), 1e-6)
    with pytest.raises(ValueError, match="one fp16 / bf16 row on CUDA"):
        layer.residual_forward(x, torch.zeros(32), torch.ones(32), sumsq_counter(), sumsq_counter())
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 32), bits=8)
    assert not layer.norm_fold_takes(x) and not layer.norm_fold_takes(x.half())
    with pytest.raises(ValueError, match="int8 kernels take one fp16 / bf16 row on CUDA"):
        layer.norm_forward(x, sumsq_counter(x), 1e-6)
    with pytest.raises(ValueError, match="int8 kernels take one fp16 / bf16 row on CUDA"):
        layer.residual_forward(x, torch.zeros(32), torch.ones(32), sumsq_counter(), sumsq_counter())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_transformers
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_folded_norms_on_cuda_eager_and_in_cuda_graphs(bits, monkeypatch):
    # The real kernels at every decode step: within bf16 rounding of the unfolded model's
    # decoding, eager and from CUDA graphs; a graph's replays give its recording's bits (the
    # counters are cleared inside the graph, no reset between replays).
    from quantcore_torch import kernels

    model, unfolded = folded_causal("llama", monkeypatch, torch.bfloat16, "cuda", bits=bits)
    ids = ids_for("cuda", length=7)
    expected = static_decode(unfolded, ids, steps=6)
    name = "int4_interleaved_residual_mm" if bits == 4 else "int8_residual_mm"
    residual, real = [], getattr(kernels._FOLD, name)
    with pytest.MonkeyPatch.context() as patch:  # eager only
        patch.setattr(kernels._FOLD, name, lambda *a: residual.append(1) or real(*a))
        torch.testing.assert_close(static_decode(model, ids, steps=6), expected, rtol=2e-2, atol=2e-2)
    assert len(residual) == 6 * 2 * len(LAYERS)
    torch._dynamo.reset()
    owner = model.model.layers[0]
    owner._quantcore_sum_out.zero_()
    compiled = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
    recorded = static_decode(model, ids, steps=6, step=compiled)
    torch.testing.assert_close(recorded, expected, rtol=2e-2, atol=2e-2)
    assert owner._quantcore_sum_out.item() > 0  # the compiled steps ran the residual kernels
    for _ in range(2):
        torch.testing.assert_close(static_decode(model, ids, steps=6, step=compiled), recorded, rtol=0, atol=0)
    torch._dynamo.reset()
    assert owner._quantcore_sum_mid.item() == 0
