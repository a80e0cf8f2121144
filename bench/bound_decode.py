#!/usr/bin/env python
"""What folding more of a decoder layer into the projections' kernels could save, at most (CUDA).

A compiled decode step (``bench_decode.Decoder``: static cache, CUDA graphs) of each method, as it
is and with parts of every decoder layer taken out, timed in one process:

- ``rope-kv``: the rotary embedding and the static cache's two writes skipped. Attention reads the
  cache as it stands; the cache's length still advances (``cumulative_length.add_``). A q/k/v
  kernel that rotated q and k and wrote k and v into the cache in its epilogue would leave this.
- ``norms``: each layer's two RMS norms an identity; the residual adds stay. A q/k/v and gate/up
  kernel that normalized its input as it loaded it would leave this.
- ``rope-kv,norms``: both.

The outputs are wrong by construction (the tokens differ): the figures are upper bounds on what a
fold could gain, with its own kernel costing nothing more, not speeds anyone gets. They say which
fold is worth building before it is built. Methods and suffixes are ``bench_decode.py``'s.

Usage::

    python bench/bound_decode.py --methods bf16,int4-torch@interleaved+glu --cuts rope-kv,norms
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import bench_decode
import torch

CUTS = ("rope-kv", "norms")


def _attention_without_rope_kv(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """A Llama-family attention forward with no rotary embedding and no cache write (a bound); the
    prefill (more than one token: the cache is made there) runs the model's own forward."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if hidden_states.shape[1] != 1:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    cache = kwargs.pop("cache", None)
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    self.v_proj(hidden_states)  # the fused q/k/v call returns its slices member by member
    layer = cache.layers[self.layer_idx]
    layer.cumulative_length.add_(key.shape[-2])
    attend = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = attend(
        self, query, layer.keys, layer.values, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
    )
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def apply_cuts(model, cuts: set[str]) -> int:
    """Take ``cuts`` out of every decoder layer of ``model``; returns the number of layers cut."""
    layers = model.model.layers
    for layer in layers:
        if "rope-kv" in cuts:
            attention = layer.self_attn
            if getattr(attention, "q_norm", None) is not None:
                raise ValueError("rope-kv: attention with q/k norms is not a plain Llama attention")
            attention.forward = types.MethodType(_attention_without_rope_kv, attention)
        if "norms" in cuts:
            layer.input_layernorm = torch.nn.Identity()
            layer.post_attention_layernorm = torch.nn.Identity()
    return len(layers)


def time_variant(base, method: str, cuts: set[str], args) -> dict:
    with bench_decode.launch_options(method):
        model = bench_decode.make_variant(base, method)
        apply_cuts(model, cuts)
        dec = bench_decode.Decoder(model, 1, args.prompt, args.new, "cuda", compiled=True)
        dec.run()  # compiles, records the graphs
        times = [dec.run()[2] for _ in range(args.repeats)]
        del dec, model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    step = statistics.median(times) / (args.new - 1)
    return dict(method=method, cuts=sorted(cuts), ms_per_step=1e3 * step, tokens_per_s=1 / step)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama-1.1b", "llama-7b", "tiny"), default="llama-1.1b")
    parser.add_argument("--methods", default="bf16,int4-torch@interleaved+glu")
    parser.add_argument("--cuts", default="rope-kv,norms", help="comma-separated: each alone, then all together")
    parser.add_argument("--prompt", type=_common.int_at_least(1), default=512)
    parser.add_argument("--new", type=_common.int_at_least(2), default=128)
    parser.add_argument("--repeats", type=_common.int_at_least(1), default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the bound is a CUDA-graph step's time")
    cuts = [c for c in args.cuts.split(",") if c]
    unknown = set(cuts) - set(CUTS)
    if unknown:
        parser.error(f"--cuts: unknown {sorted(unknown)} (known: {', '.join(CUTS)})")
    variants = [set()] + [{c} for c in cuts] + ([set(cuts)] if len(cuts) > 1 else [])
    base = bench_decode.build_model(args.model, "cuda", args.prompt + args.new)
    print(torch.cuda.get_device_name(), args.model, flush=True)
    rows = []
    for method in args.methods.split(","):
        for cut in variants:
            try:
                row = time_variant(base, method, cut, args)
            except Exception as exc:  # one variant failing must not lose the others
                print(f"  {method} -{','.join(sorted(cut))}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                torch._dynamo.reset()
                continue
            whole = next((r for r in rows if r["method"] == method and not r["cuts"]), row)
            saved = 1e3 * (whole["ms_per_step"] - row["ms_per_step"])
            row["saved_us"] = saved
            rows.append(row)
            label = "as is" if not cut else "without " + ",".join(sorted(cut))
            print(
                f"  {method:<36} {label:<24} {row['tokens_per_s']:8.1f} tok/s {row['ms_per_step']:.3f} ms/step"
                f"  saves {saved:6.1f} us",
                flush=True,
            )
            if args.out:
                args.out.write_text(json.dumps(dict(model=args.model, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
