"""BitsAndBytesConfig: the fields, defaults and meaning of transformers' config, both ways; strict errors."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from quantcore_bnb import BitsAndBytesConfig

import quantcore
from quantcore import ConfigError

CONFIGS = [
    {},
    {"load_in_8bit": True},
    {"load_in_8bit": True, "llm_int8_threshold": 0.0},
    {"load_in_8bit": True, "llm_int8_threshold": 4.5, "llm_int8_has_fp16_weight": True},
    {"load_in_8bit": True, "llm_int8_skip_modules": ["lm_head", "model.layers.0.mlp"]},
    {"load_in_8bit": True, "llm_int8_enable_fp32_cpu_offload": True},
    {"load_in_4bit": True},
    {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    {"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.bfloat16},
    {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16", "bnb_4bit_quant_type": "nf4"},
    {"load_in_4bit": True, "bnb_4bit_quant_storage": torch.bfloat16},
    {"load_in_4bit": True, "bnb_4bit_quant_storage": "float32", "llm_int8_skip_modules": []},
    {"load_in_4bit": True, "bnb_4bit_use_double_quant": True, "llm_int8_skip_modules": ["re:.*gate.*"]},
]

# quantization_config blocks as they appear in real checkpoints' config.json.
CHECKPOINT_DICTS = [
    {  # an older 4-bit checkpoint (transformers 4.3x)
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    },
    {  # a newer one, with the private keys and quant_storage
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": "float16",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": ["lm_head", "multi_modal_projector"],
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    },
    {"load_in_8bit": True, "llm_int8_threshold": 5.0, "quant_method": "bitsandbytes"},  # an 8-bit diff dict
]


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def _public(tf_dict: dict) -> dict:
    """transformers' dict without its private keys, with quant_method as a plain string."""
    out = {k: v for k, v in tf_dict.items() if not k.startswith("_")}
    if "quant_method" in out:
        out["quant_method"] = str(getattr(out["quant_method"], "value", out["quant_method"]))
    return out


def test_defaults_match_transformers():
    tf = _transformers().BitsAndBytesConfig()
    ours = BitsAndBytesConfig()
    for field in attrs.fields(BitsAndBytesConfig):
        assert getattr(ours, field.name) == getattr(tf, field.name), field.name
    assert ours.bnb_4bit_compute_dtype is torch.float32
    assert ours.bnb_4bit_quant_storage is torch.uint8
    assert ours.quant_method == "bitsandbytes"
    assert ours.skip_modules_field == "llm_int8_skip_modules"


def test_every_field_has_help():
    for field in attrs.fields(BitsAndBytesConfig):
        text = field.metadata["help"]
        assert text.endswith(".") and text.count(". ") == 0, field.name


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
class TestSameAsTransformers:
    def test_fields_and_methods(self, kwargs):
        tf = _transformers().BitsAndBytesConfig(**kwargs)
        ours = BitsAndBytesConfig(**kwargs)
        assert ours.to_dict() == _public(tf.to_dict()) | {"quant_method": "bitsandbytes"}
        assert ours.quantization_method() == tf.quantization_method()
        assert bool(ours.is_quantizable()) == bool(tf.is_quantizable())

    @pytest.mark.parametrize("how", ["to_dict", "to_diff_dict", "json", "json_full"])
    def test_transformers_dicts_load_here(self, kwargs, how):
        tf = _transformers().BitsAndBytesConfig(**kwargs)
        data = {
            "to_dict": tf.to_dict,
            "to_diff_dict": tf.to_diff_dict,
            "json": lambda: json.loads(tf.to_json_string()),
            "json_full": lambda: json.loads(tf.to_json_string(use_diff=False)),
        }[how]()
        assert BitsAndBytesConfig.from_dict(data) == BitsAndBytesConfig(**kwargs)
        assert quantcore.AutoQuantizationConfig.from_dict(
            {"quant_method": "bitsandbytes", **data}
        ) == BitsAndBytesConfig(**kwargs)

    @pytest.mark.parametrize("diff", [False, True])
    def test_our_dicts_load_in_transformers(self, kwargs, diff):
        transformers = _transformers()
        ours = BitsAndBytesConfig(**kwargs)
        data = ours.to_diff_dict() if diff else ours.to_dict()
        assert not any(k.startswith("_") for k in data)
        loaded = transformers.BitsAndBytesConfig.from_dict(json.loads(json.dumps(data)))
        assert loaded.to_dict() == transformers.BitsAndBytesConfig(**kwargs).to_dict()


@pytest.mark.parametrize("data", CHECKPOINT_DICTS, ids=["old-4bit", "new-4bit-private-keys", "8bit"])
def test_checkpoint_quantization_configs(data):
    tf = _transformers().BitsAndBytesConfig.from_dict(dict(data))
    ours = BitsAndBytesConfig.from_dict(data)
    assert ours.to_dict() == _public(tf.to_dict()) | {"quant_method": "bitsandbytes"}


def test_checkpoint_config_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "quantization_config": CHECKPOINT_DICTS[0]}))
    config = quantcore.AutoQuantizationConfig.from_json_file(path)
    assert isinstance(config, BitsAndBytesConfig)
    assert config.quantization_method() == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype is torch.bfloat16


def test_none_dtypes_and_names():
    c = BitsAndBytesConfig(bnb_4bit_compute_dtype=None, bnb_4bit_quant_storage=None)
    assert (c.bnb_4bit_compute_dtype, c.bnb_4bit_quant_storage) == (torch.float32, torch.uint8)
    c = BitsAndBytesConfig(bnb_4bit_compute_dtype="torch.bfloat16", bnb_4bit_quant_storage="bfloat16")
    assert (c.bnb_4bit_compute_dtype, c.bnb_4bit_quant_storage) == (torch.bfloat16, torch.bfloat16)
    c.bnb_4bit_compute_dtype = "float16"
    assert c.bnb_4bit_compute_dtype is torch.float16


def test_integer_threshold_becomes_float():
    # transformers raises "llm_int8_threshold must be a float" on 5; 5 means 5.0.
    c = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5)
    assert c.llm_int8_threshold == 5.0 and isinstance(c.llm_int8_threshold, float)
    assert BitsAndBytesConfig.from_dict({"load_in_8bit": True, "llm_int8_threshold": 5}) == c


def test_methods():
    assert BitsAndBytesConfig().quantization_method() is None
    assert not BitsAndBytesConfig().is_quantizable()
    assert BitsAndBytesConfig(load_in_8bit=True).quantization_method() == "llm_int8"
    assert BitsAndBytesConfig(load_in_4bit=True).quantization_method() == "fp4"
    assert BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").quantization_method() == "nf4"


def test_to_dict_has_no_private_keys_and_round_trips():
    c = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head"])
    assert not any(k.startswith("_") for k in c.to_dict())
    assert BitsAndBytesConfig.from_dict(c.to_dict()) == c
    assert BitsAndBytesConfig.from_dict(json.loads(c.to_json_string())) == c
    assert c.skip_modules() == ["lm_head"]


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit", "choose one"),
        ({"bnb_4bit_quant_type": "nf5"}, "bnb_4bit_quant_type", "'fp4', 'nf4'"),
        ({"bnb_4bit_quant_storage": "int32"}, "bnb_4bit_quant_storage", "'uint8'"),
        ({"bnb_4bit_compute_dtype": "float17"}, "bnb_4bit_compute_dtype", "torch dtype"),
        ({"bnb_4bit_compute_dtype": 3}, "bnb_4bit_compute_dtype", "torch dtype"),
        ({"llm_int8_threshold": "6"}, "llm_int8_threshold", "float"),
        ({"llm_int8_threshold": True}, "llm_int8_threshold", "float"),
        ({"load_in_4bit": 1}, "load_in_4bit", "bool"),
        ({"llm_int8_skip_modules": "lm_head"}, "llm_int8_skip_modules", "list"),
    ],
)
def test_errors_name_the_field(kwargs, field, words):
    with pytest.raises(ConfigError) as info:
        BitsAndBytesConfig(**kwargs)
    assert [f for f, _ in info.value.errors] == [field]
    assert words in str(info.value)


def test_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        BitsAndBytesConfig.from_dict({"bnb_4bit_quant_type": "nf5", "load_in_4bit": "yes", "bnb_4bit_quant_tpe": 1})
    assert {f for f, _ in info.value.errors} == {"bnb_4bit_quant_type", "load_in_4bit", "bnb_4bit_quant_tpe"}


def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match="did you mean 'bnb_4bit_use_double_quant'"):
        BitsAndBytesConfig.from_dict({"load_in_4bit": True, "bnb_4bit_use_double_quan": True})


@pytest.mark.parametrize(
    "data",
    [
        {"_load_in_4bit": True, "load_in_4bit": False},
        {"_load_in_8bit": False, "load_in_8bit": True},
        {"_load_in_4bit": 1, "load_in_4bit": True},
    ],
)
def test_contradicting_private_key(data):
    with pytest.raises(ConfigError, match=r"_load_in_\dbit"):
        BitsAndBytesConfig.from_dict(data)


def test_private_key_alone_stands_for_the_public_one():
    assert BitsAndBytesConfig.from_dict({"_load_in_8bit": True}) == BitsAndBytesConfig(load_in_8bit=True)


def test_assignment_is_validated():
    c = BitsAndBytesConfig(load_in_4bit=True)
    with pytest.raises(ConfigError):
        c.load_in_8bit = True
    assert not c.load_in_8bit
    with pytest.raises(ConfigError):
        c.bnb_4bit_quant_type = "nf5"
    assert c.bnb_4bit_quant_type == "fp4"


def test_json_schema_lists_choices():
    schema = BitsAndBytesConfig.json_schema()
    props = schema["properties"]
    assert props["bnb_4bit_quant_type"]["enum"] == ["fp4", "nf4"]
    assert set(props["bnb_4bit_quant_storage"]["enum"]) == {
        "float16",
        "float32",
        "int8",
        "uint8",
        "float64",
        "bfloat16",
    }
    assert all(props[f.name].get("description") == f.metadata["help"] for f in attrs.fields(BitsAndBytesConfig))


@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_threshold_is_refused(value):
    # transformers accepts it and to_json_string() writes NaN, which is not JSON
    with pytest.raises(ConfigError, match=f"llm_int8_threshold: expected a finite float, got {value!r}"):
        BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=value)


def test_numpy_scalars_are_taken_when_lossless():
    np = pytest.importorskip("numpy")
    c = BitsAndBytesConfig(load_in_8bit=np.bool_(True), llm_int8_threshold=np.float32(5.0))
    assert c == BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0)
    assert type(c.load_in_8bit) is bool and type(c.llm_int8_threshold) is float
