"""The int4 packing and the two weight formats, as tensor functions."""

from __future__ import annotations

import pytest
import torch
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
