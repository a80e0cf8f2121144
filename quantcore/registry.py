"""The backend registry: what each plugin contributed, and whether it can run here."""

from __future__ import annotations

from typing import Any

from .backend import Backend, BackendInfo
from .errors import BackendUnavailableError, ConfigError, PluginError
from .plugins import plugin_state

# Backend and BackendInfo live in .backend; they stay importable from here.
__all__ = ["available_backends", "config_file_methods", "get_backend"]


# Methods that well-known plugins provide: only used to tell a user what to install when a config
# names a method no installed plugin registers. The core imports none of them.
KNOWN_PROVIDERS: dict[str, str] = {
    "bitsandbytes": "quantcore-bnb (pip install 'quantcore[bnb]')",
    "torch_wo": "quantcore-torch (pip install 'quantcore[torch-backend]')",
    "torchao": "quantcore-torchao (pip install 'quantcore[torchao]')",
    "gptq": "quantcore-gptq (pip install 'quantcore[gptq]')",
}


def _usability(backend: Backend) -> str | None:
    missing = backend.missing_requirements()
    if not missing:
        return None
    hint = f": {backend.install_hint}" if backend.install_hint else ""
    return "; ".join(missing) + hint


def available_backends() -> list[BackendInfo]:
    """Every registered backend: method, providing plugin and version, usable here or why not."""
    state = plugin_state()
    rows = []
    for method, claims in sorted(state.claims.items()):
        if len(claims) > 1:
            names = " and ".join(repr(c.plugin) for c in claims)
            for claim in claims:
                rows.append(
                    BackendInfo(
                        method,
                        claim.plugin,
                        claim.distribution,
                        claim.version,
                        False,
                        f"claimed by plugins {names}: disable one (QUANTCORE_DISABLE_PLUGINS)",
                        claim.backend,
                    )
                )
            continue
        (claim,) = claims
        reason = _usability(claim.backend)
        rows.append(
            BackendInfo(method, claim.plugin, claim.distribution, claim.version, reason is None, reason, claim.backend)
        )
    return rows


def get_backend(quant_method: Any, *, require_usable: bool = True) -> Backend:
    """The backend registered for ``quant_method``; a clear error when there is none or it can't run."""
    state = plugin_state()
    claims = state.claims.get(quant_method) if isinstance(quant_method, str) else None
    if not claims:
        installed = ", ".join(repr(m) for m in sorted(state.claims)) or "none"
        if quant_method is None:
            message = f"missing; installed methods: {installed}"
        elif isinstance(quant_method, str) and quant_method in KNOWN_PROVIDERS:
            message = (
                f"{quant_method!r} is provided by the plugin {KNOWN_PROVIDERS[quant_method]}, "
                f"which is not installed or is disabled; installed methods: {installed}"
            )
        else:
            close = _close(quant_method, state.claims)
            message = f"unknown method {quant_method!r}{close}; installed methods: {installed}"
        raise ConfigError([("quant_method", message)])
    if len(claims) > 1:
        names = " and ".join(f"{c.plugin!r} ({c.distribution or 'registered at run time'})" for c in claims)
        raise PluginError(
            f"quant_method {quant_method!r} is claimed by plugins {names}; disable one with "
            f"QUANTCORE_DISABLE_PLUGINS or quantcore.disable_plugins()"
        )
    backend = claims[0].backend
    if require_usable:
        reason = _usability(backend)
        if reason:
            raise BackendUnavailableError(f"backend {quant_method!r} cannot run here: {reason}")
    return backend


def config_file_methods() -> dict[str, list[str]]:
    """``{file name: quant methods}`` of the :attr:`Backend.config_files` every registered backend reads."""
    files: dict[str, list[str]] = {}
    for method, claims in sorted(plugin_state().claims.items()):
        for claim in claims:
            for name in claim.backend.config_files:
                if method not in files.setdefault(name, []):
                    files[name].append(method)
    return files


def _close(name: Any, known: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
