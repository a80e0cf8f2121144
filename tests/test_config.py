"""The config contract, on a config class that uses every kind of field."""

from __future__ import annotations

import enum
import json
import math
from typing import ClassVar, Literal

import attrs
import jsonschema
import numpy as np
import pytest
import torch

from quantcore import ConfigError, QuantizationConfigMixin, config_field, define_config


class Granularity(enum.Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"


@define_config
class Inner(QuantizationConfigMixin):
    """A nested config."""

    quant_method: ClassVar[str] = "inner"
    bits: Literal[4, 8] = config_field(default=8, help="Bits.")


@define_config
class DemoConfig(QuantizationConfigMixin):
    """A config with one field of each kind."""

    quant_method: ClassVar[str] = "demo"
    skip_modules_field: ClassVar[str] = "skip"
    load_in_8bit: bool = config_field(default=False, help="Use 8 bits.")
    load_in_4bit: bool = config_field(default=False, help="Use 4 bits.")
    threshold: float = config_field(default=6.0, help="Outlier threshold.")
    group_size: int = config_field(default=64, help="Group size.", choices=(32, 64, 128))
    quant_type: Literal["fp4", "nf4"] = config_field(default="fp4", help="4-bit data type.")
    compute_dtype: torch.dtype = config_field(default=torch.float32, help="Compute dtype.")
    storage: torch.dtype = config_field(default=torch.uint8, help="Storage.", choices=(torch.uint8, torch.bfloat16))
    granularity: Granularity = config_field(default=Granularity.CHANNEL, help="Scale granularity.")
    block: tuple[int, int] = config_field(default=(1, 64), help="Block shape.")
    skip: list[str] | None = config_field(default=None, help="Modules kept in float.")
    inner: Inner = config_field(factory=Inner, help="Nested settings.")
    damp: float = config_field(
        default=0.01, help="Dampening.", check=lambda v: None if 0 <= v <= 1 else f"expected 0 <= damp <= 1, got {v}"
    )
    clip: float | None = config_field(
        default=math.inf, allow_infinity=True, help="Clip weights beyond this magnitude (inf: never)."
    )

    def validate(self):
        if self.load_in_8bit and self.load_in_4bit:
            yield ("load_in_4bit", "load_in_4bit and load_in_8bit cannot both be true")


def test_quant_method_is_a_class_constant_present_in_every_dict():
    c = DemoConfig()
    assert DemoConfig.quant_method == "demo"
    assert c.to_dict()["quant_method"] == "demo"
    assert c.to_diff_dict() == {"quant_method": "demo"}
    assert "quant_method" not in {f.name for f in attrs.fields(DemoConfig)}


def test_to_dict_serializes_dtype_enum_tuple_and_nested():
    c = DemoConfig(compute_dtype=torch.bfloat16, granularity=Granularity.TENSOR, block=(2, 32), inner=Inner(bits=4))
    d = c.to_dict()
    assert d["compute_dtype"] == "bfloat16"
    assert d["granularity"] == "tensor"
    assert d["block"] == [2, 32]
    assert d["inner"] == {"quant_method": "inner", "bits": 4}
    json.dumps(d)  # plain JSON


def test_round_trips_through_json_both_forms():
    c = DemoConfig(
        load_in_4bit=True,
        threshold=3,
        quant_type="nf4",
        compute_dtype="float16",
        skip=["lm_head"],
        inner={"bits": 4},
        block=[2, 2],
    )
    for use_diff in (True, False):
        assert DemoConfig.from_dict(json.loads(c.to_json_string(use_diff=use_diff))) == c


def test_diff_dict_only_holds_changed_fields():
    c = DemoConfig(threshold=5.0, compute_dtype=torch.bfloat16)
    assert c.to_diff_dict() == {"quant_method": "demo", "threshold": 5.0, "compute_dtype": "bfloat16"}


def test_json_file_round_trip_and_atomic_write(tmp_path):
    c = DemoConfig(load_in_8bit=True)
    path = tmp_path / "sub" / "q.json"
    c.to_json_file(path)
    assert DemoConfig.from_json_file(path) == c
    assert [p.name for p in path.parent.iterdir()] == ["q.json"]  # no temporary left behind


def test_lossless_coercions():
    c = DemoConfig(threshold=5, compute_dtype="torch.bfloat16", group_size=32.0)
    assert c.threshold == 5.0 and isinstance(c.threshold, float)
    assert c.compute_dtype is torch.bfloat16
    assert c.group_size == 32 and isinstance(c.group_size, int)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("threshold", True, "expected a float, got True"),
        ("threshold", "6", "expected a float, got '6'"),
        ("group_size", 6.5, "expected an int, got 6.5"),
        ("group_size", 48, "expected one of 32, 64, 128, got 48"),
        ("quant_type", "nf5", "expected one of 'fp4', 'nf4', got 'nf5'"),
        ("load_in_8bit", 1, "expected a bool, got 1"),
        ("compute_dtype", "float17", "expected a torch dtype or its name (e.g. 'bfloat16'), got 'float17'"),
        ("storage", "float16", "expected one of 'uint8', 'bfloat16', got 'float16'"),
        ("skip", "lm_head", "expected a list of str or null, got 'lm_head'"),
        ("granularity", "row", "expected one of 'tensor', 'channel', got 'row'"),
        ("damp", 2.0, "expected 0 <= damp <= 1, got 2.0"),
    ],
)
def test_each_bad_value_names_field_expectation_and_value(field, value, expected):
    with pytest.raises(ConfigError) as err:
        DemoConfig(**{field: value})
    assert err.value.errors == [(field, expected)]
    assert f"{field}: {expected}" in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        DemoConfig.from_dict({"threshold": True, "quant_type": "nf5", "group_size": 6.5})
    assert [f for f, _ in err.value.errors] == ["threshold", "group_size", "quant_type"]
    assert "3 problems" in str(err.value)


def test_nested_errors_carry_their_path():
    with pytest.raises(ConfigError) as err:
        DemoConfig.from_dict({"inner": {"bits": 5}})
    assert err.value.errors == [("inner.bits", "expected one of 4, 8, got 5")]


def test_cross_field_rule_in_validate():
    with pytest.raises(ConfigError, match="cannot both be true"):
        DemoConfig(load_in_8bit=True, load_in_4bit=True)


def test_assignment_is_validated_and_leaves_config_unchanged_on_error():
    c = DemoConfig(load_in_8bit=True)
    with pytest.raises(ConfigError):
        c.threshold = "high"
    with pytest.raises(ConfigError, match="cannot both"):
        c.load_in_4bit = True
    assert c == DemoConfig(load_in_8bit=True)
    c.compute_dtype = "bfloat16"  # assignment coerces too
    assert c.compute_dtype is torch.bfloat16


def test_unknown_keys_rejected_with_suggestion_or_returned():
    with pytest.raises(ConfigError) as err:
        DemoConfig.from_dict({"treshold": 3.0, "bogus": 1})
    messages = dict(err.value.errors)
    assert messages["treshold"] == "unknown key; did you mean 'threshold'?"
    assert messages["bogus"].startswith("unknown key; known keys:")
    c, unused = DemoConfig.from_dict({"treshold": 3.0, "threshold": 2}, return_unused_kwargs=True)
    assert unused == {"treshold": 3.0} and c.threshold == 2.0


def test_from_dict_kwargs_override_and_wrong_method_is_an_error():
    assert DemoConfig.from_dict({"threshold": 1.0}, threshold=2.0).threshold == 2.0
    with pytest.raises(ConfigError, match="expected 'demo' for DemoConfig, got 'other'"):
        DemoConfig.from_dict({"quant_method": "other"})
    with pytest.raises(ConfigError, match="expected a JSON object"):
        DemoConfig.from_dict(["not", "a", "dict"])


def test_update_sets_known_fields_together_and_returns_unknown():
    c = DemoConfig()
    assert c.update(threshold=1, quant_type="nf4", extra=5) == {"extra": 5}
    assert (c.threshold, c.quant_type) == (1.0, "nf4")
    with pytest.raises(ConfigError):
        c.update(threshold=2.0, quant_type="bad")
    assert c.threshold == 1.0  # nothing set when one value is bad


def test_iter_eq_copy_repr():
    c = DemoConfig(quant_type="nf4")
    assert dict(c) == c.to_dict()
    assert c == DemoConfig(quant_type="nf4") and c != DemoConfig()
    d = c.copy(threshold=1.0)
    assert d.threshold == 1.0 and c.threshold == 6.0
    assert repr(c) == "DemoConfig(quant_type='nf4')"
    assert eval(repr(d), {"DemoConfig": DemoConfig}) == d


def test_skip_modules_reads_the_declared_field():
    assert DemoConfig(skip=["lm_head"]).skip_modules() == ["lm_head"]
    assert DemoConfig().skip_modules() == []


def test_json_schema_is_derived_from_fields_and_validates():
    schema = DemoConfig.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    props = schema["properties"]
    assert props["quant_method"] == {"const": "demo"}
    assert props["quant_type"]["enum"] == ["fp4", "nf4"]
    assert props["group_size"]["enum"] == [32, 64, 128]
    assert props["threshold"] == {"type": "number", "description": "Outlier threshold.", "default": 6.0}
    assert props["inner"]["properties"]["bits"]["enum"] == [4, 8]
    assert schema["additionalProperties"] is False
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(DemoConfig(quant_type="nf4").to_dict())
    assert not validator.is_valid({"quant_method": "demo", "quant_type": "nf5"})


def test_define_config_refuses_classes_without_quant_method():
    with pytest.raises(TypeError, match="quant_method"):

        @define_config
        class NoMethod(QuantizationConfigMixin):
            x: int = config_field(default=1, help="x")


def test_config_error_is_a_value_error_and_pickles():
    import pickle

    err = ConfigError([("a", "bad"), ("b", "worse")])
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert again.errors == err.errors and str(again) == str(err)


# ---------------------------------------------------------------------- non-finite floats
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.float64("nan"), np.float32("-inf")])
def test_non_finite_floats_are_refused(value):
    with pytest.raises(ConfigError) as err:
        DemoConfig(threshold=value)
    assert err.value.errors == [("threshold", f"expected a finite float, got {float(value)!r}")]
    with pytest.raises(ConfigError, match="threshold: expected a finite float, got nan"):
        DemoConfig.from_dict({"threshold": math.nan, "damp": 0.5})
    c = DemoConfig()
    with pytest.raises(ConfigError):
        c.threshold = value  # assignment too, and the old value stays
    assert c.threshold == 6.0


def test_a_field_may_opt_in_to_infinities():
    c = DemoConfig(clip=-math.inf)
    assert c.clip == -math.inf
    text = c.to_json_string()
    assert json.loads(text, parse_constant=_no_constants)["clip"] == "-inf"  # strict JSON
    assert DemoConfig.from_dict(json.loads(text)) == c
    assert DemoConfig(clip="inf").clip == math.inf and DemoConfig(clip=2).clip == 2.0
    assert DemoConfig().to_dict()["clip"] == "inf" and "clip" not in DemoConfig().to_diff_dict()
    with pytest.raises(ConfigError) as err:
        DemoConfig(clip=math.nan)
    assert err.value.errors == [("clip", "expected a float, 'inf' or '-inf', got nan")]
    with pytest.raises(ConfigError, match="clip: expected a float, 'inf' or '-inf' or null, got 'infinite'"):
        DemoConfig(clip="infinite")
    prop = DemoConfig.json_schema()["properties"]["clip"]
    assert prop["anyOf"] == [{"anyOf": [{"type": "number"}, {"enum": ["inf", "-inf"]}]}, {"type": "null"}]
    assert prop["default"] == "inf"


def test_allow_infinity_on_a_field_without_a_float_is_refused():
    with pytest.raises(TypeError, match=r"Bad\.n: allow_infinity is for float fields, not an int"):

        @define_config
        class Bad(QuantizationConfigMixin):
            quant_method: ClassVar[str] = "bad"
            n: int = config_field(default=1, allow_infinity=True, help="n")


def _no_constants(name):
    raise ValueError(f"not JSON: {name}")


# ---------------------------------------------------------------------- NumPy scalars
def test_numpy_scalars_coerce_when_nothing_is_lost():
    c = DemoConfig(
        load_in_8bit=np.bool_(True),
        threshold=np.float32(5.0),
        damp=np.float32(0.25),
        group_size=np.int64(32),
        quant_type=np.str_("nf4"),
        block=[np.int32(2), np.float64(32.0)],
        inner={"bits": np.int8(4)},
    )
    assert c == DemoConfig(load_in_8bit=True, threshold=5.0, damp=0.25, group_size=32, quant_type="nf4",
                           block=(2, 32), inner=Inner(bits=4))  # fmt: skip
    assert type(c.load_in_8bit) is bool and type(c.threshold) is float and type(c.group_size) is int
    assert type(c.quant_type) is str and type(c.inner.bits) is int
    json.loads(c.to_json_string(), parse_constant=_no_constants)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("group_size", np.float64(4.5), "expected an int, got np.float64(4.5)"),
        ("group_size", np.float32(32.5), "expected an int, got np.float32(32.5)"),
        ("load_in_8bit", np.int64(1), "expected a bool, got np.int64(1)"),
        ("threshold", np.bool_(True), "expected a float, got np.True_"),
        ("threshold", np.complex128(1 + 2j), "expected a float, got np.complex128(1+2j)"),
    ],
)
def test_numpy_scalars_that_would_lose_something_are_refused(field, value, expected):
    with pytest.raises(ConfigError) as err:
        DemoConfig(**{field: value})
    assert err.value.errors == [(field, expected)]


@define_config
class RequiredBitsConfig(QuantizationConfigMixin):
    """A config with a required field (as GPTQConfig's ``bits``)."""

    quant_method: ClassVar[str] = "required-bits"
    bits: int = config_field(help="Bits.", choices=(4, 8))
    damp: float = config_field(default=0.01, help="Dampening.")


def test_a_missing_required_field_does_not_hide_the_other_problems():
    with pytest.raises(ConfigError) as err:
        RequiredBitsConfig.from_dict({"damp": float("nan"), "bitz": 4})
    fields = [field for field, _ in err.value.errors]
    assert fields == ["bitz", "bits", "damp"]
    assert ("damp", "expected a finite float, got nan") in err.value.errors
