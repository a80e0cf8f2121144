"""The GPTQ checkpoint format: packing against AutoGPTQ's loops, and the v1 zero-point offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quantcore_gptq.packing import (
    pack_cols,
    pack_rows,
    packing_multiple,
    unpack_cols,
    unpack_rows,
    zeros_from_v1,
    zeros_to_v1,
)

from .reference import as_uint32, pack_autogptq, unpack_4bit


def codes(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2**bits, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_autogptq_and_round_trips(bits):
    c = codes(64, 24, bits)
    packed = pack_rows(c, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 24)
    assert np.array_equal(as_uint32(packed), pack_autogptq(c.numpy(), bits))
    assert torch.equal(unpack_rows(packed, bits, 64), c)
    assert torch.equal(unpack_cols(pack_cols(c.t(), bits), bits, 64), c.t())


def test_four_bit_codes_sit_in_nibbles_low_first():
    c = torch.arange(16, dtype=torch.int32).reshape(16, 1)
    packed = as_uint32(pack_rows(c, 4))
    assert [hex(w) for w in packed[:, 0]] == ["0x76543210", "0xfedcba98"]
    assert np.array_equal(unpack_4bit(packed, 16)[:, 0], np.arange(16))


def test_sizes_that_do_not_pack_are_refused():
    assert [packing_multiple(b) for b in (2, 3, 4, 8)] == [16, 32, 8, 4]
    with pytest.raises(ValueError, match="12 rows cannot be packed at 4 bits: need a multiple of 8"):
        pack_rows(codes(12, 2, 4), 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_zero_points_round_trip_exactly_even_at_zero(bits):
    zeros = codes(3, 64, bits)
    zeros[0, :8] = 0  # asymmetric zero points of 0 borrow from their neighbours in v1
    v2 = pack_cols(zeros, bits)
    assert torch.equal(unpack_cols(zeros_from_v1(zeros_to_v1(v2, bits), bits), bits, 64), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_stores_symmetric_zero_points_minus_one(bits):
    """What transformers/AutoGPTQ readers assume: unpack each code, add one."""
    zeros = torch.full((2, 32), 2 ** (bits - 1), dtype=torch.int32)
    v1 = zeros_to_v1(pack_cols(zeros, bits), bits)
    assert torch.equal(unpack_cols(v1, bits, 32) + 1, zeros)


def test_three_bit_v1_stores_every_zero_point_minus_one_even_across_words():
    """Zero points 10 and 21 of each 32 straddle a word boundary; 4 (symmetric) and 0 there must
    still read back as AutoGPTQ wrote them: each code minus one, modulo 8."""
    zeros = codes(4, 64, 3)
    zeros[0], zeros[1, 10], zeros[1, 21], zeros[2, 42] = 4, 0, 4, 0
    v1 = zeros_to_v1(pack_cols(zeros, 3), 3)
    assert torch.equal(unpack_cols(v1, 3, 64), (zeros - 1) & 7)
    assert torch.equal(unpack_cols(zeros_from_v1(v1, 3), 3, 64), zeros)
