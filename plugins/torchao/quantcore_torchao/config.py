"""``TorchAoConfig``: transformers' torchao config, with its field names and meaning.

``quant_type`` is a torchao ``AOBaseConfig`` object (``Int4WeightOnlyConfig(group_size=64)``, ...).
In JSON it takes the form transformers 5.x writes, through torchao's own config serialization::

    "quant_type": {"default": {"_type": "Int4WeightOnlyConfig", "_version": 2, "_data": {...}}}

The string form transformers 4.x wrote (``"quant_type": "int4_weight_only"`` with
``"quant_type_kwargs": {"group_size": 64}``) still loads, mapped to the object form.

This module imports torchao only when a config is built or read, so that plugin discovery and
``quantcore backends`` work where torchao is not installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from quantcore import ConfigError, QuantizationConfigMixin, config_field, define_config
from quantcore.converter import converter, plain_json

__all__ = ["LEGACY_QUANT_TYPES", "TorchAoConfig", "parse_quant_type"]

#: transformers 4.x ``quant_type`` strings -> the torchao config class that replaced each.
LEGACY_QUANT_TYPES: dict[str, str] = {
    "int4_weight_only": "Int4WeightOnlyConfig",
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic_activation_int8_weight": "Int8DynamicActivationInt8WeightConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
    "float8_dynamic_activation_float8_weight": "Float8DynamicActivationFloat8WeightConfig",
    "float8_static_activation_float8_weight": "Float8StaticActivationFloat8WeightConfig",
}


def _torchao() -> Any:
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise ConfigError([("quant_type", "torchao is not installed: pip install 'quantcore[torchao]'")]) from None
    return quantization


def _config_classes() -> dict[str, type]:
    """Every public torchao quantization config class, by name."""
    from torchao.core.config import AOBaseConfig

    quantization = _torchao()
    return {
        name: value
        for name in dir(quantization)
        if name.endswith("Config")
        and isinstance(value := getattr(quantization, name), type)
        and issubclass(value, AOBaseConfig)
        and value is not AOBaseConfig
    }


def _is_ao_config(value: Any) -> bool:
    if not type(value).__module__.startswith("torchao"):
        return False
    from torchao.core.config import AOBaseConfig

    return isinstance(value, AOBaseConfig)


def _fail(message: str) -> ConfigError:
    return ConfigError([("quant_type", message)])


def _from_class_and_kwargs(class_name: str, kwargs: Mapping[str, Any]) -> Any:
    classes = _config_classes()
    cls = classes.get(class_name)
    if cls is None:
        raise _fail(f"unknown torchao config {class_name!r}{_close(class_name, classes)}; valid: {', '.join(classes)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        raise _fail(
            f"{class_name} has no argument {', '.join(map(repr, unknown))}; valid arguments: {', '.join(fields)}"
        )
    values = {}
    if fields.get("version") is not None and fields["version"].default == 1 and "version" not in kwargs:
        # torchao 0.17 still defaults its int8 configs to version 1 (AffineQuantizedTensor, which
        # safetensors cannot hold); version 2 is the tensor-subclass form, torchao 0.18's default.
        values["version"] = 2
    for key, value in kwargs.items():
        default = fields[key].default
        # JSON carries an enum member as its value ("tile_packed_to_4d"): give torchao the member.
        if isinstance(default, enum.Enum) and isinstance(value, str):
            by_value = {m.value: m for m in type(default)} | {m.name: m for m in type(default)}
            if value not in by_value:
                choices = ", ".join(repr(m.value) for m in type(default))
                raise _fail(f"{class_name}.{key}: expected one of {choices}, got {value!r}")
            value = by_value[value]
        values[key] = value
    try:
        return cls(**values)
    except Exception as exc:
        raise _fail(f"{class_name}({_kwargs(values)}): {exc}") from None


def _from_serialized(data: Mapping[str, Any]) -> Any:
    from torchao.core.config import config_from_dict

    class_name = data.get("_type")
    classes = _config_classes()
    if isinstance(class_name, str) and class_name in classes and isinstance(data.get("_data"), Mapping):
        fields = {f.name for f in dataclasses.fields(classes[class_name])}
        unknown = [k for k in data["_data"] if k not in fields]
        if unknown:
            raise _fail(
                f"{class_name} has no argument {', '.join(map(repr, unknown))}; valid arguments: {', '.join(fields)}"
            )
    elif isinstance(class_name, str):
        raise _fail(f"unknown torchao config {class_name!r}{_close(class_name, classes)}; valid: {', '.join(classes)}")
    try:
        return config_from_dict(dict(data))
    except Exception as exc:
        raise _fail(f"torchao cannot read {_short(data)}: {exc}") from None


@attrs.frozen
class _Rejected:
    """A ``quant_type`` (with its ``quant_type_kwargs``) that could not be read, and why."""

    message: str


def parse_quant_type(value: Any, kwargs: Mapping[str, Any] | None = None) -> Any:
    """Any accepted form of ``quant_type`` -> a torchao ``AOBaseConfig``; a :class:`ConfigError` if none fits.

    Accepted: an ``AOBaseConfig``; transformers 5.x's ``{"default": {"_type": ..., "_data": ...}}``;
    torchao's ``{"_type": ..., "_data": ...}``; a transformers 4.x string (``"int4_weight_only"``)
    with its ``kwargs``.
    """
    if isinstance(value, _Rejected):
        raise _fail(value.message)
    if _is_ao_config(value):
        if kwargs:
            raise _fail(f"quant_type_kwargs {dict(kwargs)!r} only go with the string form of quant_type")
        return value
    if isinstance(value, str):
        if value in LEGACY_QUANT_TYPES:
            return _from_class_and_kwargs(LEGACY_QUANT_TYPES[value], kwargs or {})
        _torchao()  # a missing torchao is the first thing to say
        if value in _config_classes():
            return _from_class_and_kwargs(value, kwargs or {})
        choices = [*LEGACY_QUANT_TYPES, *_config_classes()]
        raise _fail(f"unknown quant_type {value!r}{_close(value, choices)}; valid: {', '.join(choices)}")
    if isinstance(value, Mapping):
        _torchao()
        if set(value) == {"default"} and isinstance(value["default"], Mapping):
            return _from_serialized(value["default"])
        if "_type" in value:
            return _from_serialized(value)
        raise _fail(
            f"expected {{'default': {{'_type': ..., '_data': ...}}}} (transformers 5.x) or "
            f"{{'_type': ..., '_data': ...}} (torchao), got {_short(value)}"
        )
    raise _fail(
        f"expected a torchao config object (e.g. Int8WeightOnlyConfig()), its serialized dict or a "
        f"transformers 4.x name ({', '.join(LEGACY_QUANT_TYPES)}), got {_short(value)}"
    )


def _version_1_problem(quant_type: Any) -> str | None:
    """Version-1 configs build AffineQuantizedTensor weights: no safetensors form, no checkpoint."""
    table = getattr(quant_type, "fqn_to_config", None)
    configs = [c for c in table.values() if c is not None] if table is not None else [quant_type]
    old = [type(c).__name__ for c in configs if getattr(c, "version", 2) == 1]
    if not old:
        return None
    return (
        f"{', '.join(old)} with version=1 makes AffineQuantizedTensor weights, which cannot be saved to "
        "safetensors (by quantcore or transformers): pass version=2, the default from torchao 0.18"
    )


def _to_quant_type(value: Any) -> Any:
    # attrs converter: parse what can be parsed; the field's check reports what cannot.
    value = plain_json(value)  # NumPy scalars inside a serialized torchao config, as the contract takes them
    try:
        return parse_quant_type(value)
    except ConfigError:
        return value


def _quant_type_problem(value: Any) -> str | None:
    try:
        return _version_1_problem(parse_quant_type(value))
    except ConfigError as exc:
        return exc.errors[0][1]


def _close(name: str, names: Any) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kwargs(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _is_ao_config_class(cls: Any) -> bool:
    # Called for every type the converter unstructures: never import torchao from here.
    base = getattr(sys.modules.get("torchao.core.config"), "AOBaseConfig", None)
    return base is not None and isinstance(cls, type) and issubclass(cls, base)


def _unstructure_ao_config(value: Any) -> dict[str, Any]:
    from torchao.core.config import config_to_dict

    return config_to_dict(value)


converter.register_unstructure_hook_func(_is_ao_config_class, _unstructure_ao_config)


def quant_type_to_dict(quant_type: Any) -> dict[str, Any]:
    """transformers 5.x's JSON form of ``quant_type``: ``{"default": config_to_dict(quant_type)}``."""
    return {"default": _unstructure_ao_config(quant_type)}


@define_config
class TorchAoConfig(QuantizationConfigMixin):
    """torchao quantization through torchao's ``quantize_``, one module at a time (transformers' ``TorchAoConfig``).

    Linear layers (and, with ``include_input_output_embeddings``, embeddings) get torchao tensor
    subclass weights: int4 / int8 / float8 weight-only or with dynamic activation quantization,
    on torchao's kernels where it has them.
    """

    quant_method: ClassVar[str] = "torchao"
    skip_modules_field: ClassVar[str | None] = "modules_to_not_convert"

    quant_type: Any = attrs.field(
        converter=_to_quant_type,
        metadata={
            "help": (
                "A torchao AOBaseConfig (Int4WeightOnlyConfig(group_size=64), Int8WeightOnlyConfig(), "
                "Float8DynamicActivationFloat8WeightConfig(), FqnToConfig({...}), ...); in JSON "
                '{"default": {"_type": ..., "_version": ..., "_data": {...}}} as transformers 5.x writes it, '
                'or a transformers 4.x name ("int4_weight_only") with "quant_type_kwargs".'
            ),
            "check": _quant_type_problem,
            # valid values in their plainest JSON form (what property tests draw from)
            "examples": [
                "int4_weight_only",
                "int8_weight_only",
                "int8_dynamic_activation_int8_weight",
                "float8_weight_only",
                "float8_dynamic_activation_float8_weight",
            ],
        },
    )
    modules_to_not_convert: list[str] | None = config_field(
        default=None,
        help="Module names or patterns to keep in float, in addition to the default skips.",
    )
    include_input_output_embeddings: bool = config_field(
        default=False,
        help="Quantize nn.Embedding layers too (the input embeddings); the output head follows quantcore's "
        "default skips (pass default_skips=False to quantize it).",
    )
    untie_embedding_weights: bool = config_field(
        default=False,
        help="Accepted for transformers compatibility: quantcore always unties a quantized embedding from a "
        "tied output head (the head keeps the float weight).",
    )

    @classmethod
    def normalize_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Map transformers 4.x's ``quant_type`` string and ``quant_type_kwargs`` to the object form."""
        kwargs = data.pop("quant_type_kwargs", None)
        if isinstance(data.get("quant_type"), str) or kwargs:
            try:
                data["quant_type"] = parse_quant_type(data.get("quant_type"), kwargs or {})
            except ConfigError as exc:  # the field's check names it, with the other problems
                data["quant_type"] = _Rejected(exc.errors[0][1])
        return data

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["quant_type"] = quant_type_to_dict(self.quant_type)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        out = super().to_diff_dict()
        out["quant_type"] = quant_type_to_dict(self.quant_type)
        return out

    def module_overrides(self) -> dict[str, Any]:
        """An ``FqnToConfig`` quant_type as quantcore overrides, in torchao's order: exact module names,
        then ``"re:"`` patterns, then everything else with ``"_default"`` (kept in float without one)."""
        table = getattr(self.quant_type, "fqn_to_config", None)
        if table is None:
            return {}

        def config(sub: Any) -> TorchAoConfig | None:
            return None if sub is None else self.copy(quant_type=sub)

        out: dict[str, Any] = {}
        for key, sub in table.items():
            if not key.startswith("re:") and key != "_default":
                out["re:" + re.escape(key)] = config(sub)
        for key, sub in table.items():
            if key.startswith("re:"):
                out[key] = config(sub)
        out["re:.*"] = config(table.get("_default"))
        return out

    def describe(self) -> str:
        """A short label: the torchao config's class name and its main settings."""
        quant_type = self.quant_type
        label = type(quant_type).__name__.removesuffix("Config")
        group = getattr(quant_type, "group_size", None)
        return f"torchao {label}" + (f" g{group}" if group else "")
