"""Module-name patterns: full dotted name, dotted suffix, glob, or ``re:`` regular expression."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

__all__ = ["compile_pattern", "exact_name"]


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate on dotted module names.

    - ``"re:<regex>"``: the regex must match the whole name (``re.fullmatch``).
    - a pattern with ``*``, ``?`` or ``[``: a shell glob over the whole name (``*`` crosses dots).
    - otherwise: the full name, or a dotted suffix of it (``"lm_head"`` matches ``"model.lm_head"``,
      not ``"model.lm_head_2"``).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a module pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"invalid regular expression in pattern {pattern!r}: {exc}") from None
        return lambda name: regex.fullmatch(name) is not None
    if any(c in pattern for c in "*?["):
        glob = re.compile(fnmatch.translate(pattern))
        return lambda name: glob.match(name) is not None
    suffix = "." + pattern
    return lambda name: name == pattern or name.endswith(suffix)


def exact_name(name: str) -> Callable[[str], bool]:
    """A predicate true for the module called ``name`` alone (for rules that name one module)."""
    return lambda other: other == name
