"""``QuantizationConfigMixin``: the config contract every backend's config follows.

A backend declares its config as plain attrs fields and decorates it with :func:`define_config`::

    @quantcore.define_config
    class MyConfig(quantcore.QuantizationConfigMixin):
        quant_method: ClassVar[str] = "my_method"
        bits: Literal[4, 8] = attrs.field(default=8, metadata={"help": "Weight bits."})

and gets, with no more code: validation of every field on construction and on assignment (all
problems in one :class:`~quantcore.ConfigError`), strict and lossless (de)serialization through the
project's one cattrs converter, ``to_diff_dict``, JSON files, ``update``, ``copy``, ``==``,
``dict(config)``, a readable ``repr`` and a JSON Schema.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import attrs

from .converter import NonFiniteError, allow_infinity, converter, describe_type
from .errors import ConfigError
from .schema import config_schema

__all__ = ["QuantizationConfigMixin", "config_field", "define_config"]

C = TypeVar("C", bound="_SerializedConfig")
T = TypeVar("T")

_INVALID = object()


def config_field(
    *,
    default: Any = attrs.NOTHING,
    factory: Callable[[], Any] | None = None,
    help: str,
    choices: Iterable[Any] | None = None,
    check: Callable[[Any], str | None] | None = None,
    allow_infinity: bool = False,
) -> Any:
    """An attrs field with the metadata quantcore derives docs, schema and checks from.

    :param help: one sentence on what the field means (docs, JSON Schema, CLI help).
    :param choices: the only values allowed, when the type alone does not say it.
    :param check: ``check(value)`` returns a message when the (well-typed) value is wrong.
    :param allow_infinity: a float field whose value may be ``inf`` or ``-inf`` because they mean
        something (say what in ``help``). Floats are finite otherwise; NaN never passes. JSON
        holds these infinities as the strings ``"inf"`` and ``"-inf"``, which load back too.
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if check is not None:
        metadata["check"] = check
    if allow_infinity:
        metadata["allow_infinity"] = True
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


def _coerce(value: Any, self: attrs.AttrsInstance, field: attrs.Attribute) -> Any:
    """Field converter: structure ``value`` to the field's type, or keep it for ``_problems`` to report."""
    # _field_transformer gives this converter to the fields of config classes only
    config_class = cast("type[QuantizationConfigMixin]", type(self))
    try:
        return converter.structure(value, config_class._field_types()[field.name])
    except Exception:
        return value


def _evolve(config: C, **changes: Any) -> C:
    """``attrs.evolve`` for a config.

    mypy's attrs plugin only knows classes decorated with attrs' own decorators, not through
    :func:`define_config`, so it would reject every config here.
    """
    evolved: C = attrs.evolve(cast(Any, config), **changes)
    return evolved


def _validate_assignment(instance: QuantizationConfigMixin, attribute: attrs.Attribute, value: Any) -> Any:
    # Build the would-be config first: if any rule fails, the ConfigError propagates and
    # ``instance`` keeps its old value.
    candidate = _evolve(instance, **{attribute.alias or attribute.name: value})
    return getattr(candidate, attribute.name)


def _field_transformer(cls: type, fields: list[attrs.Attribute]) -> list[attrs.Attribute]:
    out = []
    for f in fields:
        if f.converter is None:
            f = f.evolve(converter=attrs.Converter(_coerce, takes_self=True, takes_field=True))
        out.append(f)
    return out


def define_config(cls: type[T] | None = None, **kwargs: Any) -> Any:
    """Class decorator that turns a :class:`QuantizationConfigMixin` subclass into a config.

    It is ``attrs.define`` with keyword-only fields, coercion through the project converter, and
    validation on assignment. Extra keyword arguments go to ``attrs.define``.
    """
    options = {
        "kw_only": True,
        "field_transformer": _field_transformer,
        "on_setattr": _validate_assignment,
        "eq": True,
        "repr": False,
        **kwargs,
    }

    def wrap(c: type[T]) -> type[T]:
        if not (isinstance(c, type) and issubclass(c, QuantizationConfigMixin)):
            raise TypeError(f"{c!r} must subclass quantcore.QuantizationConfigMixin")
        if not isinstance(getattr(c, "quant_method", None), str) or not c.quant_method:
            raise TypeError(f"{c.__name__} must set `quant_method: ClassVar[str] = '...'`")
        defined = attrs.define(c, **options)
        if any(f.metadata.get("allow_infinity") for f in attrs.fields(defined)):
            # a misplaced allow_infinity fails here, not at first use (unless a forward reference
            # is not defined yet: then at first use)
            with contextlib.suppress(NameError):
                defined._field_types()
        return defined

    return wrap if cls is None else wrap(cls)


def _default_of(field: attrs.Attribute) -> Any:
    default: Any = field.default
    # attrs' stubs declare Factory a function (so that `x: list = Factory(list)` checks); it is a class
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return default.factory()
    return default


class _SerializedConfig:
    """A config's dict / JSON side, the base of :class:`QuantizationConfigMixin`: its fields'
    types, serialized with the project converter, diffed against the class defaults, written
    atomically, and read back (foreign dicts through :meth:`normalize_dict`)."""

    __slots__ = ()

    if TYPE_CHECKING:
        # set on every config class by define_config (attrs.define); declared for type checkers
        __attrs_attrs__: ClassVar[tuple[attrs.Attribute[Any], ...]]

    quant_method: ClassVar[str] = ""
    """The backend's method name; a class constant, always present in the serialized dict."""

    @classmethod
    def _field_types(cls) -> dict[str, Any]:
        types = cls.__dict__.get("_qc_types")
        if types is None:
            attrs.resolve_types(cls)
            types = {}
            for f in attrs.fields(cls):
                if f.metadata.get("allow_infinity"):
                    try:
                        types[f.name] = allow_infinity(f.type)
                    except TypeError as exc:
                        raise TypeError(f"{cls.__name__}.{f.name}: {exc}") from None
                else:
                    types[f.name] = f.type
            type.__setattr__(cls, "_qc_types", types)
        return types

    @classmethod
    def normalize_dict(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Rewrite a foreign or legacy dict into this class's field names before loading.

        Called by :meth:`from_dict` on a copy of the input; the default changes nothing.
        """
        return data

    def to_dict(self) -> dict[str, Any]:
        """Every field, serialized, with ``quant_method`` first."""
        out: dict[str, Any] = {"quant_method": self.quant_method}
        for f in attrs.fields(type(self)):
            out[f.name] = converter.unstructure(getattr(self, f.name))
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the fields that differ from the class defaults, plus ``quant_method``."""
        out: dict[str, Any] = {"quant_method": self.quant_method}
        defaults = type(self)._serialized_defaults()
        for f in attrs.fields(type(self)):
            value = converter.unstructure(getattr(self, f.name))
            if f.name not in defaults or defaults[f.name] != value:
                out[f.name] = value
        return out

    @classmethod
    def _serialized_defaults(cls) -> dict[str, Any]:
        defaults = {}
        types = cls._field_types()
        for f in attrs.fields(cls):
            if f.default is attrs.NOTHING:
                continue
            try:
                value = converter.structure(_default_of(f), types[f.name])
            except Exception:
                value = _default_of(f)
            defaults[f.name] = converter.unstructure(value)
        return defaults

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON text of :meth:`to_diff_dict` (or :meth:`to_dict` with ``use_diff=False``)."""
        data = self.to_diff_dict() if use_diff else self.to_dict()
        # allow_nan=False: a NaN or infinity reaching here would be a bug; never write non-JSON
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"

    def to_json_file(self, path: str | os.PathLike[str], use_diff: bool = True) -> None:
        """Write :meth:`to_json_string` to ``path`` atomically (never a half-written file)."""
        _atomic_write_text(Path(path), self.to_json_string(use_diff=use_diff))

    @classmethod
    def from_dict(
        cls: type[C], config_dict: Mapping[str, Any], return_unused_kwargs: bool = False, **kwargs: Any
    ) -> C | tuple[C, dict[str, Any]]:
        """Build a config from a dict (``kwargs`` override its keys).

        Every problem is reported in one :class:`ConfigError`. Unknown keys are errors (with a
        suggestion) unless ``return_unused_kwargs=True``, which returns ``(config, unused)``.
        """
        if not isinstance(config_dict, Mapping):
            raise ConfigError([("", f"expected a JSON object (dict), got {type(config_dict).__name__}")])
        data = cls.normalize_dict({**config_dict, **kwargs})
        problems: list[tuple[str, str]] = []
        method = data.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            problems.append(("quant_method", f"expected {cls.quant_method!r} for {cls.__name__}, got {method!r}"))
        known, unused = _split_known(cls, data)
        if unused and not return_unused_kwargs:
            names = [f.name for f in attrs.fields(cls)]
            for key in unused:
                problems.append((str(key), _unknown_key_message(key, names)))
        config = _build(cls, known, problems)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_json_file(cls: type[C], path: str | os.PathLike[str]) -> C:
        """Load a config written by :meth:`to_json_file` (or by transformers)."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError([("", f"{path}: not valid JSON ({exc})")]) from None
        return cls.from_dict(data)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        yield from self.to_dict().items()


class QuantizationConfigMixin(_SerializedConfig):
    """Base of every backend's quantization config (see the module docstring): the hooks a backend
    overrides, validation, changes. The dict / JSON side is :class:`_SerializedConfig`'s."""

    __slots__ = ()

    skip_modules_field: ClassVar[str | None] = None
    """Name of the field holding the modules to keep in float, if the config has one."""

    # ------------------------------------------------------------------ hooks for subclasses
    def validate(self) -> Iterable[tuple[str, str]]:
        """Cross-field rules: return (or yield) ``(field, message)`` for each problem.

        Called after every field passed its own checks, on construction and on assignment.
        """
        return ()

    def skip_modules(self) -> list[str]:
        """The module names or patterns this config keeps in float (empty when it has none)."""
        if self.skip_modules_field is None:
            return []
        return list(getattr(self, self.skip_modules_field) or [])

    def module_overrides(self) -> dict[str, Any]:
        """Per-module configs the config itself carries: ``{pattern: config | None}``, as ``overrides``.

        For configs that hold a table of module names (torchao's ``FqnToConfig``): quantize applies
        them after the call's own overrides and before the config itself. Empty by default.
        """
        return {}

    # ------------------------------------------------------------------ validation
    def __attrs_post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError(problems, title=f"invalid {type(self).__name__}")

    def _problems(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        types = self._field_types()
        for f in attrs.fields(type(self)):
            problems.extend(_field_problems(types[f.name], f, getattr(self, f.name)))
        if not problems:
            problems.extend(self.validate() or ())
        return problems

    # ------------------------------------------------------------------ changes
    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the known fields together (all validated before any is set); return the unknown ones."""
        known, unused = _split_known(type(self), kwargs)
        if known:
            candidate = _evolve(self, **known)
            for f in attrs.fields(type(self)):
                if f.name in known:
                    object.__setattr__(self, f.name, getattr(candidate, f.name))
        return unused

    def copy(self: C, **changes: Any) -> C:
        """A validated copy, with ``changes`` applied."""
        return _evolve(self, **changes)

    def __repr__(self) -> str:
        diff = self.to_diff_dict()
        diff.pop("quant_method")
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in diff)
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ schema
    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """A JSON Schema (draft 2020-12) derived from the fields, their types, defaults and help."""
        return config_schema(cls)


def _field_problems(tp: Any, field: attrs.Attribute, value: Any) -> list[tuple[str, str]]:
    name = field.name
    try:
        structured = converter.structure(value, tp)
    except ConfigError as exc:  # a nested config: keep its paths
        return [(f"{name}.{sub}" if sub else name, message) for sub, message in exc.errors]
    except NonFiniteError as exc:  # the right type, a value JSON cannot hold
        return [(name, str(exc))]
    except Exception:
        return [(name, f"expected {describe_type(tp)}, got {_show(value)}")]
    choices = field.metadata.get("choices")
    if choices is not None and structured not in choices:
        shown = ", ".join(repr(converter.unstructure(c)) for c in choices)
        return [(name, f"expected one of {shown}, got {_show(converter.unstructure(structured))}")]
    check = field.metadata.get("check")
    message = check(structured) if check is not None else None
    return [(name, message)] if message else []


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _split_known(cls: type, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in attrs.fields(cls)}
    known = {k: v for k, v in data.items() if k in names}
    unused = {k: v for k, v in data.items() if k not in names}
    return known, unused


def _unknown_key_message(key: Any, names: list[str]) -> str:
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(names))}"
    return f"unknown key{hint}"


def _build(cls: type[C], known: dict[str, Any], problems: list[tuple[str, str]]) -> C:
    """Construct ``cls(**known)``, folding its problems into ``problems``; raise if any."""
    config = None
    missing = [f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING and f.name not in known]
    problems.extend((name, "required field is missing") for name in missing)
    if missing:  # no instance can be built: still check each given field, to report every problem at once
        types = cls._field_types()
        for f in attrs.fields(cls):
            if f.name in known:
                problems.extend(_field_problems(types[f.name], f, known[f.name]))
    else:
        try:
            config = cls(**known)
        except ConfigError as exc:
            problems.extend(exc.errors)
    if problems:
        raise ConfigError(problems, title=f"invalid {cls.__name__}")
    assert config is not None
    return config


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, QuantizationConfigMixin)


def _structure_config(value: Any, cls: type[QuantizationConfigMixin]) -> QuantizationConfigMixin:
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls.from_dict(value)  # type: ignore[return-value]
    raise TypeError(f"expected an object ({cls.__name__}), got {value!r}")


converter.register_structure_hook_func(_is_config_class, _structure_config)
converter.register_unstructure_hook_func(_is_config_class, lambda c: c.to_dict())
