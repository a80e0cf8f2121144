"""An RMS norm split for the folded kernels (:mod:`quantcore_torch._fold`), in PyTorch ops: the
norm's input ``g * h`` and the sum of squares of ``h`` in the kernels' int64 fixed point. A
decoder layer whose input no folded kernel wrote (a stack's first layer) makes both here; the
kernels then do the rest, ``rms_norm(h) @ W.T == rsqrt(sum(h**2) / K + eps) * (g * h) @ W.T``.
"""

from __future__ import annotations

import torch

__all__ = ["SUMSQ_SCALE", "rms_input", "sumsq_counter"]

#: The counter's unit: 2**-24 of a squared feature (it resolves 6e-8 and holds sums to 5e11).
SUMSQ_SCALE = 2.0**24


def sumsq_counter(h: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """A norm's counter: zero (on ``device``), or ``sum(h**2)`` of one token's hidden state ``h``
    in the kernels' fixed point."""
    if h is None:
        return torch.zeros((), dtype=torch.int64, device=device)
    return (h.double().square().sum() * SUMSQ_SCALE).to(torch.int64)


def rms_input(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight * h`` rounded to ``h``'s dtype once, as the folded kernels write a norm's input."""
    return (weight.float() * h.float()).to(h.dtype)
