"""What a plugin registers (:class:`Backend`) and one row of the registry's listing (:class:`BackendInfo`).

Plain data, below both :mod:`quantcore.plugins` (which collects backends from the hooks) and
:mod:`quantcore.registry` (which answers for them).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .config import QuantizationConfigMixin
    from .quantizer import Quantizer

__all__ = ["Backend", "BackendInfo"]


@attrs.frozen
class Backend:
    """What a plugin registers through the ``register_backends`` hook."""

    quant_method: str
    """The ``quant_method`` its configs carry (``"bitsandbytes"``)."""
    config_class: type[QuantizationConfigMixin]
    """The :class:`~quantcore.QuantizationConfigMixin` subclass."""
    quantizer: type[Quantizer] | str
    """The :class:`~quantcore.Quantizer` subclass, or ``"module:Class"`` to import it only when the
    backend is used (keeps heavy imports out of discovery)."""
    requires: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """Requirement strings (``"bitsandbytes>=0.48"``) that must be installed to run."""
    install_hint: str | None = None
    """What to tell a user when a requirement is missing."""
    description: str = ""
    """One line for ``quantcore backends``."""
    config_files: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """Names of files that other tools write beside a checkpoint's weights holding this method's
    config by itself, ``quant_method`` optional (AutoGPTQ's ``quantize_config.json``). A checkpoint
    is read with such a file when ``config.json`` has no ``quantization_config``; with both, they
    must agree."""

    def quantizer_class(self) -> type[Quantizer]:
        """The quantizer class, imported on first use."""
        if isinstance(self.quantizer, str):
            module, _, name = self.quantizer.partition(":")
            return getattr(importlib.import_module(module), name)
        return self.quantizer

    def missing_requirements(self) -> list[str]:
        """One line per requirement that is not installed or too old here."""
        from packaging.requirements import Requirement

        problems = []
        for text in self.requires:
            req = Requirement(text)
            try:
                version = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{req.name} is not installed")
                continue
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{req.name} {version} is installed but {text} is needed")
        return problems


@attrs.frozen
class BackendInfo:
    """One row of :func:`available_backends`."""

    quant_method: str
    plugin: str
    distribution: str | None
    version: str | None
    usable: bool
    reason: str | None
    backend: Backend | None = attrs.field(default=None, repr=False, eq=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``quantcore backends --json``)."""
        return {
            "quant_method": self.quant_method,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "usable": self.usable,
            "reason": self.reason,
        }
