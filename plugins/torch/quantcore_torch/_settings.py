"""The environment settings of torch_wo's kernels: each a value from a fixed set, read once.

Shared by :mod:`quantcore_torch.kernels` and :mod:`quantcore_torch._triton` (which kernels
imports only where Triton and CUDA exist), so that every setting is parsed, and refused, alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import overload


@overload
def choice(name: str, choices: tuple[str, ...], default: str, environ: Mapping[str, str] = ...) -> str: ...
@overload
def choice(name: str, choices: tuple[str, ...], default: None, environ: Mapping[str, str] = ...) -> str | None: ...


def choice(
    name: str, choices: tuple[str, ...], default: str | None, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The environment value ``name`` (blanks stripped), one of ``choices``; ``default`` where it
    is unset or blank. Anything else raises a ``ValueError`` naming the setting and its choices."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    if value not in choices:
        expected = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value
