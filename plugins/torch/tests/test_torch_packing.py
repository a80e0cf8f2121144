"""The int4 packing and the two weight formats, as tensor functions."""

from __future__ import annotations

import pytest
import torch
from quantcore_torch import packing
from quantcore_torch.packing import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


@pytest.mark.parametrize("cols", [1, 2, 7, 32, 33, 128])
def test_pack_unpack_round_trip(cols):
    codes = torch.randint(0, 16, (5, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(cols))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, (cols + 1) // 2)
    assert torch.equal(unpack_int4(packed, cols), codes)


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0, 9]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[0x21, 0x0F, 0x09]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_is_symmetric_per_row(dtype):
    w = (torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (16,)
    # Each row's largest magnitude lands on +-127 (up to the scale's rounding to ``dtype``).
    assert (q.abs().amax(dim=1) >= 126).all()
    torch.testing.assert_close(scale.float(), (w.float().abs().amax(dim=1) / 127).to(dtype).float())
    error = (dequantize_int8(q, scale, torch.float32) - w.float()).abs()
    assert (error <= scale.float()[:, None] * 0.51 + 1e-6).all()


@pytest.mark.parametrize(("in_features", "group_size"), [(64, 32), (100, 32), (33, 128), (7, 32)])
def test_int4_codes_and_error_per_group(in_features, group_size):
    w = torch.randn(8, in_features, generator=torch.Generator().manual_seed(in_features)) * 0.02
    packed, scale, zero = quantize_int4(w, group_size)
    groups = -(-in_features // group_size)
    assert packed.shape == (8, (in_features + 1) // 2)
    assert scale.shape == zero.shape == (8, groups)
    assert ((zero >= 0) & (zero <= 15)).all()
    back = dequantize_int4(packed, scale, zero, in_features, group_size, torch.float32)
    assert back.shape == w.shape
    # Round to nearest: at most half a step from the original, in every group (the short last one too).
    step = scale.repeat_interleave(group_size, dim=1)[:, :in_features]
    assert ((back - w).abs() <= step * 0.5 + 1e-7).all()


def test_zero_rows_and_groups_are_exact():
    w = torch.zeros(3, 64)
    w[1, 32:] = 0.5  # a constant, non-zero group
    packed, scale, zero = quantize_int4(w, 32)
    assert torch.equal(dequantize_int4(packed, scale, zero, 64, 32, torch.float32), w)
    q, s = quantize_int8(w)
    assert torch.equal(dequantize_int8(q, s, torch.float32), w)


def test_meta_tensors_give_shapes_only():
    w = torch.empty(4, 48, device="meta", dtype=torch.bfloat16)
    packed, scale, zero = quantize_int4(w, 32)
    assert packed.is_meta and packed.shape == (4, 24)
    assert scale.shape == zero.shape == (4, 2) and scale.dtype == torch.bfloat16
    assert dequantize_int4(packed, scale, zero, 48, 32, torch.float16).shape == (4, 48)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dequantize_int8_gives_the_fp32_product_rounded_once(dtype):
    # Every code against scales over ten decades (subnormal fp16 ones included): the one-pass
    # product in dtype must be the fp32 product rounded once to dtype, bit for bit.
    gen = torch.Generator().manual_seed(0)
    codes = torch.arange(-128, 128, dtype=torch.int8).repeat(2048, 1)
    scale = (torch.rand(2048, generator=gen) * 10 ** torch.empty(2048).uniform_(-8, 2, generator=gen)).to(dtype)
    expected = (codes.float() * scale.float()[:, None]).to(dtype)
    assert torch.equal(dequantize_int8(codes, scale, dtype), expected)
    # A scale in another dtype than the output's: rounded once from fp32 as well.
    other = scale.float() * 1.0001
    assert torch.equal(dequantize_int8(codes, other, dtype), (codes.float() * other[:, None]).to(dtype))


@pytest.mark.parametrize("block", [None, 1, 1000], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("out_features", "in_features", "group_size"), [(64, 256, 32), (40, 130, 64), (7, 33, 32)])
def test_dequantize_int4_gives_the_fp32_formula_rounded_once(
    dtype, out_features, in_features, group_size, block, monkeypatch
):
    if block is not None:  # the CPU works a block of rows at a time: one row, or a few with a short last block
        monkeypatch.setattr(packing, "_CPU_BLOCK", block)
    gen = torch.Generator().manual_seed(in_features)
    w = torch.randn(out_features, in_features, generator=gen) * 10 ** torch.empty(out_features, 1).uniform_(-4, 1)
    packed, scale, zero = quantize_int4(w.to(dtype), group_size)
    groups = scale.shape[1]
    codes = torch.nn.functional.pad(unpack_int4(packed, in_features), (0, groups * group_size - in_features))
    codes = codes.reshape(out_features, groups, group_size)
    expected = ((codes.float() - zero.float()[..., None]) * scale.float()[..., None]).reshape(out_features, -1)
    out = dequantize_int4(packed, scale, zero, in_features, group_size, dtype)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, expected[:, :in_features].to(dtype))
