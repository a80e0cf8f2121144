"""The exceptions quantcore raises: each names what is wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterable


class QuantcoreError(Exception):
    """Base class of every error quantcore raises on purpose."""


class ConfigError(QuantcoreError, ValueError):
    """One or more problems with a quantization config, all reported at once.

    ``errors`` holds ``(field, message)`` pairs, one per problem; ``field`` is the dotted path of
    the offending key (``""`` for the config as a whole).
    """

    def __init__(self, errors: Iterable[tuple[str, str]], *, title: str = "invalid quantization config"):
        self.errors: list[tuple[str, str]] = list(errors)
        self.title = title
        super().__init__(self._format())

    def _format(self) -> str:
        n = len(self.errors)
        lines = [f"{self.title}: {n} problem{'s' if n != 1 else ''}"]
        for field, message in self.errors:
            lines.append(f"  - {field}: {message}" if field else f"  - {message}")
        return "\n".join(lines)

    def __reduce__(self):  # keep the error picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.errors,), {"title": self.title})


class PluginError(QuantcoreError):
    """A plugin is broken or two plugins claim the same quantization method."""


class BackendUnavailableError(QuantcoreError, ImportError):
    """The backend is registered but cannot run here (a package is missing or too old)."""


class QuantizationError(QuantcoreError, RuntimeError):
    """Quantizing a model failed; the model was left exactly as it was."""


class QuantizationVetoed(QuantizationError):
    """A plugin's ``before_quantize`` hook refused the quantization."""


class CheckpointError(QuantcoreError, ValueError):
    """A checkpoint is missing, truncated, corrupt or does not match the model or config."""
