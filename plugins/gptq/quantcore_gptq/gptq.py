"""The GPTQ algorithm (Frantar et al., 2022) in PyTorch.

For a linear layer with weight ``W [out, in]`` and calibration inputs ``X [tokens, in]``, GPTQ
minimises ``||W X^T - Q X^T||^2`` over quantized ``Q``, one input column at a time: it rounds a
column, then spreads the rounding error over the columns not yet rounded, weighted by the inverse
of the Hessian ``H = 2 X^T X / tokens``. Columns go in blocks of 128 so the updates are matmuls
("lazy batch" updates); the inverse Hessian comes from a Cholesky factorisation.

``desc_act`` (act-order) rounds the columns by decreasing ``diag(H)`` first; ``g_idx`` then records
each column's group, since groups follow that order. Scales are rounded to fp16 (what the
checkpoint stores) before they are used, so the codes are exactly the ones the stored scales need.
"""

from __future__ import annotations

import math

import attrs
import torch

__all__ = ["GPTQResult", "Hessian", "gptq_quantize"]

BLOCK_COLUMNS = 128
"""Columns updated together (the lazy-batch width of the paper)."""

_EXTRA_DAMPING = (0.0, 0.01, 0.05, 0.1, 0.3, 0.9)
"""Dampening added to ``damp_percent`` in turn when the Hessian is not positive definite."""


@attrs.define
class Hessian:
    """``2 X^T X / n`` over every input row seen so far, accumulated batch by batch in float32."""

    matrix: torch.Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, columns: int, device: torch.device | str) -> Hessian:
        """An empty Hessian for a layer with ``columns`` inputs."""
        return cls(torch.zeros(columns, columns, dtype=torch.float32, device=device))

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x [tokens, columns]`` (a running mean, so batches may differ in size)."""
        x = x.reshape(-1, x.shape[-1]).to(device=self.matrix.device, dtype=torch.float32)
        n = x.shape[0]
        if not n:
            return
        self.matrix.mul_(self.rows / (self.rows + n))
        self.rows += n
        x = x * math.sqrt(2 / self.rows)
        self.matrix.addmm_(x.t(), x)


@attrs.frozen
class GPTQResult:
    """One quantized weight: ``W[o, i] ~ scales[g_idx[i], o] * (codes[o, i] - zeros[g_idx[i], o])``."""

    codes: torch.Tensor
    """uint8 ``[out, in]``, in the layer's column order."""
    scales: torch.Tensor
    """fp16 ``[groups, out]``."""
    zeros: torch.Tensor
    """uint8 ``[groups, out]``: integer zero points."""
    g_idx: torch.Tensor
    """int32 ``[in]``: the group of each input column."""


def _group_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` for the columns ``w [out, columns]`` of one group (min-max)."""
    maxq = 2**bits - 1
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    flat = (lo == 0) & (hi == 0)
    lo = torch.where(flat, -1.0, lo)
    hi = torch.where(flat, 1.0, hi)
    scale = ((hi - lo) / maxq).to(scale_dtype).float()
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).tiny, scale)  # underflowed in fp16
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def _inverse_hessian_factor(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` after dampening ``H``; more dampening until it is positive definite."""
    mean = torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for extra in _EXTRA_DAMPING:
        damp = min(damp_percent + extra, 0.99)
        factor, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("the Hessian is not positive definite even with 99% dampening (are the activations finite?)")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: Hessian | None,
    *,
    bits: int,
    group_size: int,
    sym: bool,
    damp_percent: float,
    desc_act: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> GPTQResult:
    """Quantize ``weight [out, in]`` with GPTQ; a ``hessian`` of no rows (or ``None``) means plain rounding."""
    w = weight.detach().to(torch.float32).clone()
    out_features, columns = w.shape
    if hessian is None or hessian.rows == 0:
        h = torch.eye(columns, dtype=torch.float32, device=w.device)
    else:
        h = hessian.matrix.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = _inverse_hessian_factor(h, damp_percent)
    del h
    maxq = 2**bits - 1
    size = columns if group_size == -1 else group_size
    groups = -(-columns // size)
    codes = torch.empty(out_features, columns, dtype=torch.uint8, device=w.device)
    scales = torch.empty(groups, out_features, dtype=torch.float32, device=w.device)
    zeros = torch.empty(groups, out_features, dtype=torch.float32, device=w.device)
    scale = zero = w.new_empty(0)
    for i1 in range(0, columns, BLOCK_COLUMNS):
        i2 = min(i1 + BLOCK_COLUMNS, columns)
        block = w[:, i1:i2].clone()
        errors = torch.empty_like(block)
        hinv_block = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if column % size == 0:
                # the group's columns as they are now: updated ones in this block, the rest beyond it
                current = torch.cat((block[:, i : i + size], w[:, i2 : column + size]), dim=1)
                scale, zero = _group_params(current, bits, sym, scale_dtype)
                scales[column // size] = scale
                zeros[column // size] = zero
            x = block[:, i]
            q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
            codes[:, column] = q.to(torch.uint8)
            error = (x - scale * (q - zero)) / hinv_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    g_idx = torch.arange(columns, device=w.device, dtype=torch.int32) // size
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        g_idx = g_idx[inverse]
    return GPTQResult(codes, scales.to(scale_dtype), zeros.to(torch.uint8), g_idx)
