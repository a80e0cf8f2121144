"""AutoGPTQ-era checkpoints: no ``quantization_config`` in ``config.json``, only ``quantize_config.json``."""

from __future__ import annotations

import json

import pytest
import torch
from quantcore_gptq import GPTQConfig, GPTQLinear

import quantcore
from quantcore import CheckpointError

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

# What AutoGPTQ 0.4-0.6 wrote (BaseQuantizeConfig.to_dict): no quant_method, no checkpoint_format.
OLD_AUTOGPTQ = {
    "bits": 4,
    "group_size": 32,
    "damp_percent": 0.01,
    "desc_act": True,
    "static_groups": False,
    "sym": False,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
}
# AutoGPTQ 0.7 added these three.
NEW_AUTOGPTQ = {**OLD_AUTOGPTQ, "is_marlin_format": False, "quant_method": "gptq", "checkpoint_format": "gptq"}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def strip_quantization_config(folder) -> None:
    """Leave only the weights and a config.json without quantization_config, as AutoGPTQ saved."""
    (folder / "quantization_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def autogptq_folder(tiny_llama, calibration, prompt, tmp_path):
    """A GPTQ checkpoint saved the AutoGPTQ way, and the logits of the model it was saved from."""
    config = GPTQConfig(bits=4, group_size=32, damp_percent=0.01, sym=False, desc_act=True)
    quantcore.quantize(tiny_llama, config, calibration=calibration)
    quantcore.save_quantized(tiny_llama, tmp_path)
    strip_quantization_config(tmp_path)
    return tmp_path, logits(tiny_llama, prompt)


@pytest.mark.parametrize("written", [OLD_AUTOGPTQ, NEW_AUTOGPTQ], ids=["autogptq-0.6", "autogptq-0.7"])
def test_an_autogptq_checkpoint_loads_to_equal_logits(autogptq_folder, prompt, written):
    folder, expected = autogptq_folder
    (folder / "quantize_config.json").write_text(json.dumps(written))
    loaded = quantcore.from_pretrained(folder, dtype=torch.float32)
    assert isinstance(loaded.model.layers[1].self_attn.k_proj, GPTQLinear)
    report = quantcore.loading.get_report(loaded)
    assert len(report.quantized) == 14 and report.quantized[0].method == "gptq int4 g32 asym act-order"
    assert quantcore.get_quantization_state(loaded).config == GPTQConfig(
        bits=4, group_size=32, damp_percent=0.01, sym=False, desc_act=True
    )
    assert torch.equal(logits(loaded, prompt), expected)


def test_load_quantized_reads_quantize_config_json_too(autogptq_folder, prompt):
    folder, expected = autogptq_folder
    (folder / "quantize_config.json").write_text(json.dumps(OLD_AUTOGPTQ))
    config = transformers.AutoConfig.from_pretrained(folder)
    with quantcore.empty_weights():
        skeleton = transformers.LlamaForCausalLM(config)
    loaded = quantcore.load_quantized(folder, skeleton)
    assert torch.equal(logits(loaded.eval(), prompt), expected)


def test_saving_again_drops_the_stale_quantize_config_json(autogptq_folder, prompt):
    folder, expected = autogptq_folder
    (folder / "quantize_config.json").write_text(json.dumps(OLD_AUTOGPTQ))
    loaded = quantcore.from_pretrained(folder, dtype=torch.float32)
    quantcore.save_quantized(loaded, folder)
    assert not (folder / "quantize_config.json").exists()
    assert torch.equal(logits(quantcore.from_pretrained(folder, dtype=torch.float32), prompt), expected)


@pytest.fixture
def float_folder(tiny_llama, tmp_path):
    """A float checkpoint: every error below is raised reading the configs, before any tensor."""
    tiny_llama.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{bits: 4", r"quantize_config\.json: cannot read JSON"),
        ("[4, 128]", r"quantize_config\.json: expected a JSON object .* got list"),
        (
            json.dumps({**OLD_AUTOGPTQ, "bits": 5, "damp_percent": 2}),
            r"quantize_config\.json: (?s:.*)bits(?s:.*)damp_percent",
        ),
        (json.dumps({**OLD_AUTOGPTQ, "quant_method": "awq"}), r"quantize_config\.json: (?s:.*)unknown method 'awq'"),
    ],
    ids=["not-json", "not-an-object", "bad-values", "other-method"],
)
def test_a_malformed_quantize_config_json_is_an_error_naming_it(float_folder, text, match):
    (float_folder / "quantize_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        quantcore.from_pretrained(float_folder, dtype=torch.float32)


def test_quantize_config_json_and_config_json_must_agree(float_folder):
    config = json.loads((float_folder / "config.json").read_text())
    config["quantization_config"] = {**OLD_AUTOGPTQ, "quant_method": "gptq"}
    (float_folder / "config.json").write_text(json.dumps(config))
    (float_folder / "quantize_config.json").write_text(json.dumps({**OLD_AUTOGPTQ, "group_size": 128}))
    with pytest.raises(
        CheckpointError,
        match=r"config\.json \(quantization_config\) and quantize_config\.json disagree(?s:.*)group_size: 32 in .* 128",
    ):
        quantcore.from_pretrained(float_folder, dtype=torch.float32)


def test_quantize_config_json_must_agree_with_quantcores_own_state(autogptq_folder, tiny_llama, calibration):
    folder, _ = autogptq_folder
    quantcore.save_quantized(tiny_llama, folder)  # quantcore's state and config.json are back
    (folder / "quantize_config.json").write_text(json.dumps({**OLD_AUTOGPTQ, "sym": True}))
    disagree = r"quantization_config\.json and quantize_config\.json disagree(?s:.*)sym: false in .* true in"
    with pytest.raises(CheckpointError, match=disagree):
        quantcore.from_pretrained(folder, dtype=torch.float32)
