"""Property tests over every config class the registry knows (plus the contract's demo config)."""

from __future__ import annotations

import enum
import json
import typing
from typing import Any, Literal

import attrs
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import quantcore
from quantcore import ConfigError, QuantizationConfigMixin
from quantcore.converter import dtype_names
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
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:  # a free field (a tokenizer object or its path): its JSON forms
        return st.one_of(st.none(), st.text(max_size=20))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(2**31), 2**31)
    if tp is float:
        return st.floats(allow_nan=False, allow_infinity=False, width=64)
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
    full = cls.from_dict(json.loads(config.to_json_string(use_diff=False)))
    diff = cls.from_dict(json.loads(config.to_json_string(use_diff=True)))
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
