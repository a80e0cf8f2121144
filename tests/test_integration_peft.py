"""PEFT LoRA on quantcore's quantized layers, with a plain LoraConfig and nothing registered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import quantcore
from quantcore.layers import QuantizedLinear

peft = pytest.importorskip("peft", reason="peft is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
quantcore_torch = pytest.importorskip("quantcore_torch", reason="the quantcore-torch distribution is not installed")

from quantcore_torch import TorchWeightOnlyConfig, WeightOnlyLinear  # noqa: E402

IDS = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
CONFIGS = [TorchWeightOnlyConfig(bits=4, group_size=32), TorchWeightOnlyConfig(bits=8)]


def tiny_llama(config=None) -> nn.Module:
    """A float32 Llama (biased attention projections), quantized with ``config`` when given."""
    model_config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(model_config)
    if config is not None:
        quantcore.quantize(model, config)
    return model


def lora(model: nn.Module, **kwargs) -> nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=TARGETS, **kwargs))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train(model: nn.Module, steps: int = 6) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("config", CONFIGS, ids=["int4", "int8"])
def test_lora_trains_adapters_on_frozen_quantized_layers(config):
    model = tiny_llama(config)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = lora(model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, peft.tuners.lora.Linear) and isinstance(layer.base_layer, WeightOnlyLinear)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    losses = train(peft_model)
    assert losses[-1] < losses[0] - 0.05, losses
    after = {k.replace(".base_layer", ""): v for k, v in peft_model.base_model.model.state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # quantized weights and biases untouched


def test_backward_keeps_no_float_weight():
    """The backward re-dequantizes: autograd saves no float weight, and the input's gradient is right."""
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32)
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    assert (32, 64) not in saved
    out.pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_()
    nn.functional.linear(reference, layer.dequantize(), layer.bias.detach()).pow(2).sum().backward()
    assert torch.allclose(x.grad, reference.grad, atol=1e-6)


def test_adapter_saves_and_loads(tmp_path):
    peft_model = lora(tiny_llama(CONFIGS[0]), init_lora_weights=False)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(CONFIGS[0]), tmp_path)
    assert torch.equal(logits(loaded), expected)


@pytest.mark.parametrize(
    ("config", "bound", "safe_merge"),
    [(CONFIGS[0], 0.15, False), (CONFIGS[1], 0.02, True)],  # PEFT's two merge paths: += and .data =
    ids=["int4", "int8-safe"],
)
def test_merge_and_unload_requantizes(config, bound, safe_merge):
    base = logits(tiny_llama(config))
    peft_model = lora(tiny_llama(config), init_lora_weights=False)
    with_adapter = logits(peft_model)
    assert rel(with_adapter, base) > 0.3  # the adapter changes the outputs a lot ...
    merged = peft_model.merge_and_unload(safe_merge=safe_merge)
    assert isinstance(merged.model.layers[0].mlp.up_proj, WeightOnlyLinear)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # ... and the merged, re-quantized model keeps that change, up to the re-quantization error
    assert rel(logits(merged), with_adapter) < bound


def test_merge_refuses_a_layer_that_cannot_requantize():
    class Frozen(QuantizedLinear):
        def __init__(self, linear: nn.Linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("stored", linear.weight.detach().clone())
            self.bias = nn.Parameter(linear.bias.detach().clone())

        def dequantize(self, dtype=None):
            return self.stored.to(dtype or self.stored.dtype)

        def forward(self, x):
            return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)

    model = nn.Sequential(nn.Linear(16, 16))
    model[0] = Frozen(model[0])
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    with pytest.raises(NotImplementedError, match="cannot re-quantize a new weight"):
        peft_model.merge_and_unload()


def test_weight_view_cannot_be_replaced():
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 32), bits=8)
    assert isinstance(layer, nn.Linear) and layer.weight.shape == (32, 64)
    with pytest.raises(AttributeError, match=r"weight\.data = tensor"):
        layer.weight = torch.zeros(32, 64)
    with pytest.raises(ValueError, match=r"float weight of shape \(32, 64\)"):
        layer.weight.data = torch.zeros(64, 32)


@pytest.mark.parametrize(
    "write",
    [
        lambda layer, w: setattr(layer.weight, "data", w),  # PEFT < 0.22's safe merge
        lambda layer, w: layer.weight.data.copy_(w),  # PEFT 0.22's safe merge
        lambda layer, w: layer.weight.data.add_(w - layer.weight),
        lambda layer, w: layer.weight.data.sub_(layer.weight - w),
    ],
    ids=["assign", "copy_", "add_", "sub_"],
)
def test_every_write_through_the_weight_views_data_requantizes_once(write, monkeypatch):
    # The ways libraries write a merged weight through .data: each re-quantizes the layer once,
    # and the layer then computes with the written weight (to int8's rounding).
    torch.manual_seed(0)
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 32), bits=8)
    target = torch.randn(32, 64) * 0.05
    calls = []
    requantize = WeightOnlyLinear.requantize_
    monkeypatch.setattr(WeightOnlyLinear, "requantize_", lambda self, w: calls.append(1) or requantize(self, w))
    write(layer, target)
    assert len(calls) == 1
    assert ((layer.dequantize() - target).abs() <= target.abs().amax(1, keepdim=True) / 127).all()  # an int8 step
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.dequantize(), layer.bias), rtol=1e-5, atol=1e-5)


def test_augmented_assignment_through_data_requantizes_once(monkeypatch):
    # PEFT's plain merge, `weight.data += delta`: the in-place add on the copy, then one re-quantization
    # through the view's setter (not a second one from the add).
    torch.manual_seed(1)
    layer = WeightOnlyLinear.from_linear(nn.Linear(64, 32), bits=8)
    before, delta = layer.dequantize(), torch.randn(32, 64) * 0.05
    calls = []
    requantize = WeightOnlyLinear.requantize_
    monkeypatch.setattr(WeightOnlyLinear, "requantize_", lambda self, w: calls.append(1) or requantize(self, w))
    layer.weight.data += delta
    assert len(calls) == 1
    merged = before + delta
    assert ((layer.dequantize() - merged).abs() <= merged.abs().amax(1, keepdim=True) / 127).all()
    # A write that bypasses .data changes the read copy only, as with any computed tensor.
    layer.weight.add_(1.0)
    assert len(calls) == 1


def test_quantcore_never_quantizes_a_quantized_linear_again():
    model = tiny_llama(CONFIGS[1])
    report = quantcore.quantize(model, TorchWeightOnlyConfig(bits=4, group_size=32), dry_run=True)
    assert report.quantized == []


def test_qlora_on_transformers_bitsandbytes_still_works(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    tiny_llama().save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        dtype=torch.float32,
        device_map="cpu",
    )
    peft_model = lora(model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, peft.tuners.lora.bnb.Linear4bit)
    losses = train(peft_model)
    assert losses[-1] < losses[0] - 0.05, losses
