"""JSON Schema of a config class, derived from its attrs fields (never written by hand)."""

from __future__ import annotations

import enum
import typing
from typing import Any, Literal

import attrs
import torch

from .converter import InfiniteFloat, _is_dict, _is_list, _is_tuple, _is_union, converter, describe_type, dtype_names

__all__ = ["config_schema", "type_schema"]


def type_schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema of one field type."""
    if tp is Any:
        return {}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp == InfiniteFloat:
        return {"anyOf": [{"type": "number"}, {"enum": ["inf", "-inf"]}]}
    if tp is str:
        return {"type": "string"}
    if tp is torch.dtype:
        return {"type": "string", "enum": dtype_names()}
    if typing.get_origin(tp) is Literal:
        return {"enum": list(typing.get_args(tp))}
    if _is_union(tp):
        return {"anyOf": [type_schema(a) for a in typing.get_args(tp)]}
    if _is_list(tp) or _is_tuple(tp):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return {"type": "array", "items": type_schema(args[0])} if args else {"type": "array"}
    if _is_dict(tp):
        key_value = typing.get_args(tp)
        return {"type": "object", "additionalProperties": type_schema(key_value[1]) if key_value else {}}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return {"enum": [m.value for m in tp]}
    if isinstance(tp, type) and attrs.has(tp):
        if hasattr(tp, "json_schema"):
            schema = tp.json_schema()
            schema.pop("$schema", None)
            return schema
        return _object_schema(tp)
    raise TypeError(f"no JSON Schema for type {tp!r}")


def _field_types(cls: type) -> dict[str, Any]:
    """Each field's type as the converter structures it (a config's ``allow_infinity`` included)."""
    attrs.resolve_types(cls)
    types = getattr(cls, "_field_types", None)
    return types() if callable(types) else {f.name: f.type for f in attrs.fields(cls)}


def _object_schema(cls: type) -> dict[str, Any]:
    types = _field_types(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in attrs.fields(cls):
        prop = type_schema(types[f.name])
        choices = f.metadata.get("choices")
        if choices is not None:
            allowed = [converter.unstructure(c) for c in choices]
            prop = {"anyOf": [{"enum": allowed}, {"type": "null"}]} if None in choices else {"enum": allowed}
        if "help" in f.metadata:
            prop["description"] = f.metadata["help"]
        if f.default is attrs.NOTHING:
            required.append(f.name)
        else:
            default = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[arg-type]
            prop["default"] = converter.unstructure(default)
        properties[f.name] = prop
    schema: dict[str, Any] = {
        "title": cls.__name__,
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if cls.__doc__:
        schema["description"] = cls.__doc__.strip().splitlines()[0]
    if required:
        schema["required"] = required
    return schema


def config_schema(cls: type) -> dict[str, Any]:
    """The JSON Schema of a :class:`~quantcore.QuantizationConfigMixin` subclass."""
    schema = _object_schema(cls)
    schema["properties"] = {"quant_method": {"const": cls.quant_method}, **schema["properties"]}  # type: ignore[attr-defined]
    schema["required"] = ["quant_method", *schema.get("required", [])]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def config_markdown(cls: type) -> str:
    """A markdown reference table of a config class: every field's type, default, allowed values, meaning."""
    types = _field_types(cls)
    lines = [
        f'### `{cls.__name__}` (`quant_method: "{cls.quant_method}"`)',  # type: ignore[attr-defined]
        "",
        (cls.__doc__ or "").strip().split("\n\n")[0],
        "",
        "| field | type | default | allowed | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in attrs.fields(cls):
        if f.default is attrs.NOTHING:
            default = "required"
        else:
            value = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[arg-type]
            default = f"`{json_dumps(converter.unstructure(value))}`"
        choices = f.metadata.get("choices")
        schema = type_schema(types[f.name])
        if choices is not None:
            allowed = ", ".join(f"`{json_dumps(converter.unstructure(c))}`" for c in choices)
        elif "enum" in schema and f.type is not torch.dtype:
            allowed = ", ".join(f"`{json_dumps(v)}`" for v in schema["enum"])
        else:
            allowed = ""
        meaning = f.metadata.get("help", "").replace("|", "\\|").replace("\n", " ")
        kind = describe_type(types[f.name]).removeprefix("a ").removeprefix("an ").replace("|", "\\|")
        lines.append(f"| `{f.name}` | {kind} | {default} | {allowed} | {meaning} |")
    return "\n".join(lines) + "\n"


def json_dumps(value: Any) -> str:
    """Compact JSON for docs tables."""
    import json

    return json.dumps(value)
