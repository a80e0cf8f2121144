"""``QuantizationReport``: what a quantize (or plan, or dequantize) call did to each module."""

from __future__ import annotations

import json
from typing import Any

import attrs

__all__ = ["ModuleRecord", "QuantizationReport", "format_bytes"]


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@attrs.define
class ModuleRecord:
    """One module the call considered."""

    name: str
    """The module's qualified name in the model (``"model.layers.0.mlp.up_proj"``)."""
    module_type: str
    """The class name of the module the call found there (``"Linear"``)."""
    action: str
    """``"quantized"``, ``"skipped"`` or ``"dequantized"``."""
    rule: str
    """The rule that decided (``"default: output head"``, ``"skip: 'lm_head'"``, ...)."""
    method: str | None
    """The backend's label for quantized modules (``"bitsandbytes nf4"``)."""
    params: int
    """How many parameters the module holds."""
    bytes_before: int
    """Bytes of the module's tensors before the call."""
    bytes_after: int
    """Bytes of the module's tensors after the call (quantization constants included)."""
    calibration_tokens: int | None = None
    """Calibration tokens (activation rows) the module was quantized from; ``None`` for data-free methods."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return attrs.asdict(self)


@attrs.define
class QuantizationReport:
    """Per-module decisions and the model's size before and after.

    ``bytes_before`` / ``bytes_after`` count every parameter and buffer of the model (tied tensors once).
    """

    modules: list[ModuleRecord]
    model_params: int
    bytes_before: int
    bytes_after: int
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def quantized(self) -> list[ModuleRecord]:
        """Records of the modules replaced by quantized ones."""
        return [m for m in self.modules if m.action == "quantized"]

    @property
    def skipped(self) -> list[ModuleRecord]:
        """Records of the candidate modules kept as they were, with the rule that kept them."""
        return [m for m in self.modules if m.action == "skipped"]

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the whole model after the call."""
        return 8.0 * self.bytes_after / self.model_params if self.model_params else 0.0

    @property
    def quantized_bits_per_param(self) -> float:
        """Bits per parameter of the quantized modules alone (weights, bias and quantization constants)."""
        params = sum(m.params for m in self.quantized)
        return 8.0 * sum(m.bytes_after for m in self.quantized) / params if params else 0.0

    def record(self, name: str) -> ModuleRecord:
        """The record of the module called ``name``."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with totals."""
        return {
            "dry_run": self.dry_run,
            "seconds": self.seconds,
            "model_params": self.model_params,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bits_per_param": self.bits_per_param,
            "quantized_bits_per_param": self.quantized_bits_per_param,
            "counts": self.counts(),
            "modules": [m.to_dict() for m in self.modules],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def counts(self) -> dict[str, int]:
        """How many modules took each action."""
        out: dict[str, int] = {}
        for m in self.modules:
            out[m.action] = out.get(m.action, 0) + 1
        return out

    def summary(self) -> str:
        """One paragraph: counts, sizes and bits per parameter."""
        counts = ", ".join(f"{n} {action}" for action, n in sorted(self.counts().items())) or "nothing to do"
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("inf")
        head = "plan (dry run)" if self.dry_run else "quantization"
        return (
            f"{head}: {counts}; {format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)} "
            f"({ratio:.2f}x smaller), {self.bits_per_param:.2f} bits/param overall, "
            f"{self.quantized_bits_per_param:.2f} in quantized modules"
            + (f"; {self.seconds:.2f} s" if self.seconds else "")
        )

    def table(self, max_rows: int | None = 40) -> str:
        """A readable table, one row per module (the middle elided past ``max_rows``)."""
        rows = [
            (m.name, m.action, m.method or "-", m.rule, format_bytes(m.bytes_before), format_bytes(m.bytes_after))
            for m in self.modules
        ]
        header = ("module", "action", "method", "rule", "before", "after")
        if max_rows is not None and len(rows) > max_rows:
            half = max_rows // 2
            rows = [*rows[:half], (f"... {len(rows) - 2 * half} more ...", "", "", "", "", ""), *rows[-half:]]
        widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=False)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
