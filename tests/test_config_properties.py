"""Property tests over every config class the registry knows (plus the contract's demo config)."""

from __future__ import annotations

import enum
import json
import math
import typing
from typing import Any, Literal

import attrs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import quantcore
from quantcore import ConfigError, QuantizationConfigMixin
from quantcore.converter import InfiniteFloat, dtype_names
from tests.test_config import DemoConfig


def _registered_config_classes() -> list[type[QuantizationConfigMixin]]:
    classes = {info.backend.config_class for info in quantcore.available_backends() if info.backend}
    quantcore.reset_plugins()
    return sorted(classes, key=lambda c: c.__name__)


CONFIG_CLASSES = [DemoConfig, *_registered_config_classes()]
FLOATING = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def strategy_for(tp: Any, field: attrs.Attribute | None = None) -> st.SearchStrategy:
    """Valid values of a field type (before the field's own checks, which ``assume`` filters)."""
    if field is not None and "choices" in field.metadata:
        return st.sampled_from(field.metadata["choices"])
    if field is not None and "examples" in field.metadata:  # a field no type describes (torchao's quant_type)
        return st.sampled_from(field.metadata["examples"])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:  # a free field (a tokenizer object or its path): its JSON forms
        return st.one_of(st.none(), st.text(max_size=20))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(2**31), 2**31)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False, width=64)
    if tp == InfiniteFloat:
        return st.floats(allow_nan=False, allow_infinity=True, width=64)
    if tp is str:
        return st.text(max_size=20)
    if tp is torch.dtype:
        return st.sampled_from(FLOATING)
    if origin is Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return st.one_of(*[strategy_for(a) for a in args])
    if tp is type(None):
        return st.none()
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(strategy_for(args[0]), max_size=4).map(tuple)
        return st.tuples(*[strategy_for(a) for a in args])
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=3)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if isinstance(tp, type) and issubclass(tp, QuantizationConfigMixin):
        return configs(tp)
    raise NotImplementedError(f"no strategy for {tp!r}")


def configs(cls: type[QuantizationConfigMixin]) -> st.SearchStrategy:
    types = cls._field_types()
    fields = {f.name: st.one_of(st.nothing(), strategy_for(types[f.name], f)) for f in attrs.fields(cls)}

    @st.composite
    def build(draw):
        kwargs = {}
        for f in attrs.fields(cls):
            if f.default is attrs.NOTHING or draw(st.booleans()):  # required fields always
                kwargs[f.name] = draw(strategy_for(types[f.name], f))
        try:
            return cls(**kwargs)
        except ConfigError:
            assume(False)

    del fields
    return build()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)


def _json_dicts(cls: type[QuantizationConfigMixin]) -> st.SearchStrategy:
    names = [f.name for f in attrs.fields(cls)]
    keys = st.sampled_from([*names, "quant_method"]) | st.text(max_size=12)
    values = json_values | st.sampled_from(["bfloat16", "nf4", "fp4", cls.quant_method, *dtype_names()[:3]])
    return st.dictionaries(keys, values, max_size=len(names) + 2)


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_valid_configs_survive_json_round_trip(cls, data):
    config = data.draw(configs(cls))
    # strict JSON: NaN and Infinity are not JSON and must never be written
    full = cls.from_dict(json.loads(config.to_json_string(use_diff=False), parse_constant=_not_json))
    diff = cls.from_dict(json.loads(config.to_json_string(use_diff=True), parse_constant=_not_json))
    assert full == config
    assert diff == config


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_json_gives_a_valid_config_or_config_error(cls, data):
    value = data.draw(st.one_of(_json_dicts(cls), json_values))
    try:
        config = cls.from_dict(value)
    except ConfigError as err:
        assert err.errors, "a ConfigError must list at least one problem"
        assert all(isinstance(f, str) and isinstance(m, str) and m for f, m in err.errors)
        return
    assert isinstance(config, cls)
    assert cls.from_dict(config.to_dict()) == config


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# ---------------------------------------------------------------------- NumPy scalars, non-finite floats
def _as_numpy(value: Any, draw: Any) -> Any:
    """``value`` (a JSON form) with its numbers and bools as NumPy scalars that hold them exactly."""
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return draw(st.sampled_from([np.int64, np.int32] if -(2**31) <= value < 2**31 else [np.int64]))(value)
    if isinstance(value, float):
        exact32 = abs(value) < 3e38 and float(np.float32(value)) == value
        return draw(st.sampled_from([np.float64, np.float32] if exact32 else [np.float64]))(value)
    if isinstance(value, list):
        return [_as_numpy(v, draw) for v in value]
    if isinstance(value, dict):
        return {k: v if k == "quant_method" else _as_numpy(v, draw) for k, v in value.items()}
    return value


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_lossless_numpy_scalars_give_the_same_config(cls, data):
    config = data.draw(configs(cls))
    numpy_dict = _as_numpy(config.to_dict(), data.draw)
    again = cls.from_dict(numpy_dict)
    assert again == config
    assert again.to_dict() == config.to_dict()  # plain Python values again, not NumPy ones
    assert not any(isinstance(v, np.generic) for _, v in again)


def _fields_of(cls: type[QuantizationConfigMixin], kinds: tuple[Any, ...]) -> list[str]:
    types = cls._field_types()
    return [
        f.name
        for f in attrs.fields(cls)
        if types[f.name] in kinds or any(a in kinds for a in typing.get_args(types[f.name]))
    ]


INT_FIELDS = [
    (c, n) for c in CONFIG_CLASSES for n in _fields_of(c, (int,)) if "choices" not in attrs.fields_dict(c)[n].metadata
]
FLOAT_FIELDS = [(c, n) for c in CONFIG_CLASSES for n in _fields_of(c, (float, InfiniteFloat))]


@pytest.mark.parametrize(("cls", "name"), INT_FIELDS, ids=lambda x: getattr(x, "__name__", x))
@settings(max_examples=30, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: not v.is_integer()))
def test_lossy_numpy_floats_are_refused_for_ints(cls, name, value):
    for scalar in (np.float64(value), np.float32(value)):
        if float(scalar).is_integer():
            continue
        with pytest.raises(ConfigError) as err:
            cls.from_dict({name: scalar})
        assert name in [f for f, _ in err.value.errors]


@pytest.mark.parametrize(("cls", "name"), FLOAT_FIELDS, ids=lambda x: getattr(x, "__name__", x))
@settings(max_examples=20, deadline=None)
@given(value=st.sampled_from([math.nan, math.inf, -math.inf]), numpy=st.booleans())
def test_non_finite_floats_are_refused_unless_the_field_allows_infinity(cls, name, value, numpy):
    allows = bool(attrs.fields_dict(cls)[name].metadata.get("allow_infinity"))
    allowed = allows and not math.isnan(value)
    given_value = np.float64(value) if numpy else value
    try:
        config = cls.from_dict({name: given_value})
    except ConfigError as err:
        assert not allowed
        expected = "expected a float, 'inf' or '-inf'" if math.isnan(value) and allows else "expected a finite float"
        assert (name, f"{expected}, got {value!r}") in err.errors
        return
    assert allowed and getattr(config, name) == value
    assert cls.from_dict(json.loads(config.to_json_string(), parse_constant=_not_json)) == config
