"""torchao checkpoints: quantcore's own round trip, quantize-on-load, and transformers' format both ways."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torchao", reason="torchao is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import torch
from quantcore_torchao import TorchAoConfig, TorchAoLinear
from safetensors import safe_open
from torch import nn
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
from torchao.quantization.granularity import PerAxis

import quantcore
from quantcore import CheckpointError

FORMATS = [
    pytest.param(Int8WeightOnlyConfig(version=2), id="int8-weight-only"),
    pytest.param(Float8WeightOnlyConfig(), id="float8-weight-only"),
]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("quant_type", FORMATS)
def test_save_and_load_back(tiny_llama, tiny_llama_config, ids, tmp_path, quant_type):
    quantcore.quantize(tiny_llama, TorchAoConfig(quant_type=quant_type))
    expected = logits(tiny_llama, ids)
    quantcore.save_quantized(tiny_llama, tmp_path / "q")

    # safetensors holds plain tensors; the header says how to rebuild them (torchao's format)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        header = f.metadata()
    assert "model.layers.0.self_attn.q_proj._weight_qdata" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    from torchao.prototype.safetensors.safetensors_utils import is_metadata_torchao

    assert is_metadata_torchao(header)
    assert "model.layers.0.self_attn.q_proj.weight" in json.loads(header["tensor_names"])

    with quantcore.empty_weights():
        skeleton = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    loaded = quantcore.load_quantized(tmp_path / "q", skeleton)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, TorchAoLinear)
    assert torch.equal(logits(loaded, ids), expected)
    assert torch.equal(logits(quantcore.from_pretrained(tmp_path / "q"), ids), expected)


def test_overrides_with_another_backend_survive_the_round_trip(tiny_llama, ids, tmp_path):
    overrides = {"re:.*mlp.*": {"quant_method": "torch_wo", "bits": 8}}
    quantcore.quantize(tiny_llama, TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2)), overrides=overrides)
    expected = logits(tiny_llama, ids)
    quantcore.save_quantized(tiny_llama, tmp_path / "q")
    loaded = quantcore.from_pretrained(tmp_path / "q")
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "WeightOnlyLinear"
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, TorchAoLinear)
    assert torch.equal(logits(loaded, ids), expected)


def test_quantize_on_load_matches_quantizing_after(tiny_llama, ids, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "float")
    config = TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2))
    streamed = quantcore.from_pretrained(tmp_path / "float", quantization_config=config)
    quantcore.quantize(tiny_llama, config)
    assert isinstance(streamed.model.layers[1].self_attn.o_proj, TorchAoLinear)
    assert torch.equal(logits(streamed, ids), logits(tiny_llama, ids))


@pytest.mark.parametrize("quant_type", FORMATS)
def test_transformers_loads_ours(tiny_llama, ids, tmp_path, quant_type):
    quantcore.quantize(tiny_llama, TorchAoConfig(quant_type=quant_type))
    quantcore.save_quantized(tiny_llama, tmp_path / "q")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert (
        type(theirs.model.layers[0].self_attn.q_proj.weight).__name__
        == type(tiny_llama.model.layers[0].self_attn.q_proj.weight).__name__
    )
    assert torch.equal(logits(theirs, ids), logits(tiny_llama, ids))


@pytest.mark.parametrize("quant_type", FORMATS)
def test_we_load_what_transformers_quantized_and_saved(tiny_llama, ids, tmp_path, quant_type):
    tiny_llama.save_pretrained(tmp_path / "float")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", dtype=torch.float32, quantization_config=transformers.TorchAoConfig(quant_type)
    ).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = quantcore.from_pretrained(tmp_path / "hf")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, TorchAoLinear)
    assert torch.equal(logits(ours, ids), logits(theirs, ids))
    # and the same logits as quantcore quantizing the float model itself
    quantcore.quantize(tiny_llama, TorchAoConfig(quant_type=quant_type))
    assert torch.equal(logits(ours, ids), logits(tiny_llama, ids))


def test_a_tensor_that_does_not_fit_is_named_and_nothing_changes(tiny_llama, tiny_llama_config, tmp_path):
    from safetensors.torch import load_file, save_file

    quantcore.quantize(tiny_llama, TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2)))
    quantcore.save_quantized(tiny_llama, tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    key = "model.layers.1.mlp.up_proj._weight_scale"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(path), metadata=header)

    torch.manual_seed(0)
    skeleton = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj.*_weight_scale"):
        quantcore.load_quantized(tmp_path / "q", skeleton)
    assert type(skeleton.model.layers[1].mlp.up_proj) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())


def test_a_quantized_embedding_is_saved_untied_from_the_head(tiny_llama_config, ids, tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    # IntxWeightOnlyConfig: torchao's format for embeddings (torchao 0.17's Int8Tensor has no embedding op)
    int8 = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    config = TorchAoConfig(quant_type=int8, include_input_output_embeddings=True)
    quantcore.quantize(model, config)
    assert type(model.lm_head) is nn.Linear  # the tied head keeps the float weight
    expected = logits(model, ids)
    quantcore.save_quantized(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(logits(quantcore.from_pretrained(tmp_path / "q"), ids), expected)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert torch.equal(logits(theirs, ids), expected)
