"""The fused kernels of ``quantcore_torch.kernels``: every path against the reference dequantize path,
the kernel layout's life cycle, and torch.compile / CUDA graphs / the static KV cache."""

from __future__ import annotations

import pytest
import torch
from quantcore_torch import WeightOnlyLinear, kernels
from torch import nn

import quantcore

# Shapes every path must take: kernel-friendly ones, K not a multiple of the group (SmolLM2's 576
# in groups of 128), odd K, N not a multiple of 16 (no CPU int4 kernel).
SHAPES = [(64, 256), (192, 576), (48, 130), (40, 99)]
# Relative L2 error allowed between a kernel and the reference path: float rounding of the dtype
# (the kernels accumulate in fp32 and round once; the reference rounds the weight first).
ROUNDING = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FORMATS = [(8, 128), (4, 128), (4, 64), (4, 32)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _module(n, k, bits, group_size, dtype, device, bias=True):
    torch.manual_seed(n + k)
    linear = nn.Linear(k, n, bias=bias).to(device=device, dtype=dtype)
    nn.init.normal_(linear.weight, std=0.02)
    return WeightOnlyLinear.from_linear(linear, bits=bits, group_size=group_size)


@pytest.mark.parametrize("rows", [1, kernels.SMALL_BATCH + 8], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("dtype", list(ROUNDING), ids=str)
@pytest.mark.parametrize(("bits", "group_size"), FORMATS)
@pytest.mark.parametrize(("n", "k"), SHAPES, ids=lambda s: str(s))
def test_every_path_matches_the_reference(n, k, bits, group_size, dtype, rows, device):
    module = _module(n, k, bits, group_size, dtype, device)
    x = torch.randn(2, rows, k, dtype=dtype, device=device)  # 3-D: the kernels flatten leading dims
    out = module(x)
    ref = module.reference_forward(x)
    assert out.shape == ref.shape and out.dtype == dtype
    assert relative_error(out, ref) < ROUNDING[dtype]


@pytest.mark.parametrize(("k", "group"), [(256, 32), (512, 128), (768, 256)], ids=str)
def test_interleave_int4_puts_each_code_where_the_kernel_reads_it(k, group):
    # Word j of group g, byte i: columns g * group + i * group // 4 + 2j (low nibble) and + 1 (high).
    from quantcore_torch.packing import pack_int4, unpack_int4

    n = 3
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    words = kernels.interleave_int4(pack_int4(codes), k, group)
    assert words.dtype == torch.int32 and words.shape == (n, k // 8) and words.is_contiguous()
    per_group = group // 8
    for g in range(k // group):
        for j in range(per_group):
            word = words[:, g * per_group + j]
            for i in range(4):
                column = g * group + i * group // 4 + 2 * j
                assert torch.equal((word >> 8 * i) & 0xF, codes[:, column].int())
                assert torch.equal((word >> 8 * i + 4) & 0xF, codes[:, column + 1].int())
    assert torch.equal(unpack_int4(pack_int4(codes), k), codes)
    with pytest.raises(ValueError, match="whole groups"):
        kernels.interleave_int4(pack_int4(codes[:, :200]), 200, 64)


def test_the_cuda_int4_kernel_setting_is_checked():
    assert kernels.int4_cuda_kernel_setting({}) == "interleaved"
    for choice in kernels.INT4_CUDA_KERNELS:
        assert kernels.int4_cuda_kernel_setting({"QUANTCORE_INT4_CUDA_KERNEL": f" {choice} "}) == choice
    with pytest.raises(ValueError, match="must be one of tinygemm, interleaved, triton, got 'interleave'"):
        kernels.int4_cuda_kernel_setting({"QUANTCORE_INT4_CUDA_KERNEL": "interleave"})


def test_the_cpu_kernels_are_the_ones_that_run():
    # The dispatch must actually reach the fused ops for the shapes they take (not only fall back).
    module = _module(192, 576, 4, 128, torch.bfloat16, "cpu")
    assert module.kernel_layout is not None and module.kernel_layout.group_size == 64
    assert _module(40, 99, 4, 128, torch.bfloat16, "cpu").kernel_layout is None  # N % 16, odd K
    x = torch.randn(1, 576, dtype=torch.bfloat16)
    layout = module.kernel_layout
    direct = torch.ops.aten._weight_int4pack_mm_for_cpu(x, layout.weight, layout.group_size, layout.scales_and_zeros)
    torch.testing.assert_close(module(x), direct + module.bias, rtol=0, atol=0)
    # The int4 kernel runs up to CPU_INT4_ROWS rows (it beats dequantize + F.linear there); one
    # row more takes the dequantize path, bit for bit the reference's.
    with torch.no_grad():
        many = torch.randn(kernels.CPU_INT4_ROWS, 576, dtype=torch.bfloat16)
        direct = torch.ops.aten._weight_int4pack_mm_for_cpu(
            many, layout.weight, layout.group_size, layout.scales_and_zeros
        )
        torch.testing.assert_close(module(many), direct + module.bias, rtol=0, atol=0)
        more = torch.randn(kernels.CPU_INT4_ROWS + 1, 576, dtype=torch.bfloat16)
        assert torch.equal(module(more), module.reference_forward(more))


def test_compute_dtype_other_than_the_activations():
    module = _module(64, 256, 4, 64, torch.float32, "cpu")
    module.compute_dtype = torch.bfloat16
    module.refresh_kernel_layout()
    x = torch.randn(3, 256)
    out = module(x)
    assert out.dtype == torch.float32
    assert relative_error(out, module.reference_forward(x)) < ROUNDING[torch.bfloat16]


def test_the_kernel_layout_is_never_saved_and_follows_loads_and_moves():
    module = _module(64, 256, 4, 128, torch.bfloat16, "cpu")
    assert set(module.state_dict()) == {"qweight", "scale", "zero", "bias"}
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    expected = module(x)

    skeleton = WeightOnlyLinear(256, 64, bits=4, group_size=128, dtype=torch.bfloat16, device="meta")
    assert skeleton.kernel_layout is None
    skeleton.load_state_dict(module.state_dict(), assign=True)
    assert skeleton.kernel_layout is not None
    torch.testing.assert_close(skeleton(x), expected, rtol=0, atol=0)

    # A dtype move changes the scales: the layout is rebuilt for the new dtype.
    module.half()
    assert module.kernel_layout.scales_and_zeros.dtype == torch.float16
    assert relative_error(module(x.half()), module.reference_forward(x.half())) < ROUNDING[torch.float16]

    # Changing the stored weight by hand and refreshing keeps the kernel in step with it.
    module.qweight.zero_()
    module.refresh_kernel_layout()
    torch.testing.assert_close(module(x.half()), module.reference_forward(x.half()), rtol=2e-3, atol=2e-3)


def _tiny_llama(device: str):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    LlamaConfig, LlamaForCausalLM = transformers.LlamaConfig, transformers.LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("preset", ["int8-torch", "int4-torch"])
def test_fullgraph_compile_traces_the_layers(preset):
    # aot_eager: dynamo + AOT autograd tracing of every op (custom ops included), no C++ compile.
    from quantcore.cli import resolve_method

    model = _tiny_llama("cpu")
    quantcore.quantize(model, resolve_method(preset), progress=False)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(ids).logits, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["int8-torch", "int4-torch"])
def test_inductor_compile_on_cpu(preset):
    from quantcore.cli import resolve_method

    model = _tiny_llama("cpu")
    quantcore.quantize(model, resolve_method(preset), progress=False)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        expected = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(ids).logits, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernels_are_the_ones_that_run_on_cuda(monkeypatch):
    # fp16, one row: the interleaved kernel by default; the kernel on the stored tensors with
    # "triton", and with "tinygemm" (which takes bf16 only).
    assert kernels.triton_available()
    x = torch.randn(1, 256, dtype=torch.float16, device="cuda")
    for choice in ("interleaved", "triton", "tinygemm"):
        monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", choice)
        module = _module(64, 256, 4, 128, torch.float16, "cuda")
        with torch.no_grad():  # with gradients on, the trainable bias is added after the kernel
            if choice == "interleaved":
                layout = module.kernel_layout
                direct = torch.ops.quantcore_torch.int4_interleaved_mm(
                    x, layout.weight, layout.scales_and_zeros, 128, module.bias
                )
            else:
                assert module.kernel_layout is None
                stored = (module.qweight, module.scale, module.zero)
                direct = torch.ops.quantcore_torch.int4_mm(x, *stored, 128, module.bias)
            torch.testing.assert_close(module(x), direct, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [1, 5, 16], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("kernel", ["int8", "int4", "int4-interleaved"])
def test_eager_launches_match_the_custom_op(kernel, rows, monkeypatch):
    # From eager code the Triton kernels launch straight from the compiled kernel the autotuner
    # chose (no custom op, no autotuner after a shape's first call). Same kernel, same config: the
    # same bits as the custom op, call after call, and a misaligned input gets its own kernel.
    if kernel == "int4-interleaved":
        if rows > 1:
            pytest.skip("the interleaved layout serves one row (more rows read the stored tensors)")
        monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    else:  # int4: the kernel on the stored tensors, for one row too
        monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "triton")
    triton_mod = kernels._TRITON
    n, k = 320, 512
    module = _module(n, k, 8 if kernel == "int8" else 4, 128, torch.float16, "cuda")
    if kernel == "int8":
        op = lambda x: torch.ops.quantcore_torch.int8_mm(x, module.qweight, module.scale, module.bias)  # noqa: E731
    elif kernel == "int4":
        op = lambda x: torch.ops.quantcore_torch.int4_mm(  # noqa: E731
            x, module.qweight, module.scale, module.zero, 128, module.bias
        )
    else:
        layout = module.kernel_layout
        op = lambda x: torch.ops.quantcore_torch.int4_interleaved_mm(  # noqa: E731
            x, layout.weight, layout.scales_and_zeros, 128, module.bias
        )
    launchers = {
        "int8": triton_mod._INT8.row if rows == 1 else triton_mod._INT8.dot,
        "int4": triton_mod._INT4.row if rows == 1 else triton_mod._INT4.dot,
        "int4-interleaved": triton_mod._INT4_INTERLEAVED,
    }
    launcher = launchers[kernel]
    autotuned = []
    autotune = launcher.kernel.run

    def counting_run(*args, **kwargs):
        autotuned.append(1)
        return autotune(*args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher.kernel, "run", counting_run)  # the autotuner's launch path
        for seed in range(3):
            gen = torch.Generator("cuda").manual_seed(seed)
            x = torch.randn(rows, k, dtype=torch.float16, device="cuda", generator=gen)
            out = module(x)
            torch.testing.assert_close(out, op(x), rtol=0, atol=0)
            assert relative_error(out, module.reference_forward(x)) < ROUNDING[torch.float16]
        assert launcher.direct and launcher.compiled, "the direct launch is not in use with this Triton"
        # The first eager call of a shape may autotune; the next ones launch the kept kernel
        # (a launch hook that is never seen as unset would send every call through the autotuner).
        autotuned.clear()
        module(x)
        assert autotuned == [], "eager calls still go through the autotuner"
        shifted = torch.empty(rows * k + 1, dtype=torch.float16, device="cuda")[1:].view(rows, k).copy_(x)
        assert shifted.data_ptr() % 16 != 0
        torch.testing.assert_close(module(shifted), out, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("trigger", ["late", "early"])
@pytest.mark.parametrize("kernel", ["int8", "int4", "int4-interleaved"])
def test_programmatic_launches_in_a_graph_give_the_same_bits(kernel, trigger):
    # With QUANTCORE_TRITON_PDL, a one-row kernel captured in a CUDA graph launches programmatically:
    # it loads its first weight tile before waiting for the kernel before it, which writes its
    # input. A chain of layers, each input made by the kernel just before: the replayed graph
    # must give eager's bits (a read of the input before the wait would race).
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    triton_mod = kernels._TRITON
    k = 1024
    run = _layer_chain(kernel, k)
    launcher = {"int8": triton_mod._INT8.row, "int4": triton_mod._INT4.row}.get(kernel, triton_mod._INT4_INTERLEAVED)
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_mod, "PDL", True)
        patch.setattr(triton_mod, "PDL_TRIGGER", trigger)
        triton_mod.forget_pdl_variants()  # another case's trigger
        eager = run(x)  # keeps the kernel and compiles its programmatic variant
        torch.testing.assert_close(run(x), eager, rtol=0, atol=0)  # outside capture: launched as before
        launches = _captured_launches(patch, [launcher])
        _assert_replays_match_eager(run, x, launches, CHAIN)
    triton_mod.forget_pdl_variants()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("trigger", ["late", "early", "auto"])
@pytest.mark.parametrize(
    ("pin", "pre"),
    [
        ((8, 1024, 4, False), True),
        ((4, 2048, 2, False), False),
        ((8, 1024, 4, False, True), True),  # SPREAD: the rows in each thread's registers
        ((16, 2048, 8, False, True), False),
    ],
    ids=str,
)
def test_programmatic_launches_dequantizing_before_the_wait(trigger, pin, pre):
    # QUANTCORE_TRITON_PDL_PRE: the programmatic interleaved kernel dequantizes its first weight
    # tile before the wait, so only the products follow it. Its sums round otherwise than eager's
    # (the plain launch), so the replays are compared within bf16's rounding over 12 layers; a read
    # of the input before the wait would give other numbers altogether. Two tiles a row (K = 2048
    # on a 1024-wide tile) take the loop after the first tile too. A tile of 128 weights a thread
    # (4 x 2048 on 2 warps) is past PRE_WEIGHTS: its variant launches without PRE. The auto trigger
    # (PDL_PRE unset) pairs the early trigger with PRE for the small tile, the late one without it
    # for the large.
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    triton_mod = kernels._TRITON
    k = 2048
    run = _layer_chain("int4-interleaved", k)
    launcher = triton_mod._INT4_INTERLEAVED
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    pins = {card: {(k, k): pin} for card in ("H100", "H200", torch.cuda.get_device_name())}
    try:
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(triton_mod, "INT4_INTERLEAVED_PINNED", pins)
            patch.setattr(triton_mod, "PDL", True)
            patch.setattr(triton_mod, "PDL_TRIGGER", trigger)
            patch.setattr(triton_mod, "PDL_PRE", None if trigger == "auto" else True)
            launcher.compiled.clear()  # the pinned two-tile config, not one kept or tuned before
            launcher.kernel.cache.clear()
            triton_mod.forget_pdl_variants()
            run(x)  # keeps the kernel and compiles its programmatic variant
            launches = _captured_launches(patch, [launcher])
            names = launcher.jit.arg_names
            for entry in launcher.compiled.values():  # the variant compiled with PRE, the plain kernel without
                tail, plain = entry.pdl[1], entry.tail
                assert tail[names.index("PRE") - len(names)] is pre
                assert plain[names.index("PRE") - len(names)] is False
                use_gdc = {"late": 1, "early": 2, "auto": 2 if pre else 1}[trigger]
                assert tail[names.index("USE_GDC") - len(names)] == use_gdc
                assert tail[names.index("SPREAD") - len(names)] is (len(pin) > 4)
            assert {entry.tail[names.index("BLOCK_K") - len(names)] for entry in launcher.compiled.values()} == {pin[1]}
            _assert_replays_match_eager(run, x, launches, CHAIN, exact=False)
    finally:  # the next test tunes and keeps its own config, with the setting as it was
        launcher.compiled.clear()
        launcher.kernel.cache.clear()
        triton_mod.forget_pdl_variants()


# A chain of one-row layers, each input made by the kernel just before it.
CHAIN = 12


def _layer_chain(kernel: str, k: int):
    """A chain of ``CHAIN`` ``k x k`` layers (distinct weights, rolled from one seed's) through
    ``kernel`` (``int8``, ``int4``, ``int4-interleaved``), each input written by the kernel just
    before it: a function of the first input."""
    triton_mod = kernels._TRITON
    bits = 8 if kernel == "int8" else 4
    layers = [_module(k, k, bits, 128, torch.bfloat16, "cuda", bias=False) for _ in range(CHAIN)]
    for i, layer in enumerate(layers):
        layer.qweight.copy_(torch.roll(layers[0].qweight, i, dims=0))  # distinct weights, one seed
    interleaved = [
        kernels.int4_interleaved_layout(m.qweight, m.scale, m.zero, k, 128) if bits == 4 else None for m in layers
    ]

    def run(x):
        for layer, layout in zip(layers, interleaved, strict=True):
            if kernel == "int4-interleaved":
                y = triton_mod.int4_interleaved_mm(x, layout.weight, layout.scales_and_zeros, 128, None)
            elif bits == 8:
                y = triton_mod.int8_mm(x, layer.qweight, layer.scale, None)
            else:
                y = triton_mod._int4_launch(x, layer.qweight, layer.scale, layer.zero, 128, None)
            x = y * 0.5 + x  # a kernel that writes the next layer's input just before it
        return x

    return run


def _assert_replays_match_eager(run, x: torch.Tensor, launches: list, programmatic: int, exact: bool = True) -> None:
    """``run`` captured in a CUDA graph (after a warm-up on a side stream) launches ``programmatic``
    kept programmatic variants (counted in ``launches``), and each replay on a new input gives
    eager's bits for it (``exact=False``: eager's numbers within bf16's rounding, and the same bits
    at every replay)."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    launches.clear()
    with torch.cuda.graph(graph):
        static_out = run(static_x)
    assert len(launches) == programmatic, "the captured graph did not launch the programmatic variants"
    for seed in range(5):
        generator = torch.Generator(x.device).manual_seed(seed)
        static_x.copy_(torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator))
        graph.replay()
        if exact:
            torch.testing.assert_close(static_out, run(static_x), rtol=0, atol=0)
        else:
            first = static_out.clone()
            assert relative_error(first, run(static_x)) < 2 * ROUNDING[torch.bfloat16]
            graph.replay()
            assert torch.equal(static_out, first)


def _captured_launches(patch, launchers) -> list:
    """A list that grows by one for each launch of a kept programmatic variant of ``launchers``."""
    launches: list = []
    for launcher in launchers:
        built = [entry for entry in launcher.compiled.values() if entry.pdl is not None]
        assert built and all(entry.pdl for entry in built), f"{launcher.jit.__name__}: no programmatic variant"
        for entry in built:
            assert entry.pdl[0].metadata.launch_pdl and not entry.compiled.metadata.launch_pdl
            run_pdl = entry.pdl[0].run  # ``run`` is Triton's property over ``_run``, the launcher
            patch.setattr(entry.pdl[0], "_run", lambda *a, run_pdl=run_pdl: launches.append(1) or run_pdl(*a))
    return launches


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("trigger", ["late", "early"])
def test_programmatic_attention_layers_in_a_graph_give_the_same_bits(trigger):
    # A decode step's attention half, four layers deep, every kernel programmatic: the q/k/v
    # rotary kernel writes q and the cache's newest position, the attention's split kernel reads
    # them (after its wait), the combine kernel its splits, the o projection the combine's output,
    # and the next layer's input comes from that. Replayed from a CUDA graph, eager's bits.
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    from quantcore_torch import _attention

    triton_mod = kernels._TRITON
    dev, dtype, k, heads, kv_heads, head, length, pos = "cuda", torch.bfloat16, 512, 8, 2, 64, 640, 301
    nq, nkv = heads * head, kv_heads * head
    layers = []
    for i in range(4):
        qkv = _module(nq + 2 * nkv, k, 4, 128, dtype, dev, bias=False)
        o = _module(k, nq, 4, 128, dtype, dev, bias=False)
        qkv.qweight.copy_(torch.roll(qkv.qweight, i, dims=0))
        cache = torch.randn(2, 1, kv_heads, length, head, device=dev, dtype=dtype)
        layouts = [kernels.int4_interleaved_layout(m.qweight, m.scale, m.zero, m.in_features, 128) for m in (qkv, o)]
        layers.append((*layouts, cache))
    angle = pos * torch.arange(head // 2, device=dev) / head
    cos = torch.cat((angle.cos(), angle.cos())).to(dtype)
    sin = torch.cat((angle.sin(), angle.sin())).to(dtype)
    position = torch.tensor([pos], device=dev)
    mask = (torch.arange(length, device=dev) <= pos).view(1, 1, 1, length)

    def run(x):
        for qkv, o, cache in layers:
            q = triton_mod.int4_interleaved_qkv_rope(
                x, qkv.weight, qkv.scales_and_zeros, 128, None, cos, sin, cache[0], cache[1], position, nq
            )
            attention = _attention.decode_attention(q, cache[0], cache[1], mask, head**-0.5)
            x = triton_mod.int4_interleaved_mm(attention.view(1, nq), o.weight, o.scales_and_zeros, 128, None)
        return x

    launchers = (triton_mod._INT4_INTERLEAVED_ROPE, _attention._SPLIT, _attention._COMBINE)
    launchers += (triton_mod._INT4_INTERLEAVED,)
    x = torch.randn(1, k, dtype=dtype, device=dev)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_mod, "PDL", True)
        patch.setattr(triton_mod, "PDL_TRIGGER", trigger)
        triton_mod.forget_pdl_variants()  # variants are built again for this test's shapes alone
        eager = run(x)  # keeps the kernels and compiles their programmatic variants
        torch.testing.assert_close(run(x), eager, rtol=0, atol=0)
        launches = _captured_launches(patch, launchers)
        _assert_replays_match_eager(run, x, launches, 4 * len(layers))
    triton_mod.forget_pdl_variants()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("n", "k"), [(64, 256), (2048, 2048), (256, 576)], ids=str)
def test_tinygemm_layout_matches_the_reference(n, k):
    module = _module(n, k, 4, 128, torch.bfloat16, "cuda")
    layout = kernels.int4_tinygemm_layout(module.qweight, module.scale, module.zero, k, 128)
    assert layout is not None
    for rows in (1, 16):
        x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
        out = kernels.int4_weight_only_linear(x, module.qweight, module.scale, module.zero, 128, module.bias, layout)
        assert relative_error(out, module.reference_forward(x)) < ROUNDING[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("n", "k", "group"), [(64, 256, 32), (2048, 2048, 128), (250, 512, 64), (24, 768, 256)], ids=str
)
def test_interleaved_layout_matches_the_reference(n, k, group, dtype, monkeypatch):
    # A module built with QUANTCORE_INT4_CUDA_KERNEL=interleaved keeps that layout; one row runs its
    # kernel (every config the autotuner times sees the ragged N), more rows the stored tensors'.
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    module = _module(n, k, 4, group, dtype, "cuda")
    layout = module.kernel_layout
    assert layout is not None and layout.kind == "interleaved" and layout.weight.shape == (n, k // 8)
    for rows in (1, 5):
        x = torch.randn(rows, k, dtype=dtype, device="cuda")
        with torch.no_grad():
            out, ref = module(x), module.reference_forward(x)
        assert relative_error(out, ref) < ROUNDING[dtype]
    x = torch.randn(1, k, dtype=dtype, device="cuda")
    with torch.no_grad():
        direct = kernels._TRITON.int4_interleaved_mm(x, layout.weight, layout.scales_and_zeros, group, module.bias)
        torch.testing.assert_close(module(x), direct, rtol=0, atol=0)
        compiled = torch.compile(module, fullgraph=True)
        torch.testing.assert_close(compiled(x), direct, rtol=0, atol=0)
    assert _module(48, 136, 4, 16, dtype, "cuda").kernel_layout is None  # a group the layout cannot take


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_default_cuda_int4_layout_is_interleaved_else_tinygemm(monkeypatch):
    # Unset, QUANTCORE_INT4_CUDA_KERNEL means the interleaved layout; a layer it cannot take (K not
    # a multiple of the group, as SmolLM2's 576 inputs in groups of 128) runs tinygemm in bf16 and
    # the Triton kernel on the stored tensors in fp16.
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", kernels.int4_cuda_kernel_setting({}))
    for dtype in (torch.float16, torch.bfloat16):
        assert _module(256, 1024, 4, 128, dtype, "cuda").kernel_layout.kind == "interleaved"
    ragged = _module(192, 576, 4, 128, torch.bfloat16, "cuda")
    assert ragged.kernel_layout.kind == "tinygemm" and ragged.kernel_layout.group_size == 64
    assert _module(192, 576, 4, 128, torch.float16, "cuda").kernel_layout is None
    for dtype in (torch.float16, torch.bfloat16):
        module = _module(192, 576, 4, 128, dtype, "cuda")
        x = torch.randn(1, 576, dtype=dtype, device="cuda")
        with torch.no_grad():
            assert relative_error(module(x), module.reference_forward(x)) < ROUNDING[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["int8-torch", "int4-torch"])
def test_cuda_graphs_and_the_static_cache(preset, device="cuda"):
    # generate(cache_implementation="static") compiles the decode steps itself, here fullgraph
    # under reduce-overhead (CUDA graphs); the prefill runs eagerly, so the cache's tensors are
    # made outside the graphs. (Compiling model.forward instead puts the prefill, and the cache's
    # lazy allocation, inside a CUDA graph, whose next run overwrites it: transformers 5.17 fails.)
    from transformers import CompileConfig

    from quantcore.cli import resolve_method

    model = _tiny_llama(device)
    quantcore.quantize(model, resolve_method(preset), progress=False)
    ids = torch.randint(0, 512, (1, 12), device=device)
    kwargs = dict(
        max_new_tokens=8,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        eager = model.generate(ids, **kwargs, disable_compile=True)
        assert not hasattr(model, "_compiled_call")
        torch._dynamo.reset()
        config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        config._compile_all_devices = device != "cuda"  # transformers' flag to compile on the CPU (checked there)
        model.generation_config.compile_config = config
        recorded = model.generate(ids, **kwargs)
        assert hasattr(model, "_compiled_call"), "generate did not compile the decode steps"
        replayed = model.generate(ids, **kwargs)
    # A random model's greedy tokens sit on near-ties, so compiled and eager may part ways after a
    # few tokens (bf16 rounding); the first step's logits must agree, and replays must repeat exactly.
    torch.testing.assert_close(recorded.logits[0], eager.logits[0], rtol=2e-2, atol=2e-2)
    assert torch.equal(replayed.sequences, recorded.sequences)
    for a, b in zip(replayed.logits, recorded.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n", "k"), [(2048, 5632), (320, 520), (96, 99)], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gated_int8_kernel_matches_the_unfused_activation_and_kernel(n, k, dtype, bias):
    # A gated MLP's down projection with silu(gate) * up made in the kernel: the same function
    # as the activation computed by PyTorch then the plain kernel, within float rounding; the
    # reference path bounds both.
    module = _module(n, k, 8, 128, dtype, "cuda", bias=bias)
    gen = torch.Generator("cuda").manual_seed(n + k)
    h = torch.randn(1, 2 * k, dtype=dtype, device="cuda", generator=gen) * 3
    gate, up = h.chunk(2, dim=-1)
    x = torch.nn.functional.silu(gate) * up
    with torch.no_grad():
        folded = kernels.int8_gated_linear(h, module.qweight, module.scale, module.bias)
        plain = kernels.int8_weight_only_linear(x, module.qweight, module.scale, module.bias)
        assert relative_error(folded, plain) < ROUNDING[dtype] / 10
        assert relative_error(folded, module.reference_forward(x)) < ROUNDING[dtype]
        # Several rows take the activation in PyTorch, then the several-row kernel.
        rows = torch.randn(5, 2 * k, dtype=dtype, device="cuda", generator=gen)
        torch.testing.assert_close(
            kernels.int8_gated_linear(rows, module.qweight, module.scale, module.bias),
            kernels.int8_weight_only_linear(kernels.gated_input(rows), module.qweight, module.scale, module.bias),
            rtol=0,
            atol=0,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("n", "k", "pin"),
    [
        (2560, 2048, (8, 2048, 8)),
        (2048, 5632, (8, 2048, 8)),  # three tiles, the last a quarter past K
        (11264, 2048, (4, 2048, 4)),
        (250, 512, (16, 256, 4)),  # a ragged last program
    ],
    ids=str,
)
def test_spread_configs_match_the_reference(n, k, pin, dtype, monkeypatch):
    # SPREAD: a program's rows in each thread's registers, its words along the threads. Its sums
    # add in another order than the pinned kernels', so it is held to the reference's rounding, on
    # the plain and the gated (gate/up) epilogues.
    triton_mod = kernels._TRITON
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    pins = {card: {(n, k): (*pin, False, True)} for card in ("H100", "H200", torch.cuda.get_device_name())}
    launcher = triton_mod._INT4_INTERLEAVED
    try:
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(triton_mod, "INT4_INTERLEAVED_PINNED", pins)
            launcher.compiled.clear()
            launcher.kernel.cache.clear()
            module = _module(n, k, 4, 128, dtype, "cuda")
            x = torch.randn(1, k, dtype=dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(n))
            out = module(x)
            assert relative_error(out, module.reference_forward(x)) < ROUNDING[dtype]
            names = launcher.jit.arg_names
            assert [entry.tail[names.index("SPREAD") - len(names)] for entry in launcher.compiled.values()] == [True]
            if n % 2 == 0 and n >= 2 * pin[0]:
                folded = module.gate_up_forward(x)
                reference = kernels.gated_input(module.reference_forward(x))
                assert relative_error(folded, reference) < 3 * ROUNDING[dtype]
    finally:
        launcher.compiled.clear()
        launcher.kernel.cache.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n", "k"), [(11264, 2048), (1042, 512), (38, 256)], ids=str)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gate_up_kernels_match_the_plain_kernel_then_the_activation(n, k, bits, dtype, bias, monkeypatch):
    # A gated MLP's stacked gate/up projections with silu(gate) * up written by the kernel's
    # epilogue (int8; int4 on the interleaved layout): the plain kernel's outputs through the
    # MLP's activation and product, to a last-bit difference of silu's exp; several rows take
    # the projections, then the activation in PyTorch, bit for bit.
    monkeypatch.setattr(kernels, "INT4_CUDA_KERNEL", "interleaved")
    module = _module(n, k, bits, 128, dtype, "cuda", bias=bias)
    gen = torch.Generator("cuda").manual_seed(n + k)
    x = torch.randn(1, k, dtype=dtype, device="cuda", generator=gen)
    with torch.no_grad():
        folded = module.gate_up_forward(x)
        plain = module(x)
        assert folded.shape == (1, n // 2)
        assert relative_error(folded, kernels.gated_input(plain)) < ROUNDING[dtype] / 10
        # Against the reference path: its own rounding (its weight in fp16 / bf16) in both halves,
        # carried through the product (measured 2e-2 in bf16 for 19 outputs dominated by one).
        reference = kernels.gated_input(module.reference_forward(x))
        assert relative_error(folded, reference) < 3 * ROUNDING[dtype]
        rows = torch.randn(5, k, dtype=dtype, device="cuda", generator=gen)
        torch.testing.assert_close(module.gate_up_forward(rows), kernels.gated_input(module(rows)), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("n", "k", "group"), [(2048, 5632, 128), (320, 520, 64), (96, 99, 32)], ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_dequantizes_in_one_kernel_to_the_same_bits(bits, n, k, group, dtype):
    # More rows than the kernels take (a prefill): the weight is dequantized by one Triton kernel,
    # to packing's bits exactly, and the layer's output is the reference path's, bit for bit.
    from quantcore_torch.packing import dequantize_int4, dequantize_int8

    module = _module(n, k, bits, group, dtype, "cuda")
    if bits == 8:
        launcher = kernels._TRITON._DEQUANTIZE.int8
        call = lambda: kernels.dequantized_int8(module.qweight, module.scale, dtype)  # noqa: E731
        expected = dequantize_int8(module.qweight, module.scale, dtype)
    else:
        launcher = kernels._TRITON._DEQUANTIZE.int4
        call = lambda: kernels.dequantized_int4(module.qweight, module.scale, module.zero, k, group, dtype)  # noqa: E731
        expected = dequantize_int4(module.qweight, module.scale, module.zero, k, group, dtype)
    jit_launches = []
    jit_run = launcher.kernel.run
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher.kernel, "run", lambda *a, **kw: jit_launches.append(1) or jit_run(*a, **kw))
        first, again = call(), call()
    # After a shape's first call the kept kernel launches straight, Triton's Python path skipped.
    assert launcher.direct and len(jit_launches) <= 1, "the direct launch is not in use with this Triton"
    for fast in (first, again):
        assert torch.equal(fast, expected)
        assert fast.is_contiguous() and fast.shape == (n, k)
    x = torch.randn(2, 40, k, dtype=dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(k))
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.reference_forward(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "length"), [(32, 4, 64, 640), (32, 32, 128, 640), (8, 2, 64, 3000)]
)
@pytest.mark.parametrize("mask", ["bool", "float", None])
def test_decode_attention_on_cuda_is_sdpa(heads, kv_heads, head_dim, length, mask, monkeypatch):
    # The decode attention kernels in bf16 against PyTorch's SDPA on the repeated key/value heads,
    # eager, compiled (the custom op) and replayed from a CUDA graph; advancing a counter in each
    # (one a call); another split config after the kept one's calls.
    from quantcore_torch import _attention

    torch.manual_seed(heads + length)
    dev = "cuda"
    q = torch.randn(1, 1, heads * head_dim, device=dev, dtype=torch.bfloat16)
    keys = torch.randn(1, kv_heads, length, head_dim, device=dev, dtype=torch.bfloat16)
    values = torch.randn(1, kv_heads, length, head_dim, device=dev, dtype=torch.bfloat16)
    keep = torch.arange(length, device=dev) < length - 37
    rows = {"bool": keep, "float": torch.where(keep, 0.0, torch.finfo(torch.bfloat16).min).bfloat16(), None: None}
    row = None if mask is None else rows[mask].view(1, 1, 1, length)
    scale = head_dim**-0.5
    k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (keys, values))
    query = q.view(1, heads, 1, head_dim)
    ref = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=row, scale=scale).transpose(1, 2)
    out = kernels.decode_attention(q, keys, values, row, scale)
    assert out is not None and out.shape == (1, 1, heads, head_dim)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    compiled = torch.compile(lambda *a: kernels.decode_attention(*a), fullgraph=True)
    torch.testing.assert_close(compiled(q, keys, values, row, scale), out, rtol=0, atol=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.decode_attention(q, keys, values, row, scale)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(captured, kernels.decode_attention(q, keys, values, row, scale), rtol=0, atol=0)
    out = kernels.decode_attention(q, keys, values, row, scale)
    count = torch.tensor(5, device=dev)
    torch.testing.assert_close(kernels.decode_attention(q, keys, values, row, scale, count), out, rtol=0, atol=0)
    torch.testing.assert_close(compiled(q, keys, values, row, scale, count), out, rtol=0, atol=0)
    assert count.item() == 7
    with torch.cuda.graph(graph := torch.cuda.CUDAGraph()):
        captured = kernels.decode_attention(q, keys, values, row, scale, count)
    count.fill_(10)
    for _ in range(3):
        graph.replay()
    torch.testing.assert_close(captured, out, rtol=0, atol=0)
    assert count.item() == 13
    monkeypatch.setitem(_attention.SPLIT_CONFIG, head_dim, (64, 8))
    torch.testing.assert_close(kernels.decode_attention(q, keys, values, row, scale), out, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_layers_share_one_mask_and_advance_their_counters_in_the_attention():
    # Four layers' attention under one compiled step, their mask made in it from the position: the
    # mask is computed once (the op's flexible layout), not copied for each layer, and each
    # layer's counter advances in the attention's second kernel: nothing launches but the mask's
    # kernel and the attention's two a layer.
    dev, length, heads, head_dim = "cuda", 640, 8, 64
    torch.manual_seed(0)
    q = torch.randn(1, 1, heads * head_dim, device=dev, dtype=torch.bfloat16)
    caches = [torch.randn(2, 1, 2, length, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(4)]
    counters = [torch.tensor(100, device=dev) for _ in caches]
    position = torch.tensor(99, device=dev)

    def step(q, caches, counters, position):
        mask = (torch.arange(length, device=dev) <= position).view(1, 1, 1, length)
        return [kernels.decode_attention(q, *caches[i], mask, 0.125, counters[i]) for i in range(len(caches))]

    compiled = torch.compile(step, fullgraph=True)
    outs = compiled(q, caches, counters, position)
    mask = (torch.arange(length, device=dev) <= position).view(1, 1, 1, length)
    for out, (k, v), c in zip(outs, caches, counters, strict=True):
        torch.testing.assert_close(out, kernels.decode_attention(q, k, v, mask, 0.125), rtol=0, atol=0)
        assert c.item() == 101
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        compiled(q, caches, counters, position)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    attention = [n for n in names if n.startswith("_decode_attention")]
    assert len(attention) == 8 and len(names) - len(attention) <= 1, names
    assert all(c.item() == 102 for c in counters)
    torch._dynamo.reset()


def _folded_layer_weights(hidden: int, inner: int, heads_out: int, dtype):
    """1.1B-shaped interleaved int4 weights for a folded layer's four projections (q+k+v, o,
    gate+up, down) with their dequantized fp32 weights."""
    from quantcore_torch.packing import dequantize_int4

    weights = {}
    for name, (n, k) in {
        "qkv": (heads_out, hidden),
        "o": (hidden, hidden),
        "gate_up": (2 * inner, hidden),
        "down": (hidden, inner),
    }.items():
        module = _module(n, k, 4, 128, dtype, "cuda", bias=False)
        layout = kernels.int4_interleaved_layout(module.qweight, module.scale, module.zero, k, 128)
        dense = dequantize_int4(module.qweight, module.scale, module.zero, k, 128, torch.float32)
        weights[name] = ((layout.weight, layout.scales_and_zeros, 128, None), dense)
    return weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_folded_layer_matches_the_unfused_ops_and_replays_the_same_bits(dtype):
    # A 1.1B layer's four projections with its norms and residual adds folded
    # (quantcore_torch._fold) on the card's pinned configs, three layers in a CUDA graph: each
    # block's counters cleared by the block after its reader, so every replay gives the same
    # bits (fixed-point counters: no order dependence); against transformers' unfused ops
    # (residual adds, RMSNorm, the projections on the dequantized weights), within rounding.
    from quantcore_torch import _fold

    hidden, inner, eps, layers = 2048, 5632, 1e-5, 3
    weights = _folded_layer_weights(hidden, inner, 2560, dtype)
    gen = torch.Generator("cuda").manual_seed(1)
    attn_out = torch.randn(1, hidden, dtype=dtype, device="cuda", generator=gen)
    g1, g2 = (torch.rand(2, hidden, device="cuda", generator=gen) + 0.5).to(dtype)
    h0 = torch.randn(1, hidden, dtype=dtype, device="cuda", generator=gen) * 3
    # attn[0]: the first layer's, as a model's embedding step would set it; the others start at
    # zero, as the block before adds to them; `final` takes the last layer's (the model's norm).
    attn = [_fold.sumsq_counter(h0)] + [_fold.sumsq_counter(device="cuda") for _ in range(layers - 1)]
    mlp = [_fold.sumsq_counter(device="cuda") for _ in range(layers)]
    final = _fold.sumsq_counter(device="cuda")
    xn0 = g1 * h0

    def step():
        h, xn, outs = h0, xn0, []
        for i in range(layers):  # the attention's output stands in for attention(q)
            q = _fold.int4_interleaved_norm_mm(xn, *weights["qkv"][0], attn[i], eps)
            h, xn = _fold.int4_interleaved_residual_mm(
                attn_out + q[:, :hidden] * 0.01, *weights["o"][0], h, g2, mlp[i], attn[i]
            )
            a = _fold.int4_interleaved_norm_mm(xn, *weights["gate_up"][0], mlp[i], eps, gate_up=True)
            nxt = attn[i + 1] if i + 1 < layers else final
            h, xn = _fold.int4_interleaved_residual_mm(a, *weights["down"][0], h, g1, nxt, mlp[i])
            outs += [q, a, h]
        outs.append(final.clone())
        attn[0].copy_(_fold.sumsq_counter(h0))
        final.zero_()
        return outs

    def reference():
        h, outs = h0, []
        for _ in range(layers):
            q = torch.nn.functional.linear(_rms(h, g1, eps).float(), weights["qkv"][1]).to(dtype)
            o = torch.nn.functional.linear((attn_out + q[:, :hidden] * 0.01).float(), weights["o"][1]).to(dtype)
            h = h + o
            gate, up = (
                torch.nn.functional.linear(_rms(h, g2, eps).float(), weights["gate_up"][1]).to(dtype).chunk(2, -1)
            )
            a = torch.nn.functional.silu(gate) * up
            h = h + torch.nn.functional.linear(a.float(), weights["down"][1]).to(dtype)
            outs += [q, a, h]
        return outs

    with torch.no_grad():
        eager = step()
        for out, ref in zip(eager[:-1], reference(), strict=True):
            assert relative_error(out, ref) < ROUNDING[dtype] * 2
        # The last hidden state's sum of squares, in fixed point; each other counter cleared.
        assert abs(eager[-1].item() - _fold.sumsq_counter(eager[-2]).item()) < 1e-6 * eager[-1].item()
        assert all(c.item() == 0 for c in mlp + attn[1:])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            for a, b in zip(captured, eager, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def _rms(h: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    hf = h.float()
    return gain * (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps)).to(h.dtype)
