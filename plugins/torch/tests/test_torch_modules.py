"""``WeightOnlyLinear``: documented accuracy, exact memory, state dicts, meta skeletons, dequantize."""

from __future__ import annotations

import io

import pytest
import torch
from quantcore_torch import TorchWeightOnlyConfig, TorchWeightOnlyQuantizer, WeightOnlyLinear
from torch import nn

from quantcore.quantizer import module_nbytes

# The bounds stated in quantcore_torch/modules.py and docs/writing-a-plugin.md (relative L2 error of
# the outputs, N(0, 0.02) weights with 512 inputs, N(0, 1) activations).
BOUNDS = {(8, 128): 0.01, (4, 128): 0.11, (4, 64): 0.10, (4, 32): 0.09}
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def exact_reference(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(("bits", "group_size"), list(BOUNDS))
def test_output_error_within_documented_bound(bits, group_size, dtype, device, gaussian_linear):
    linear = gaussian_linear(512, 256, dtype=dtype, device=device)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    module = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=group_size)
    out = module(x)
    assert out.dtype == dtype and out.device == x.device
    assert relative_error(out, exact_reference(linear, x)) < BOUNDS[bits, group_size]


def test_int4_error_decreases_as_group_size_shrinks(gaussian_linear):
    linear = gaussian_linear(512, 256)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    ref = exact_reference(linear, x)
    modules = [WeightOnlyLinear.from_linear(linear, bits=4, group_size=g) for g in (128, 64, 32)]
    errors = [relative_error(module(x), ref) for module in modules]
    assert errors[0] > errors[1] > errors[2]
    int8 = relative_error(WeightOnlyLinear.from_linear(linear, bits=8)(x), ref)
    assert int8 < errors[2] / 5


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(("bits", "group_size"), list(BOUNDS))
def test_bits_per_parameter_is_the_formats_promise(bits, group_size, dtype, gaussian_linear):
    # in_features a multiple of group_size and even: the formula is exact.
    linear = gaussian_linear(512, 256, bias=False, dtype=dtype)
    module = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=group_size)
    scale_bits = 8 * dtype.itemsize
    expected = 8 + scale_bits / 512 if bits == 8 else 4 + 2 * scale_bits / group_size
    assert 8 * module_nbytes(module) / linear.weight.numel() == expected


@pytest.mark.parametrize(
    ("in_features", "bits", "group_size"),
    [
        (512, 8, 128),
        (100, 8, 128),
        (512, 4, 32),
        (100, 4, 32),
        (33, 4, 128),
        (7, 4, 64),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_quantized_nbytes_equals_the_real_modules_bytes(in_features, bits, group_size, bias, gaussian_linear):
    quantizer = TorchWeightOnlyQuantizer(TorchWeightOnlyConfig(bits=bits, group_size=group_size))
    for dtype in FLOATS:
        linear = gaussian_linear(in_features, 24, bias=bias, dtype=dtype)
        real = quantizer.create_quantized_module(linear, "layer")
        assert quantizer.quantized_nbytes(linear) == module_nbytes(real)
        meta = linear.to("meta")
        assert quantizer.quantized_nbytes(meta) == module_nbytes(real)


@pytest.mark.parametrize(("in_features", "group_size"), [(100, 32), (33, 128), (7, 64)])
def test_padded_last_group_stays_accurate(in_features, group_size, gaussian_linear):
    linear = gaussian_linear(in_features, 64)
    x = torch.randn(16, in_features, generator=torch.Generator().manual_seed(2))
    module = WeightOnlyLinear.from_linear(linear, bits=4, group_size=group_size)
    assert module.qweight.shape == (64, (in_features + 1) // 2)
    assert relative_error(module(x), exact_reference(linear, x)) < BOUNDS[4, 128]


@pytest.mark.parametrize(("bits", "group_size"), [(8, 128), (4, 32), (4, 128)])
def test_input_module_is_left_unchanged(bits, group_size, gaussian_linear):
    linear = gaussian_linear(100, 40)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    WeightOnlyLinear.from_linear(linear, bits=bits, group_size=group_size)
    assert all(torch.equal(before[k], v) for k, v in linear.state_dict().items())
    assert linear.weight.dtype == torch.float32 and linear.weight.requires_grad


def test_no_random_initialisation_runs(gaussian_linear):
    # If a random init ran, it would draw from torch's generator: its state must not move.
    linear = gaussian_linear(64, 32)
    state = torch.get_rng_state()
    for bits in (4, 8):
        module = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=32)
        TorchWeightOnlyQuantizer.dequantize_module(module)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(("bits", "group_size"), [(8, 128), (4, 32), (4, 64)])
def test_state_dict_round_trip_through_a_meta_skeleton(bits, group_size, device, gaussian_linear):
    config = TorchWeightOnlyConfig(bits=bits, group_size=group_size)
    quantizer = TorchWeightOnlyQuantizer(config)
    linear = gaussian_linear(96, 48, dtype=torch.bfloat16, device=device)
    module = quantizer.create_quantized_module(linear, "layer")
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    skeleton = quantizer.create_quantized_module(linear.to("meta"), "layer")
    loaded = quantizer.load_quantized_state(skeleton, state, device=device)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    x = torch.randn(5, 96, dtype=torch.bfloat16, device=device)
    assert torch.equal(loaded(x), module(x))


def test_load_quantized_state_names_every_mismatch(gaussian_linear):
    quantizer = TorchWeightOnlyQuantizer(TorchWeightOnlyConfig(bits=4, group_size=32))
    linear = gaussian_linear(64, 16)
    state = dict(quantizer.create_quantized_module(linear, "layer").state_dict())
    state["scale"] = state["scale"].half()
    del state["zero"]
    skeleton = quantizer.create_quantized_module(linear.to("meta"), "layer")
    expected = r"zero: missing.*scale: expected torch.float32 \(16, 2\), got torch.float16"
    with pytest.raises(ValueError, match=expected):
        quantizer.load_quantized_state(skeleton, state)
    int8 = TorchWeightOnlyQuantizer(TorchWeightOnlyConfig(bits=8)).create_quantized_module(linear, "layer")
    with pytest.raises(ValueError, match=r"qweight: expected torch\.uint8"):
        quantizer.load_quantized_state(skeleton, int8.state_dict())


@pytest.mark.parametrize(("bits", "group_size"), [(8, 128), (4, 32)])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_meta_module_gives_a_meta_skeleton(bits, group_size, dtype, gaussian_linear):
    linear = nn.Linear(100, 40, device="meta", dtype=dtype)
    skeleton = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=group_size)
    real = WeightOnlyLinear.from_linear(gaussian_linear(100, 40, dtype=dtype), bits=bits, group_size=group_size)
    meta_state, real_state = skeleton.state_dict(), real.state_dict()
    assert meta_state.keys() == real_state.keys()
    for key, tensor in meta_state.items():
        assert tensor.is_meta
        assert (tensor.shape, tensor.dtype) == (real_state[key].shape, real_state[key].dtype), key


@pytest.mark.parametrize(("bits", "group_size"), [(8, 128), (4, 32)])
def test_dequantize_gives_a_close_linear(bits, group_size, device, gaussian_linear):
    linear = gaussian_linear(128, 64, dtype=torch.float16, device=device)
    module = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=group_size)
    back = TorchWeightOnlyQuantizer.dequantize_module(module)
    assert type(back) is nn.Linear
    assert back.weight.dtype == torch.float16 and back.weight.device == linear.weight.device
    assert torch.equal(back.bias, linear.bias)
    x = torch.randn(8, 128, dtype=torch.float16, device=device)
    # The dequantized layer computes what the quantized one's reference path computes; its
    # kernels round differently (int8: the scale applied after the sum), within fp16 rounding.
    torch.testing.assert_close(back(x), module.reference_forward(x))
    torch.testing.assert_close(back(x), module(x), atol=1e-3, rtol=1e-2)
    bound = BOUNDS[bits, 128]
    assert relative_error(back.weight, linear.weight) < bound


def test_compute_dtype_sets_the_matmul_dtype_not_the_output_dtype(gaussian_linear):
    linear = gaussian_linear(64, 32, dtype=torch.bfloat16)
    module = WeightOnlyLinear.from_linear(linear, bits=8, compute_dtype=torch.float32)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    out = module(x)
    assert out.dtype == torch.bfloat16
    expected = nn.functional.linear(x.float(), module.dequantized_weight(torch.float32), linear.bias.float())
    assert torch.equal(out, expected.bfloat16())


def test_repr_says_the_format(gaussian_linear):
    module = WeightOnlyLinear.from_linear(gaussian_linear(64, 32, bias=False), bits=4, group_size=32)
    assert repr(module) == ("WeightOnlyLinear(in_features=64, out_features=32, bits=4, group_size=32, bias=False)")
