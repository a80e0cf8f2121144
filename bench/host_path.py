"""The Python cost of an eager torch_wo forward on its CUDA path, measured without a GPU.

An eager decode step is bound by the host: what each layer's forward costs in Python before its
kernel launches decides how it compares with bf16's ``F.linear``. This times
``WeightOnlyLinear.forward`` down to the Triton launcher, on CPU tensors, with the CUDA calls
(device, stream) and the compiled kernel's launch replaced by no-ops: the Python and dispatch
work of the path, not the launch itself (Triton's C launcher) nor the GPU's. Compare two
revisions by running it at each (best of ``--repeat`` rounds of ``--number`` calls).

Needs ``triton`` (its CPU package works: nothing is compiled)::

    python bench/host_path.py                      # int8, int4 (Triton; interleaved), 2048x2048, one row
    python bench/host_path.py --gated              # also the gated MLP's folds: an int8 down projection
                                                   # fed gate|up, gate/up stacks with the activation
    python bench/host_path.py --prefill 40         # also a 40-row forward: dequantize, then F.linear
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
import types
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins" / "torch")]


def stubbed_cuda_path(stack: ExitStack):
    """Route ``quantcore_torch``'s CUDA path onto CPU tensors, every launch a no-op; returns ``_triton``."""
    from quantcore_torch import _triton, kernels

    fake = types.SimpleNamespace(run=lambda *a: None, function=0, packed_metadata=0)

    class KeptLauncher(_triton._Launcher):
        """Keeps a no-op kernel for each key at its first call, as the real one keeps the autotuned one."""

        def __call__(self, key, grid, args, constexprs):
            if self.compiled.get(key) is None:
                meta = {**constexprs, "BLOCK_N": 2, "BLOCK_K": 1024, "PREFETCH": False}
                self.compiled[key] = _triton._Entry(fake, 1, 1, self._tail(meta, args))
            return super().__call__(key, grid, args, constexprs)

    dequantize_kernels = (_triton._int8_dequantize_kernel, _triton._int4_dequantize_kernel)
    for target, name, value in (
        (torch.cuda, "current_device", lambda: None),
        (torch._C, "_cuda_getDevice", lambda: None),
        (torch._C, "_cuda_getCurrentRawStream", lambda device: 0),
        (torch.Tensor, "is_cuda", property(lambda self: True)),
        (torch.Tensor, "is_cpu", property(lambda self: False)),  # no CPU kernel may answer instead
        (kernels, "_TRITON", _triton),
        (kernels, "INT4_CUDA_KERNEL", "triton"),  # tinygemm is an aten op: not this path
        (_triton, "_INT8", _triton._INT8._replace(row=KeptLauncher(_triton._int8_row_kernel, pdl=True))),
        (_triton, "_INT4", _triton._INT4._replace(row=KeptLauncher(_triton._int4_row_kernel, pdl=True))),
        (_triton, "_INT4_INTERLEAVED", KeptLauncher(_triton._int4_interleaved_kernel, pdl=True)),
        (_triton, "_DEQUANTIZE", _triton._Dequantize(*map(KeptLauncher, dequantize_kernels))),
    ):
        stack.enter_context(mock.patch.object(target, name, value, create=True))
    return _triton


def best_us(call, number: int, repeat: int) -> float:
    call()  # the first call keeps the kernel
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="out_features")
    parser.add_argument("--k", type=int, default=2048, help="in_features")
    parser.add_argument(
        "--gated", action="store_true", help="also time gated_forward (int8 down projection) and gate_up_forward"
    )
    parser.add_argument(
        "--prefill", type=int, default=0, metavar="ROWS", help="also time a prefill forward of ROWS rows (e.g. 40)"
    )
    parser.add_argument("--number", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.prefill < 0:
        parser.error(f"--prefill: a number of rows, 0 (off) or more, got {args.prefill}")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        parser.error(f"needs triton (pip install triton): {exc}")
    from quantcore_torch import kernels
    from quantcore_torch.modules import WeightOnlyLinear

    torch.set_grad_enabled(False)
    linear = torch.nn.Linear(args.k, args.n, bias=False, dtype=torch.bfloat16)
    x = torch.randn(1, 1, args.k, dtype=torch.bfloat16)
    result = {}
    with ExitStack() as stack:
        stubbed_cuda_path(stack)
        for bits in (8, 4):
            module = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=128)
            module.kernel_layout = None  # the Triton kernel on the stored codes
            result[f"int{bits} forward"] = best_us(lambda m=module: m.forward(x), args.number, args.repeat)
        # int4 on its interleaved copy (QUANTCORE_INT4_CUDA_KERNEL=interleaved)
        module.kernel_layout = kernels.int4_interleaved_layout(module.qweight, module.scale, module.zero, args.k, 128)
        result["int4 interleaved forward"] = best_us(lambda: module.forward(x), args.number, args.repeat)
        if args.gated:
            down = WeightOnlyLinear.from_linear(linear, bits=8)
            h = torch.randn(1, 1, 2 * args.k, dtype=torch.bfloat16)
            result["int8 gated_forward"] = best_us(lambda: down.gated_forward(h), args.number, args.repeat)
            # The layer as stacked gate/up projections: the activation in its kernel's epilogue,
            # against the plain forward followed by PyTorch's silu(gate) * up.
            for bits in (8, 4):
                stack = WeightOnlyLinear.from_linear(linear, bits=bits, group_size=128)
                if bits == 4:
                    stack.kernel_layout = kernels.int4_interleaved_layout(
                        stack.qweight, stack.scale, stack.zero, args.k, 128
                    )
                name = "int8" if bits == 8 else "int4 interleaved"
                result[f"{name} gate_up_forward"] = best_us(
                    lambda m=stack: m.gate_up_forward(x), args.number, args.repeat
                )
                result[f"{name} forward, silu*mul"] = best_us(
                    lambda m=stack: kernels.gated_input(m.forward(x)), args.number, args.repeat
                )
        if args.prefill:
            # A prefill's rows: the weight dequantized (launch stubbed), then F.linear on the CPU,
            # beside nn.Linear's F.linear on the same rows (a small layer, so the matmul is cheap).
            small = torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16)
            rows = torch.randn(1, args.prefill, 64, dtype=torch.bfloat16)
            result[f"nn.Linear, {args.prefill} rows"] = best_us(lambda: small(rows), args.number, args.repeat)
            for bits in (8, 4):
                module = WeightOnlyLinear.from_linear(small, bits=bits, group_size=32)
                label = f"int{bits} forward, {args.prefill} rows"
                result[label] = best_us(lambda m=module: m.forward(rows), args.number, args.repeat)
        result["x.new_empty (for scale)"] = best_us(lambda: x.new_empty(x.shape), args.number, args.repeat)
    for label, us in result.items():
        print(f"{label:34s} {us:6.2f} us")
    if args.out:
        args.out.write_text(json.dumps(dict(n=args.n, k=args.k, us=result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
