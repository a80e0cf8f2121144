"""``TorchWeightOnlyConfig`` follows quantcore's config contract."""

from __future__ import annotations

import json

import pytest
import torch
from quantcore_torch import TorchWeightOnlyConfig

import quantcore

CONFIGS = [
    TorchWeightOnlyConfig(),
    TorchWeightOnlyConfig(bits=4, group_size=32),
    TorchWeightOnlyConfig(bits=4, group_size=64, compute_dtype=torch.bfloat16, modules_to_not_convert=["lm_head"]),
    TorchWeightOnlyConfig(bits=8, compute_dtype="float32", modules_to_not_convert=[]),
]


def test_defaults():
    config = TorchWeightOnlyConfig()
    assert (config.bits, config.group_size, config.compute_dtype) == (8, 128, None)
    assert config.modules_to_not_convert is None
    assert config.quant_method == "torch_wo"
    assert config.skip_modules() == []


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_dict_and_json_round_trip(config, tmp_path):
    data = config.to_dict()
    assert data["quant_method"] == "torch_wo"
    json.dumps(data)  # JSON-ready: the dtype is a name
    assert TorchWeightOnlyConfig.from_dict(data) == config
    assert TorchWeightOnlyConfig.from_dict(config.to_diff_dict()) == config
    assert quantcore.AutoQuantizationConfig.from_dict(data) == config
    config.to_json_file(tmp_path / "config.json")
    assert TorchWeightOnlyConfig.from_json_file(tmp_path / "config.json") == config


def test_dtype_names_are_accepted_and_serialized_as_names():
    config = TorchWeightOnlyConfig(compute_dtype="torch.bfloat16")
    assert config.compute_dtype is torch.bfloat16
    assert config.to_dict()["compute_dtype"] == "bfloat16"


def test_skip_modules_come_from_modules_to_not_convert():
    config = TorchWeightOnlyConfig(modules_to_not_convert=["lm_head", "re:.*gate"])
    assert TorchWeightOnlyConfig.skip_modules_field == "modules_to_not_convert"
    assert config.skip_modules() == ["lm_head", "re:.*gate"]


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(quantcore.ConfigError) as caught:
        TorchWeightOnlyConfig.from_dict(
            {
                "quant_method": "torch_wo",
                "bits": 3,
                "group_size": 48,
                "compute_dtype": "int8",
                "modules_to_not_convert": "lm_head",
                "bitz": 4,
            }
        )
    errors = dict(caught.value.errors)
    assert set(errors) == {"bits", "group_size", "compute_dtype", "modules_to_not_convert", "bitz"}
    assert "4, 8" in errors["bits"] and "32, 64, 128" in errors["group_size"]
    assert "'bfloat16'" in errors["compute_dtype"] and "list" in errors["modules_to_not_convert"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("bits", True),
        ("bits", "8"),
        ("group_size", 32.5),
        ("compute_dtype", "fp16"),
    ],
)
def test_wrong_types_are_errors(key, value):
    with pytest.raises(quantcore.ConfigError, match=key):
        TorchWeightOnlyConfig(**{key: value})


def test_unknown_key_gets_a_suggestion():
    with pytest.raises(quantcore.ConfigError, match="did you mean 'group_size'"):
        TorchWeightOnlyConfig.from_dict({"quant_method": "torch_wo", "groupsize": 64})


def test_assignment_is_validated_and_a_bad_value_changes_nothing():
    config = TorchWeightOnlyConfig(bits=4)
    with pytest.raises(quantcore.ConfigError, match="group_size"):
        config.group_size = 100
    assert config.group_size == 128
    config.group_size = 32
    assert config.group_size == 32


def test_json_schema_is_derived_from_the_fields():
    schema = TorchWeightOnlyConfig.json_schema()
    props = schema["properties"]
    assert props["quant_method"] == {"const": "torch_wo"}
    assert props["bits"]["enum"] == [4, 8] and props["bits"]["default"] == 8
    assert props["group_size"]["enum"] == [32, 64, 128]
    fields = ("bits", "group_size", "compute_dtype", "modules_to_not_convert")
    assert all(props[name]["description"] for name in fields)
    assert schema["additionalProperties"] is False
