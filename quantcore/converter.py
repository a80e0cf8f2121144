"""The one cattrs converter of the project, and the strict coercion rules it applies.

Every config is structured and unstructured here, so a type learns its JSON form in one place.
Coercions happen only where nothing is lost: an ``int`` becomes a ``float``, a dtype name becomes
a ``torch.dtype``, a whole float becomes an ``int``, a NumPy scalar becomes the Python value it
holds (``np.bool_(True)`` -> ``True``, ``np.float32(5.0)`` -> ``5.0``). ``True`` for a number,
``6.5`` for an ``int`` or a string for a list are errors, and so are NaN and the infinities where
a float is meant: JSON has no form for them. A field opts in to infinities with
``config_field(..., allow_infinity=True)``; they are written ``"inf"`` and ``"-inf"`` in JSON.
"""

from __future__ import annotations

import enum
import functools
import math
import sys
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

import attrs
import cattrs
import torch

__all__ = [
    "InfiniteFloat",
    "NonFiniteError",
    "allow_infinity",
    "converter",
    "describe_type",
    "dtype_from_name",
    "dtype_names",
    "plain_json",
]

converter = cattrs.Converter(forbid_extra_keys=True, prefer_attrib_converters=False)
"""The project's single converter. Plugins may register hooks for their own types on it."""


@functools.cache
def _dtypes() -> dict[str, torch.dtype]:
    names: dict[str, torch.dtype] = {}
    for name in dir(torch):
        value = getattr(torch, name)
        if isinstance(value, torch.dtype):
            names.setdefault(str(value).removeprefix("torch."), value)
    return names


def dtype_names() -> list[str]:
    """Canonical names of every ``torch.dtype`` this torch knows (``"bfloat16"``, ...)."""
    return sorted(_dtypes())


def dtype_from_name(value: Any) -> torch.dtype:
    """``torch.bfloat16``, ``"bfloat16"`` or ``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = _dtypes().get(value.removeprefix("torch."))
        if dtype is not None:
            return dtype
    raise ValueError(f"expected a torch dtype or its name, got {value!r}")


class NonFiniteError(ValueError):
    """NaN, or an infinity, where a finite float is meant (JSON has no form for either)."""


class _InfinityAllowed:
    """Marks the float of :data:`InfiniteFloat`."""

    def __repr__(self) -> str:
        return "allow_infinity"


InfiniteFloat = Annotated[float, _InfinityAllowed()]
"""A float that may be ``inf`` or ``-inf`` (never NaN): the type of an ``allow_infinity`` field."""

_INFINITIES = {"inf": math.inf, "+inf": math.inf, "-inf": -math.inf}


def allow_infinity(tp: Any) -> Any:
    """``tp`` with each ``float`` in it (``float | None``, ``list[float]``) made an :data:`InfiniteFloat`.

    Raises ``TypeError`` when ``tp`` holds no float, so a misplaced opt-in is caught.
    """
    out = _with_infinity(tp)
    if out is tp:
        raise TypeError(f"allow_infinity is for float fields, not {describe_type(tp)}")
    return out


def _with_infinity(tp: Any) -> Any:
    if tp is float:
        return InfiniteFloat
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if not args or origin in (Literal, Annotated):
        return tp
    new = tuple(_with_infinity(a) for a in args)
    if all(n is a for n, a in zip(new, args, strict=True)):
        return tp
    if _is_union(tp):
        return Union[new]  # noqa: UP007 - the arguments are only known at run time
    return origin[new]


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python value it holds (``np.float32(5.0)`` -> ``5.0``); others as they are.

    ``.item()`` is exact for NumPy's bools, ints and floats (a float32 widens to a Python float
    without loss). NumPy is looked up, never imported: if it is not loaded, no value comes from it.
    """
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic):
        return value.item()
    return value


def plain_json(value: Any) -> Any:
    """``value`` (a JSON-like tree: dicts, lists, tuples, scalars) with every NumPy scalar as its Python value.

    For fields whose type is free-form (``Any``, a library's own config dict): the lossless
    coercion the typed fields get one scalar at a time, applied through the whole tree.
    """
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_json(v) for v in value)
    return _plain(value)


def _structure_bool(value: Any, _: type) -> bool:
    value = _plain(value)
    if isinstance(value, bool):
        return value
    raise TypeError(f"expected a bool, got {value!r}")


def _structure_int(value: Any, _: type) -> int:
    value = _plain(value)
    if isinstance(value, bool):
        raise TypeError(f"expected an int, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise TypeError(f"expected an int, got {value!r}")


def _structure_float(value: Any, _: Any) -> float:
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a float, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise NonFiniteError(f"expected a finite float, got {value!r}")
    return value


def _structure_infinite_float(value: Any, _: Any) -> float:
    value = _plain(value)
    if isinstance(value, str) and value.lower() in _INFINITIES:
        return _INFINITIES[value.lower()]
    if isinstance(value, float) and math.isinf(value):
        return value
    try:
        return _structure_float(value, float)
    except NonFiniteError:
        raise NonFiniteError(f"expected a float, 'inf' or '-inf', got {value!r}") from None


def _unstructure_float(value: float) -> float | str:
    # JSON has no infinity: an allow_infinity field's infinities are written as strings
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _structure_str(value: Any, _: type) -> str:
    value = _plain(value)
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"expected a str, got {value!r}")


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, typing.List)  # noqa: UP006


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) in (tuple, typing.Tuple)  # noqa: UP006


def _is_dict(tp: Any) -> bool:
    return typing.get_origin(tp) in (dict, typing.Dict, Mapping)  # noqa: UP006


def _structure_list(value: Any, tp: Any) -> list:
    # cattrs would happily turn the string "lm_head" into ['l', 'm', ...]: only real sequences pass.
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {value!r}")
    (item,) = typing.get_args(tp) or (Any,)
    return [converter.structure(v, item) for v in value]


def _structure_tuple(value: Any, tp: Any) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(converter.structure(v, args[0]) for v in value)
    if args and len(args) != len(value):
        raise TypeError(f"expected {len(args)} items, got {len(value)}")
    return tuple(converter.structure(v, a) for v, a in zip(value, args or [Any] * len(value), strict=False))


def _structure_dict(value: Any, tp: Any) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object, got {value!r}")
    key_t, value_t = typing.get_args(tp) or (Any, Any)
    return {converter.structure(k, key_t): converter.structure(v, value_t) for k, v in value.items()}


def _structure_enum(value: Any, tp: type[enum.Enum]) -> enum.Enum:
    if isinstance(value, tp):
        return value
    try:
        return tp(value)
    except ValueError:
        if isinstance(value, str) and value in tp.__members__:
            return tp[value]
        raise


def _structure_literal(value: Any, tp: Any) -> Any:
    value = _plain(value)
    choices = typing.get_args(tp)
    # bool is an int: keep True from matching a Literal[1].
    for choice in choices:
        if type(choice) is type(value) and choice == value:
            return choice
    raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Union:
        return True
    try:
        import types

        return origin is types.UnionType
    except AttributeError:  # pragma: no cover - Python < 3.10
        return False


def _structure_union(value: Any, tp: Any) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return converter.structure(value, arg)
        except Exception as exc:
            errors.append(exc)
    non_finite = [e for e in errors if isinstance(e, NonFiniteError)]
    if non_finite:  # the right type, a value JSON cannot hold: say that
        raise non_finite[0]
    raise TypeError(f"expected {describe_type(tp)}, got {value!r}") from (errors[0] if errors else None)


def _is_any(tp: Any) -> bool:
    return tp is Any


converter.register_structure_hook(bool, _structure_bool)
converter.register_structure_hook(int, _structure_int)
converter.register_structure_hook(float, _structure_float)
converter.register_unstructure_hook(float, _unstructure_float)
converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook(torch.dtype, lambda v, _: dtype_from_name(v))
converter.register_unstructure_hook(torch.dtype, lambda d: str(d).removeprefix("torch."))
converter.register_structure_hook_func(_is_any, lambda v, _: plain_json(v))
converter.register_structure_hook_func(_is_union, _structure_union)
converter.register_structure_hook_func(lambda t: typing.get_origin(t) is Literal, _structure_literal)
converter.register_structure_hook_func(_is_list, _structure_list)
converter.register_structure_hook_func(_is_tuple, _structure_tuple)
converter.register_structure_hook_func(_is_dict, _structure_dict)
converter.register_structure_hook_func(lambda t: isinstance(t, type) and issubclass(t, enum.Enum), _structure_enum)
converter.register_unstructure_hook_func(lambda t: isinstance(t, type) and issubclass(t, enum.Enum), lambda e: e.value)
converter.register_unstructure_hook(tuple, lambda t: [converter.unstructure(v) for v in t])
# registered last: checked before the generic hooks above (cattrs tries the newest first)
converter.register_structure_hook_func(lambda t: t == InfiniteFloat, _structure_infinite_float)


def describe_type(tp: Any) -> str:
    """A short human description of a field type, used in error messages and help."""
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "a bool"
    if tp is int:
        return "an int"
    if tp is float:
        return "a float"
    if tp == InfiniteFloat:
        return "a float, 'inf' or '-inf'"
    if tp is str:
        return "a str"
    if tp is torch.dtype:
        return "a torch dtype or its name (e.g. 'bfloat16')"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if _is_union(tp):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if _is_list(tp) or _is_tuple(tp):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"a list of {describe_type(args[0]).removeprefix('a ').removeprefix('an ')}" if args else "a list"
    if _is_dict(tp):
        return "an object"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if isinstance(tp, type) and attrs.has(tp):
        return f"an object ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))
