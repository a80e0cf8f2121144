"""The GPTQ checkpoint format, as tensor functions.

A GPTQ linear layer with ``in`` inputs, ``out`` outputs and ``G`` groups stores::

    qweight  int32 [in * bits / 32, out]    codes packed along the input dimension
    qzeros   int32 [G, out * bits / 32]     zero points packed along the output dimension
    scales   fp16  [G, out]
    g_idx    int32 [in]                      the group of each input column
    bias     [out] (when the layer has one)

and stands for ``W[o, i] = scales[g, o] * (code[i, o] - zero[g, o])`` with ``g = g_idx[i]``.

Packing: each run of 32 codes along the packed dimension is one little-endian bit stream of
``bits`` int32 words, code ``k`` at bit ``bits * k``. For 2, 4 and 8 bits that is the familiar
``32 / bits`` codes per word, code ``j`` of a word at bit ``bits * j``; for 3 bits, 32 codes fill
three words and two codes straddle a word boundary (AutoGPTQ's layout).

Zero points: the ``gptq`` (v1) format, which transformers and AutoGPTQ read, stores every packed
zero point minus one, subtracted from each whole int32 word (``word - 0x11111111`` for 4 bits);
``gptq_v2`` stores them as they are. A zero point of 0 (asymmetric quantization) borrows from its
neighbour in v1; adding the same constant back undoes it exactly, which is how GPTQModel reads v1.
Symmetric zero points (``2 ** (bits - 1)``) never borrow. At 3 bits each zero point is shifted on
its own, modulo 8 (AutoGPTQ's per-code ``zeros - 1`` and GPTQModel's 3-bit reading): a per-word
subtraction would lose the borrow of the two zero points that straddle word boundaries.
"""

from __future__ import annotations

import torch

__all__ = [
    "PACKED_BITS",
    "pack_cols",
    "pack_rows",
    "packing_multiple",
    "unpack_cols",
    "unpack_rows",
    "zeros_from_v1",
    "zeros_to_v1",
]

PACKED_BITS = (2, 3, 4, 8)
_MASK32 = 0xFFFFFFFF


def packing_multiple(bits: int) -> int:
    """Packed dimensions must be a multiple of this: ``32 / bits``, or 32 for 3 bits."""
    return 32 // bits if 32 % bits == 0 else 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 tensor with the same bits."""
    words = words & _MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[n, cols]`` codes in ``0 .. 2**bits - 1`` -> int32 ``[n * bits / 32, cols]``, packed along dim 0."""
    n, cols = codes.shape
    if n % packing_multiple(bits):
        raise ValueError(f"{n} rows cannot be packed at {bits} bits: need a multiple of {packing_multiple(bits)}")
    v = codes.to(torch.int64)
    if 32 % bits == 0:
        per = 32 // bits
        shifts = (torch.arange(per, device=v.device) * bits).view(1, per, 1)
        return _to_int32((v.reshape(n // per, per, cols) << shifts).sum(1))
    v = v.reshape(n // 32, 32, cols)
    words = torch.zeros(n // 32, bits, cols, dtype=torch.int64, device=v.device)
    for k in range(32):
        word, offset = divmod(bits * k, 32)
        words[:, word] |= (v[:, k] << offset) & _MASK32
        if offset + bits > 32:
            words[:, word + 1] |= v[:, k] >> (32 - offset)
    return _to_int32(words.reshape(-1, cols))


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[n * bits / 32, cols]`` -> int32 codes ``[n, cols]``."""
    cols = packed.shape[1]
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # int32 shifts are arithmetic, but the mask drops the copied sign bits
        per = 32 // bits
        shifts = (torch.arange(per, device=packed.device, dtype=torch.int32) * bits).view(1, per, 1)
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1, cols)[:n]
    p = (packed.to(torch.int64) & _MASK32).reshape(-1, bits, cols)
    out = []
    for k in range(32):
        word, offset = divmod(bits * k, 32)
        value = p[:, word] >> offset
        if offset + bits > 32:
            value = value | (p[:, word + 1] << (32 - offset))
        out.append(value & mask)
    return torch.stack(out, 1).reshape(-1, cols)[:n].to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` codes -> int32 ``[rows, n * bits / 32]``, packed along dim 1 (``qzeros``)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`."""
    return unpack_rows(packed.t(), bits, n).t().contiguous()


def _ones(bits: int, words: int, device: torch.device) -> torch.Tensor:
    """Per packed word, the constant with a 1 at the lowest bit of every code starting in it."""
    per_stream = []
    for word in range(bits if 32 % bits else 1):
        value = sum(1 << (bits * k - 32 * word) for k in range(32) if (bits * k) // 32 == word)
        per_stream.append(value)
    pattern = torch.tensor(per_stream, dtype=torch.int64, device=device)
    return pattern.repeat(-(-words // len(per_stream)))[:words]


def _shift_each(qzeros: torch.Tensor, bits: int, delta: int) -> torch.Tensor:
    """Add ``delta`` to each packed zero point on its own, modulo ``2 ** bits``."""
    n = qzeros.shape[1] * 32 // bits
    return pack_cols((unpack_cols(qzeros, bits, n) + delta) & ((1 << bits) - 1), bits)


def zeros_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed zero points as they are (v2) -> the ``gptq`` v1 storage (each one minus one)."""
    if 32 % bits:
        # 3 bits: two zero points of each 32 straddle a word boundary, where a per-word
        # subtraction would lose the borrow; AutoGPTQ and GPTQModel shift each one on its own.
        return _shift_each(qzeros, bits, -1)
    ones = _ones(bits, qzeros.shape[1], qzeros.device)
    return _to_int32((qzeros.to(torch.int64) & _MASK32) - ones)


def zeros_from_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`zeros_to_v1`: v1 storage -> packed zero points as they are."""
    if 32 % bits:
        return _shift_each(qzeros, bits, 1)
    ones = _ones(bits, qzeros.shape[1], qzeros.device)
    return _to_int32((qzeros.to(torch.int64) & _MASK32) + ones)
