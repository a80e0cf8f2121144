"""4-bit GPTQ layers without act-order run on quantcore-torch's fused int4 kernels, and agree with the reference."""

from __future__ import annotations

import pytest
import torch
from quantcore_gptq.gptq import Hessian, gptq_quantize
from quantcore_gptq.modules import GPTQLinear, reference_matmul

kernels = pytest.importorskip("quantcore_torch.kernels", reason="a quantcore-torch with its kernels module")


def gptq_layer(desc_act: bool, dtype=torch.float32) -> GPTQLinear:
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 256, generator=gen) * 0.02)
    hessian = Hessian.zeros(256, "cpu")
    hessian.add(torch.randn(512, 256, generator=gen) * torch.linspace(0.1, 3, 256))
    options = dict(bits=4, group_size=64, sym=False, damp_percent=0.01, desc_act=desc_act)
    result = gptq_quantize(linear.weight, hessian, **options)
    return GPTQLinear.from_result(linear.to(dtype), result, bits=4, group_size=64, checkpoint_format="gptq")


@pytest.mark.parametrize("rows", [3, kernels.CPU_INT4_ROWS], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_rows_take_the_fused_kernel_and_match_the_reference(dtype, rows):
    # On the CPU, as many rows as quantcore-torch's int4 kernel takes there (CPU_INT4_ROWS).
    layer = gptq_layer(desc_act=False, dtype=dtype)
    x = torch.randn(rows, 256, dtype=dtype)
    y = layer(x)
    runtime = layer.__dict__["_int4"][1]
    assert runtime is not None and runtime.layout is not None and runtime.layout.kind == "cpu"
    torch.testing.assert_close(y, reference_matmul(layer, x), rtol=2e-2, atol=2e-2)


def test_act_order_and_many_rows_keep_the_reference_path():
    layer = gptq_layer(desc_act=True)
    x = torch.randn(2, 256)
    assert torch.equal(layer(x), reference_matmul(layer, x))
    assert layer.__dict__["_int4"][1] is None  # g_idx out of order: no conversion
    natural = gptq_layer(desc_act=False)
    many = torch.randn(kernels.int4_kernel_rows(torch.device("cpu")) + 1, 256)
    assert torch.equal(natural(many), reference_matmul(natural, many))
    assert "_int4" not in natural.__dict__  # nothing converted for a prefill-sized batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("choice", "dtype"), [("tinygemm", torch.bfloat16), ("interleaved", torch.bfloat16), ("interleaved", torch.float16)]
)
def test_cuda_layers_take_the_chosen_int4_kernel(choice, dtype, monkeypatch):
    # QUANTCORE_INT4_CUDA_KERNEL picks the layout a GPTQ layer converts to on CUDA, as for torch_wo.
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", choice)
    layer = gptq_layer(desc_act=False, dtype=dtype).cuda()
    x = torch.randn(1, 256, dtype=dtype, device="cuda")
    with torch.no_grad():
        y = layer(x)
        ref = reference_matmul(layer, x)
    runtime = layer.__dict__["_int4"][1]
    assert runtime is not None and runtime.layout is not None and runtime.layout.kind == choice
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
