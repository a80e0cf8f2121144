"""Exact sizes of bitsandbytes layers, from shapes alone (no bitsandbytes import, works on meta).

A 4-bit layer of ``n = out * in`` weights holds (bitsandbytes 0.48 to 0.50, blocks of 64):

- the packed weight: two 4-bit codes per byte, ``(n + 1) // (2 * s)`` elements of the storage dtype
  of ``s`` bytes;
- the 16-entry float32 code table (``quant_map``, 64 bytes);
- without double quant, one float32 scale (``absmax``) per block of 64 weights;
- with double quant, one uint8 scale per block, re-quantized in blocks of 256 scales: one float32
  ``nested_absmax`` per 256 blocks, the 256-entry float32 dynamic code table (``nested_quant_map``,
  1 KiB) and a float32 offset.

An 8-bit (LLM.int8()) layer holds the int8 weight and one float32 scale (``SCB``) per output row;
with ``llm_int8_has_fp16_weight`` it keeps its float weight. The bias keeps its dtype.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCKSIZE", "NESTED_BLOCKSIZE", "linear4bit_nbytes", "linear8bit_nbytes"]

BLOCKSIZE = 64
"""Weights per 4-bit quantization block (bitsandbytes' default, which transformers uses)."""

NESTED_BLOCKSIZE = 256
"""Scales per block of the second quantization (double quant)."""

_FP32 = 4


def linear4bit_nbytes(
    out_features: int,
    in_features: int,
    *,
    double_quant: bool,
    quant_storage: torch.dtype = torch.uint8,
    bias_nbytes: int = 0,
) -> int:
    """Bytes of a ``Linear4bit`` once quantized: weight, scales, code tables and bias."""
    n = out_features * in_features
    itemsize = quant_storage.itemsize
    total = (n + 1) // (2 * itemsize) * itemsize + 16 * _FP32 + bias_nbytes
    blocks = -(-n // BLOCKSIZE)
    if double_quant:
        total += blocks + -(-blocks // NESTED_BLOCKSIZE) * _FP32 + 256 * _FP32 + _FP32
    else:
        total += blocks * _FP32
    return total


def linear8bit_nbytes(
    out_features: int,
    in_features: int,
    *,
    has_fp16_weights: bool = False,
    weight_itemsize: int = 2,
    bias_nbytes: int = 0,
) -> int:
    """Bytes of a ``Linear8bitLt``: int8 weight and one float32 scale per row (or the float weight)."""
    n = out_features * in_features
    if has_fp16_weights:
        return n * weight_itemsize + bias_nbytes
    return n + out_features * _FP32 + bias_nbytes
