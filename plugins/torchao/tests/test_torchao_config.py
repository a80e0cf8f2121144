"""TorchAoConfig: transformers' fields and JSON, the 4.x string form, and errors that say what to do."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torchao", reason="torchao is not installed")

import torch
from quantcore_torchao import TorchAoConfig
from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    FqnToConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerRow,
)
from torchao.quantization.granularity import PerGroup

import quantcore
from quantcore import AutoQuantizationConfig, ConfigError

QUANT_TYPES = [
    Int4WeightOnlyConfig(group_size=64),
    Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
    Int8WeightOnlyConfig(version=2),
    Int8DynamicActivationInt8WeightConfig(version=2),
    Float8WeightOnlyConfig(),
    Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
]


@pytest.mark.parametrize("quant_type", QUANT_TYPES, ids=lambda q: type(q).__name__)
def test_json_form_is_transformers_5(quant_type):
    from torchao.core.config import config_to_dict

    config = TorchAoConfig(quant_type=quant_type)
    data = config.to_dict()
    assert data["quant_method"] == "torchao"
    assert data["quant_type"] == {"default": config_to_dict(quant_type)}
    assert set(data) == {
        "quant_method",
        "quant_type",
        "modules_to_not_convert",
        "include_input_output_embeddings",
        "untie_embedding_weights",
    }
    again = TorchAoConfig.from_dict(json.loads(json.dumps(data)))
    assert again == config
    assert again.quant_type == quant_type
    assert AutoQuantizationConfig.from_dict(config.to_diff_dict()) == config


@pytest.mark.parametrize("quant_type", QUANT_TYPES, ids=lambda q: type(q).__name__)
def test_interop_with_transformers_config(quant_type):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.TorchAoConfig(quant_type, modules_to_not_convert=["lm_head"])
    ours = TorchAoConfig.from_dict(theirs.to_dict())
    assert ours.quant_type == quant_type
    assert ours.modules_to_not_convert == ["lm_head"]
    back = transformers.TorchAoConfig.from_dict(ours.to_dict())
    assert back.quant_type == quant_type
    assert back.to_dict() == theirs.to_dict()


def test_per_module_configs_round_trip():
    table = FqnToConfig({"model.layers.0.mlp.down_proj": None, "re:.*_proj": Int8WeightOnlyConfig(version=2)})
    config = TorchAoConfig(quant_type=table)
    again = TorchAoConfig.from_dict(json.loads(config.to_json_string()))
    assert again.quant_type == table
    overrides = config.module_overrides()
    assert list(overrides) == [r"re:model\.layers\.0\.mlp\.down_proj", "re:.*_proj", "re:.*"]
    assert overrides[r"re:model\.layers\.0\.mlp\.down_proj"] is None
    assert overrides["re:.*_proj"].quant_type == Int8WeightOnlyConfig(version=2)
    assert overrides["re:.*"] is None  # no "_default": the rest stays in float
    assert TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2)).module_overrides() == {}


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("int4_weight_only", {"group_size": 64}, Int4WeightOnlyConfig(group_size=64)),
        (
            "int4_weight_only",
            {"group_size": 128, "int4_packing_format": "tile_packed_to_4d"},
            Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
        ),
        ("int8_weight_only", {}, Int8WeightOnlyConfig(version=2)),
        ("int8_dynamic_activation_int8_weight", {}, Int8DynamicActivationInt8WeightConfig(version=2)),
        ("float8_weight_only", {}, Float8WeightOnlyConfig()),
        ("float8_dynamic_activation_float8_weight", {}, Float8DynamicActivationFloat8WeightConfig()),
    ],
)
def test_transformers_4_string_form_loads(name, kwargs, expected):
    # what transformers 4.x wrote into a checkpoint's config.json
    data = {"quant_method": "torchao", "quant_type": name, "quant_type_kwargs": kwargs, "modules_to_not_convert": None}
    config = AutoQuantizationConfig.from_dict(data)
    assert isinstance(config, TorchAoConfig)
    assert config.quant_type == expected
    assert "quant_type_kwargs" not in config.to_dict()


def test_string_in_the_constructor_maps_too():
    assert TorchAoConfig(quant_type="int8_weight_only").quant_type == Int8WeightOnlyConfig(version=2)


def test_bad_name_lists_the_choices():
    with pytest.raises(ConfigError) as info:
        TorchAoConfig.from_dict({"quant_type": "int4_weight_onyl"})
    assert info.value.errors[0][0] == "quant_type"
    message = info.value.errors[0][1]
    assert "did you mean 'int4_weight_only'" in message
    assert "int8_weight_only" in message and "Float8WeightOnlyConfig" in message


def test_bad_argument_lists_the_valid_ones_with_every_other_problem():
    with pytest.raises(ConfigError) as info:
        TorchAoConfig.from_dict(
            {
                "quant_type": "int4_weight_only",
                "quant_type_kwargs": {"grop_size": 64},
                "include_input_output_embeddings": "yes",
            }
        )
    errors = dict(info.value.errors)
    assert "has no argument 'grop_size'" in errors["quant_type"]
    assert "group_size" in errors["quant_type"]
    assert "expected a bool" in errors["include_input_output_embeddings"]


def test_bad_serialized_forms():
    with pytest.raises(ConfigError, match="unknown torchao config 'Int9WeightOnlyConfig'"):
        TorchAoConfig.from_dict({"quant_type": {"default": {"_type": "Int9WeightOnlyConfig", "_data": {}}}})
    with pytest.raises(ConfigError, match="Int8WeightOnlyConfig has no argument 'bits'"):
        TorchAoConfig.from_dict(
            {"quant_type": {"default": {"_type": "Int8WeightOnlyConfig", "_version": 2, "_data": {"bits": 8}}}}
        )
    with pytest.raises(ConfigError, match="expected a torchao config object"):
        TorchAoConfig(quant_type=4)
    with pytest.raises(ConfigError, match="'tile_packed_to_4d'"):
        TorchAoConfig.from_dict({"quant_type": "int4_weight_only", "quant_type_kwargs": {"int4_packing_format": "x"}})
    with pytest.raises(ConfigError, match="required field is missing"):
        TorchAoConfig.from_dict({"quant_method": "torchao"})


def test_assignment_is_validated_and_keeps_the_old_value():
    config = TorchAoConfig(quant_type=Int8WeightOnlyConfig(version=2))
    with pytest.raises(ConfigError):
        config.quant_type = "int3"
    assert config.quant_type == Int8WeightOnlyConfig(version=2)
    config.quant_type = "float8_weight_only"
    assert config.quant_type == Float8WeightOnlyConfig()


def test_cli_presets_are_plain_dicts_that_load():
    from quantcore.cli import PRESETS, resolve_method

    for name in ("int4-ao", "int8-ao", "fp8-ao", "fp8wo-ao"):
        data, _ = PRESETS[name]
        assert json.loads(json.dumps(data)) == data  # no torchao object in the core
        assert isinstance(resolve_method(name), TorchAoConfig)
    assert resolve_method("int4-ao").quant_type == Int4WeightOnlyConfig(
        group_size=128, int4_packing_format="tile_packed_to_4d"
    )
    assert resolve_method("fp8-ao").quant_type == Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def test_backend_is_registered_through_the_entry_point():
    (info,) = [b for b in quantcore.available_backends() if b.quant_method == "torchao"]
    assert info.distribution == "quantcore-torchao"
    assert info.usable, info.reason
    schema = TorchAoConfig.json_schema()
    assert "quant_type" in schema["required"]


def test_version_1_configs_are_refused_with_the_fix():
    # torchao 0.17's int8 default: AffineQuantizedTensor weights, which safetensors cannot hold
    try:
        old = Int8WeightOnlyConfig(version=1)
    except ValueError:
        pytest.skip("this torchao refuses version 1 itself (0.18 and later)")
    with pytest.raises(ConfigError, match=r"Int8WeightOnlyConfig with version=1 .* pass version=2"):
        TorchAoConfig(quant_type=old)
    with pytest.raises(ConfigError, match="version=2"):
        TorchAoConfig(quant_type=FqnToConfig({"re:.*": Int8DynamicActivationInt8WeightConfig(version=1)}))
