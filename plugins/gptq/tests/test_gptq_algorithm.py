"""The GPTQ algorithm on single layers: it beats rounding where the inputs are correlated."""

from __future__ import annotations

import pytest
import torch
from quantcore_gptq.gptq import Hessian, gptq_quantize


def dequantize(result) -> torch.Tensor:
    g = result.g_idx.long()
    return (result.codes.float() - result.zeros.float()[g].t()) * result.scales.float()[g].t()


def correlated_inputs(tokens: int, columns: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=gen) / columns**0.5
    # some columns carry far more energy than others, in no particular order
    scale = torch.logspace(-1, 1, columns)[torch.randperm(columns, generator=gen)]
    return (torch.randn(tokens, columns, generator=gen) @ mixing) * scale


@pytest.fixture
def layer():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 128, generator=gen) * 0.02
    x = correlated_inputs(512, 128)
    hessian = Hessian.zeros(128, "cpu")
    for chunk in x.split(100):  # uneven batches: the running mean must not care
        hessian.add(chunk)
    return weight, x, hessian


def test_hessian_is_twice_the_mean_outer_product(layer):
    _, x, hessian = layer
    assert hessian.rows == 512
    torch.testing.assert_close(hessian.matrix, 2 * x.t() @ x / 512, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_output_error_is_well_below_rounding(layer, sym, desc_act):
    weight, x, hessian = layer
    options = dict(bits=4, group_size=32, sym=sym, damp_percent=0.01, desc_act=desc_act)
    gptq = gptq_quantize(weight, hessian, **options)
    rtn = gptq_quantize(weight, None, **options)  # no calibration rows: plain rounding
    error = ((x @ (dequantize(gptq) - weight).t()) ** 2).mean()
    baseline = ((x @ (dequantize(rtn) - weight).t()) ** 2).mean()
    assert error < 0.7 * baseline, (float(error), float(baseline))


def test_plain_rounding_is_min_max_with_integer_zero_points():
    weight = torch.tensor([[-1.0, 0.5, 2.0, 0.0]])
    result = gptq_quantize(weight, None, bits=4, group_size=-1, sym=False, damp_percent=0.1, desc_act=False)
    scale = torch.tensor(3.0 / 15).half().float()
    zero = torch.round(1.0 / scale)
    assert result.scales.dtype == torch.float16 and float(result.scales) == pytest.approx(float(scale))
    assert int(result.zeros) == int(zero)
    assert result.codes.tolist() == [[int(torch.round(w / scale) + zero) for w in weight[0]]]
    assert torch.equal(result.g_idx, torch.zeros(4, dtype=torch.int32))


def test_act_order_groups_columns_by_hessian_diagonal(layer):
    weight, _, hessian = layer
    result = gptq_quantize(weight, hessian, bits=4, group_size=32, sym=False, damp_percent=0.01, desc_act=True)
    order = torch.argsort(torch.diag(hessian.matrix), descending=True)
    assert torch.equal(result.g_idx[order], torch.arange(128, dtype=torch.int32) // 32)
    assert torch.bincount(result.g_idx).tolist() == [32, 32, 32, 32]


def test_dead_inputs_get_zero_weight(layer):
    weight, x, _ = layer
    x = x.clone()
    x[:, 5] = 0
    hessian = Hessian.zeros(128, "cpu")
    hessian.add(x)
    result = gptq_quantize(weight, hessian, bits=8, group_size=128, sym=True, damp_percent=0.1, desc_act=False)
    assert torch.equal(dequantize(result)[:, 5], torch.zeros(48))
