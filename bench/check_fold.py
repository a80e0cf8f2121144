"""Does ``fuse_projections(norms=True)`` run its kernels in a compiled decode step? (CUDA only.)

A 1.1B-shaped Llama of two layers, quantized and fused as ``bench_decode.py``'s
``int4-torch@interleaved+glu+rope+norms`` method: each check the folded layer's forward makes,
evaluated eagerly and inside ``torch.compile(fullgraph=True)``, then a decode eager and compiled
with the stack's ``out`` counter zeroed first (non-zero after a run: the residual kernels ran).
The twenty-fifth run (docs/benchmarks.md) found with it that torch 2.11's dynamo read the rotary
and gated patches' checks as false, so the compiled step never folded.

    python bench/check_fold.py [--method int8-torch+glu+rope+norms]
"""

from __future__ import annotations

import argparse

import _common
import bench_decode
import torch

METHOD = "int4-torch@interleaved+glu+rope+norms"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default=METHOD, help=f"a bench_decode method with +norms (default {METHOD})")
    method = parser.parse_args(argv).method
    from quantcore_torch import fusion, kernels
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    shape = dict(_common.LLAMA_SHAPES["1.1b"], num_hidden_layers=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).to(torch.bfloat16).eval()
    model = bench_decode.make_variant(base, method)
    layer = model.model.layers[0]
    parts = layer._quantcore_fold
    o = parts.attention.o_proj
    checks = {
        "the fold's projections": lambda x: fusion._fold_projections(parts, x) is not None,
        "o_proj.norm_fold_takes": lambda x: o.norm_fold_takes(x),
        "kernels.norm_fold_takes": lambda x: (
            kernels.int8_norm_fold_takes(x) if o.bits == 8 else kernels.norm_fold_takes(x, o.kernel_layout)
        ),
        "the rotary patch": lambda x: getattr(parts.attention, "_quantcore_rotary", None) is not None,
        "the gated patch": lambda x: getattr(parts.mlp, "_quantcore_gated", None) is not None,
        "counters on the input's device": lambda x: layer._quantcore_sum_mid.device == x.device,
    }
    x = torch.randn(1, 1, shape["hidden_size"], device="cuda", dtype=torch.bfloat16)
    failed = 0
    with torch.no_grad():
        for name, check in checks.items():
            torch._dynamo.reset()
            compiled = torch.compile(lambda x, check=check: x.sum() * 0 + int(check(x)), fullgraph=True)
            eager, traced = bool(check(x)), bool(compiled(x).item())
            failed += not (eager and traced)
            print(f"{name}: eager {eager}, compiled {traced}", flush=True)
    for compiled in (False, True):
        torch._dynamo.reset()
        dec = bench_decode.Decoder(model, 1, 16, 8, "cuda", compiled=compiled)
        dec.run()
        layer._quantcore_sum_out.zero_()
        tokens = dec.run()[0]
        ran = layer._quantcore_sum_out.item() != 0
        failed += not ran
        print(f"{'compiled' if compiled else 'eager'} decode: folded kernels ran {ran}, tokens {tokens.tolist()}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
