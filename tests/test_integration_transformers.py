"""quantcore backends in transformers' from_pretrained / save_pretrained (quantcore.integrations.transformers)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import quantcore

from .half_backend import HalfLinear, make_plugin

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("accelerate", reason="accelerate is not installed")
quantcore_torch = pytest.importorskip("quantcore_torch", reason="the quantcore-torch distribution is not installed")
try:
    import quantcore.integrations.transformers as qt
except ImportError as exc:  # transformers 4.x: the module says why
    pytest.skip(str(exc), allow_module_level=True)

from quantcore_torch import TorchWeightOnlyConfig, WeightOnlyLinear  # noqa: E402

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_llama() -> nn.Module:
    """A float32 Llama with biased attention projections (random biases, so losing one shows)."""
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model


@pytest.fixture
def float_folder(tmp_path):
    folder = tmp_path / "float"
    tiny_llama().save_pretrained(folder)
    return folder


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def quantized_by_quantcore(config) -> nn.Module:
    model = tiny_llama()
    quantcore.quantize(model, config)
    return model


def test_registers_methods_transformers_lacks_and_leaves_native_ones():
    assert "torch_wo" in qt.registered_methods()
    assert qt.register() == []  # idempotent: a second call adds nothing and raises nothing
    mapping = transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING
    assert mapping["torch_wo"] is qt.QuantcoreHfQuantizer
    assert mapping["bitsandbytes_4bit"] is not qt.QuantcoreHfQuantizer  # transformers' own
    assert "bitsandbytes" not in qt.registered_methods()


@pytest.mark.parametrize("device_map", [None, "auto"])
@pytest.mark.parametrize(
    "config", [TorchWeightOnlyConfig(bits=4, group_size=32), TorchWeightOnlyConfig(bits=8)], ids=["int4", "int8"]
)
def test_from_pretrained_quantizes_while_loading(float_folder, config, device_map):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        float_folder, quantization_config=config, device_map=device_map
    )
    expected = quantized_by_quantcore(config)
    # the same modules, the same tensors, biases included, as quantcore.quantize on the float model
    assert {n for n, m in model.named_modules() if isinstance(m, WeightOnlyLinear)} == {
        n for n, m in expected.named_modules() if isinstance(m, WeightOnlyLinear)
    }
    assert type(model.lm_head) is nn.Linear
    ours, theirs = model.state_dict(), expected.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(logits(model), logits(expected))
    state = quantcore.get_quantization_state(model)
    assert state is not None and len(state.modules) == 14 and state.config == config


def test_save_pretrained_then_plain_from_pretrained(float_folder, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        float_folder, quantization_config=TorchWeightOnlyConfig(bits=4, group_size=32)
    )
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "torch_wo" and saved["bits"] == 4
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, WeightOnlyLinear)
    assert torch.equal(logits(reloaded), logits(model))
    # ... and quantcore reads transformers' checkpoint too
    assert torch.equal(logits(quantcore.from_pretrained(tmp_path / "saved")), logits(model))


def test_quantcore_checkpoint_loads_in_transformers(tmp_path):
    model = quantized_by_quantcore(TorchWeightOnlyConfig(bits=8))
    quantcore.save_quantized(model, tmp_path / "qc")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qc")
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, WeightOnlyLinear)
    assert torch.equal(logits(reloaded), logits(model))


def test_third_party_backend_needs_no_transformers_code(float_folder, tmp_path):
    quantcore.register_plugin(make_plugin("half_tf"), name="half-tf")
    assert qt.register() in (["half_tf"], [])  # [] when an earlier test in this process registered it
    config = quantcore.AutoQuantizationConfig.from_dict({"quant_method": "half_tf"})
    model = transformers.AutoModelForCausalLM.from_pretrained(float_folder, quantization_config=config)
    assert isinstance(model.model.layers[0].mlp.up_proj, HalfLinear) and type(model.lm_head) is nn.Linear
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, HalfLinear)
    assert torch.equal(logits(reloaded), logits(model))


def test_dequantize_through_transformers(float_folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        float_folder, quantization_config=TorchWeightOnlyConfig(bits=8)
    )
    quantized = logits(model)
    model.dequantize()
    assert not any(isinstance(m, WeightOnlyLinear) for m in model.modules())
    assert quantcore.get_quantization_state(model) is None
    assert torch.allclose(logits(model), quantized, atol=1e-5)
