"""The plugin manager: entry-point discovery, run-time registration, disabling, fault containment.

Loading is lazy and happens once: ``import quantcore`` loads no plugin. Built-in backends come
through the same ``quantcore`` entry-point group as any third party's.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import warnings
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .backend import Backend
from .errors import PluginError, QuantizationVetoed

__all__ = [
    "ENTRY_POINT_GROUP",
    "disable_plugins",
    "enable_plugins",
    "get_plugin_manager",
    "list_plugins",
    "register_plugin",
    "reset_plugins",
]

ENTRY_POINT_GROUP = "quantcore"
DISABLE_ENV = "QUANTCORE_DISABLE_PLUGINS"


class PluginWarning(UserWarning):
    """A plugin failed to load or raised in a hook and was left out."""


@attrs.frozen
class Claim:
    """A backend as registered by one plugin."""

    backend: Any
    plugin: str
    distribution: str | None
    version: str | None


@attrs.define
class _State:
    pm: pluggy.PluginManager
    dists: dict[str, tuple[str | None, str | None]] = attrs.Factory(dict)
    failed: dict[str, str] = attrs.Factory(dict)
    _claims: dict[str, list[Claim]] | None = None

    @property
    def claims(self) -> dict[str, list[Claim]]:
        if self._claims is None:
            self._claims = _collect_backends(self)
        return self._claims


_lock = threading.RLock()
_state: _State | None = None
_disabled_api: set[str] = set()
_runtime_plugins: list[tuple[object, str | None]] = []


def _disabled() -> set[str]:
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    return names | _disabled_api


def _is_disabled(name: str, dist: str | None, disabled: set[str]) -> bool:
    return name in disabled or (dist is not None and dist in disabled)


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


def _load() -> _State:
    pm = pluggy.PluginManager("quantcore")
    pm.add_hookspecs(hookspecs)
    state = _State(pm)
    disabled = _disabled()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        if _is_disabled(ep.name, dist, disabled) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            state.failed[ep.name] = f"{type(exc).__name__}: {exc}"
            _warn(
                f"quantcore plugin {ep.name!r} ({dist or ep.value}) failed to load and was left out: "
                f"{type(exc).__name__}: {exc}"
            )
            continue
        state.dists[ep.name] = (dist, version)
    for plugin, name in _runtime_plugins:
        _register_runtime(state, plugin, name, disabled)
    return state


def _register_runtime(state: _State, plugin: object, name: str | None, disabled: set[str]) -> None:
    name = name or getattr(plugin, "__name__", None) or repr(plugin)
    if _is_disabled(name, None, disabled):
        return
    try:
        state.pm.register(plugin, name=name)
    except Exception as exc:
        raise PluginError(f"cannot register plugin {name!r}: {exc}") from exc
    state.dists[name] = (None, None)


def _collect_backends(state: _State) -> dict[str, list[Claim]]:
    claims: dict[str, list[Claim]] = {}
    for impl in state.pm.hook.register_backends.get_hookimpls():
        name = impl.plugin_name
        dist, version = state.dists.get(name, (None, None))
        found: list[Claim] = []

        def register(
            backend: Backend,
            _found: list[Claim] = found,
            _name: str = name,
            _dist: str | None = dist,
            _version: str | None = version,
        ) -> None:
            if not isinstance(backend, Backend):
                raise TypeError(f"register() expects a quantcore.Backend, got {type(backend).__name__}")
            _found.append(Claim(backend, _name, _dist, _version))

        try:
            impl.function(register=register)
        except Exception as exc:
            state.failed[name] = f"{type(exc).__name__}: {exc}"
            _warn(
                f"quantcore plugin {name!r} raised in register_backends and was left out: {type(exc).__name__}: {exc}"
            )
            continue
        for claim in found:
            claims.setdefault(claim.backend.quant_method, []).append(claim)
    for method, owners in claims.items():
        if len(owners) > 1:
            names = " and ".join(repr(c.plugin) for c in owners)
            _warn(
                f"quant_method {method!r} is claimed by plugins {names}; it is unusable until one is "
                f"disabled ({DISABLE_ENV}=name or quantcore.disable_plugins('name'))"
            )
    return claims


def plugin_state() -> _State:
    """The loaded plugin state (loads the plugins on first call)."""
    global _state
    with _lock:
        if _state is None:
            _state = _load()
        return _state


def get_plugin_manager() -> pluggy.PluginManager:
    """The project's one pluggy ``PluginManager``, with every enabled plugin loaded."""
    return plugin_state().pm


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Add a plugin at run time (tests, notebooks); returns the name it is registered under.

    The plugin stays registered until :func:`reset_plugins`; it is subject to disabling like any other.
    """
    global _state
    with _lock:
        name = name or getattr(plugin, "__name__", None) or f"runtime-{id(plugin):x}"
        _runtime_plugins.append((plugin, name))
        if _state is not None:
            _register_runtime(_state, plugin, name, _disabled())
            _state._claims = None
        return name


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    global _state
    with _lock:
        _runtime_plugins[:] = [(p, n) for p, n in _runtime_plugins if n != name]
        _state = None


def disable_plugins(*names: str) -> None:
    """Leave the named plugins (entry-point or distribution names) out, like ``QUANTCORE_DISABLE_PLUGINS``."""
    global _state
    with _lock:
        _disabled_api.update(names)
        _state = None


def enable_plugins(*names: str) -> None:
    """Undo :func:`disable_plugins` for the named plugins."""
    global _state
    with _lock:
        _disabled_api.difference_update(names)
        _state = None


def reset_plugins() -> None:
    """Forget run-time plugins and API disables; plugins are discovered again on next use."""
    global _state
    with _lock:
        _runtime_plugins.clear()
        _disabled_api.clear()
        _state = None


def list_plugins() -> list[dict[str, Any]]:
    """Every plugin seen: name, distribution, version, and the error that left it out, if any."""
    state = plugin_state()
    _ = state.claims  # run the register hooks so their failures show too
    rows = []
    for name, (dist, version) in sorted(state.dists.items()):
        rows.append({"name": name, "distribution": dist, "version": version, "error": state.failed.get(name)})
    for name, error in sorted(state.failed.items()):
        if name not in state.dists:
            rows.append({"name": name, "distribution": None, "version": None, "error": error})
    return rows


def call_observers(hook_name: str, **kwargs: Any) -> None:
    """Call an observer hook plugin by plugin; ``before_quantize`` failures veto, others warn."""
    hook = getattr(plugin_state().pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        try:
            impl.function(**{k: kwargs[k] for k in impl.argnames})
        except Exception as exc:
            if hook_name == "before_quantize":
                raise QuantizationVetoed(
                    f"plugin {impl.plugin_name!r} vetoed the quantization: {type(exc).__name__}: {exc}"
                ) from exc
            _warn(f"quantcore plugin {impl.plugin_name!r} raised in {hook_name}: {type(exc).__name__}: {exc}")
