"""Layers built without ``__init__`` are the layers bitsandbytes builds: same attributes, tensors, outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from quantcore_bnb import BitsAndBytesConfig
from torch import nn

import quantcore

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

FOUR_BIT = [
    dict(load_in_4bit=True),
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
    dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16),
]
EIGHT_BIT = [
    dict(load_in_8bit=True),
    dict(load_in_8bit=True, llm_int8_threshold=0.0),
    dict(load_in_8bit=True, llm_int8_has_fp16_weight=True),
]


def _reference(config: BitsAndBytesConfig, linear: nn.Linear) -> nn.Module:
    """What bitsandbytes' documented flow gives: construct, load the float weights, ``.to(device)``."""
    bias = linear.bias is not None
    if config.load_in_4bit:
        ref = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias,
            config.bnb_4bit_compute_dtype,
            compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type,
            quant_storage=config.bnb_4bit_quant_storage,
        )
    else:
        ref = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias,
            has_fp16_weights=config.llm_int8_has_fp16_weight,
            threshold=config.llm_int8_threshold,
        )
    ref.load_state_dict(linear.state_dict())
    return ref.to(linear.weight.device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (packed 4-bit codes seen as bfloat16 can be NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dim() == 0:
        return torch.equal(a, b)
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _plain(value):
    if isinstance(value, (bool, int, float, str, torch.dtype, type(None))):
        return value
    return type(value).__name__


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kwargs", FOUR_BIT + EIGHT_BIT, ids=repr)
def test_same_as_a_normally_built_layer(kwargs, bias):
    config = BitsAndBytesConfig(**kwargs)
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    before = copy.deepcopy(linear.state_dict())
    ref = _reference(config, linear)
    ours = quantcore.AutoQuantizer.from_config(config).create_quantized_module(linear, "layer")
    assert all(torch.equal(v, before[k]) for k, v in linear.state_dict().items())  # the float layer is untouched

    assert type(ours) is type(ref)
    # Every attribute, by name and plain value (hook dicts by type: their handles differ).
    assert {k: _plain(v) for k, v in vars(ours).items()} == {k: _plain(v) for k, v in vars(ref).items()}
    assert {k: _plain(v) for k, v in vars(ours.weight).items()} == {k: _plain(v) for k, v in vars(ref.weight).items()}
    if config.load_in_8bit:
        assert vars(ours.state) == vars(ref.state)
    assert type(ours.weight) is type(ref.weight)
    assert ours.weight.requires_grad == ref.weight.requires_grad
    assert repr(ours) == repr(ref)
    assert len(ours._load_state_dict_pre_hooks) == len(ref._load_state_dict_pre_hooks)

    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    for key in ref_sd:
        assert same_bits(ours_sd[key], ref_sd[key]), key

    x = torch.randn(5, 64)
    if config.llm_int8_has_fp16_weight:
        return  # bitsandbytes has no CPU kernel (int8_double_quant) for this layer's forward
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), ref.eval()(x))
        ours_moved, ref_moved = ours.to("cpu"), ref.to("cpu")
        assert torch.equal(ours_moved(x), ref_moved(x))


@pytest.mark.parametrize("kwargs", FOUR_BIT + EIGHT_BIT, ids=repr)
def test_meta_skeleton_has_the_loaded_shapes(kwargs):
    config = BitsAndBytesConfig(**kwargs)
    quantizer = quantcore.AutoQuantizer.from_config(config)
    torch.manual_seed(0)
    real = quantizer.create_quantized_module(nn.Linear(64, 96), "layer")
    with torch.device("meta"):
        skeleton = quantizer.create_quantized_module(nn.Linear(64, 96), "layer")
    assert type(skeleton) is type(real)
    assert skeleton.weight.is_meta and skeleton.bias.is_meta
    for name in ("weight", "bias"):
        got, want = getattr(skeleton, name), getattr(real, name)
        assert (got.shape, got.dtype, type(got)) == (want.shape, want.dtype, type(want)), name
    if config.load_in_8bit and not config.llm_int8_has_fp16_weight:
        assert skeleton.weight.SCB.shape == real.weight.SCB.shape
        assert set(skeleton.state_dict()) == set(real.state_dict())
    assert repr(skeleton) == repr(real)


def test_skeletons_do_not_share_parameters():
    quantizer = quantcore.AutoQuantizer.from_config(BitsAndBytesConfig(load_in_4bit=True))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    quantizer.quantize(model, default_skips=False)
    assert model[0].weight is not model[1].weight and model[0].bias is not model[1].bias
    assert len(list(model.parameters())) == 4
    model[0].register_forward_hook(lambda *a: None)
    assert not model[1]._forward_hooks
