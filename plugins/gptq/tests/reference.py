"""An independent, loop-by-loop reading of the GPTQ checkpoint format, for the tests to check against.

Written from the format's description (AutoGPTQ's ``pack`` loops, GPTQModel's v1 -> v2 zero-point
conversion), in NumPy with ``uint32`` words and one code at a time: slow, plain, and sharing no
code with :mod:`quantcore_gptq.packing`.
"""

from __future__ import annotations

import numpy as np
import torch


def pack_autogptq(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight packing: ``intweight [in, out]`` -> uint32 ``[in * bits / 32, out]``."""
    intweight = intweight.astype(np.uint32)
    rows = intweight.shape[0] * bits // 32
    qweight = np.zeros((rows, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < rows:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 codes, a straddling one, 10, a straddling one, 10
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight


def unpack_4bit(qweight: np.ndarray, n: int) -> np.ndarray:
    """Codes of a 4-bit packed ``[n / 8, cols]`` tensor, one nibble at a time."""
    out = np.zeros((n, qweight.shape[1]), dtype=np.int64)
    for i in range(n):
        out[i] = (qweight[i // 8] >> (4 * (i % 8))) & 0xF
    return out


def as_uint32(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


def dequantize_v1_4bit(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> np.ndarray:
    """``W [out, in]`` of a 4-bit v1 checkpoint the way GPTQModel reads it: add 1 to every zero point
    by adding ``0x11111111`` to each whole word (undoing the saved borrow), then unpack."""
    in_features = g_idx.numel()
    codes = unpack_4bit(as_uint32(qweight), in_features)  # [in, out]
    words = (as_uint32(qzeros).astype(np.uint64) + 0x11111111) & 0xFFFFFFFF
    zeros = unpack_4bit(words.T.astype(np.uint32), scales.shape[1]).T  # [groups, out]
    g = g_idx.numpy().astype(np.int64)
    w = (codes - zeros[g]) * scales.float().numpy()[g]
    return w.T
