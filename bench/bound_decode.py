#!/usr/bin/env python
"""What folding more of a decoder layer into the projections' kernels could save, at most (CUDA).

A compiled decode step (``bench_decode.Decoder``: static cache, CUDA graphs) of each method, as it
is and with parts of every decoder layer taken out, timed in one process:

- ``rope-kv``: the rotary embedding and the static cache's two writes skipped. Attention reads the
  cache as it stands; the cache's length still advances (``cumulative_length.add_``). A q/k/v
  kernel that rotated q and k and wrote k and v into the cache in its epilogue would leave this.
- ``norms``: each layer's two RMS norms an identity; the residual adds stay. A q/k/v and gate/up
  kernel that normalized its input as it loaded it would leave this.
- ``linears``: every interleaved int4 linear (plain, gate/up, q/k/v with the rotary epilogue) a
  kernel that only reads its weight's bytes (codes, then scales and zero points, one launch:
  ``bench_gemv.read_weight``) and returns an unwritten output, launched as the method launches its
  kernels (``+pdl``, ``+pdl-early``; ``+pdl-auto``: late, the read kernel has no tile to
  dequantize); the q/k/v one writes no cache. What the step would take if
  every linear cost only its bytes, at the read kernel's bandwidth: the bound of any design with
  a kernel a linear.
- ``adds``: each layer's two residual adds skipped (the layer returns its MLP's output); with
  ``norms``, nothing of a layer is left but its attention and its linears. A design that added
  the residual in its projections' epilogues would leave this.
- ``attention``: quantcore's decode attention (the ``+rope`` fold's) returns an unwritten output
  without a kernel (the cache's counter it may advance stays).

``--cuts`` lists the variants, each a cut or cuts joined by ``+`` (``linears+norms``). The
outputs are wrong by construction (the tokens differ): the figures are upper bounds on what a
fold could gain, with its own kernel costing nothing more, not speeds anyone gets. They say which
fold is worth building before it is built, and what a step could reach at all. Methods and
suffixes are ``bench_decode.py``'s.

Usage::

    python bench/bound_decode.py --methods bf16,int4-torch@interleaved+glu --cuts rope-kv,norms,rope-kv+norms
    python bench/bound_decode.py --methods int4-torch@interleaved+glu+rope+pdl-early+inductor-pdl \\
        --cuts linears,linears+norms,linears+norms+attention
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import types
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import bench_decode
import bench_gemv
import torch

CUTS = ("rope-kv", "norms", "adds", "linears", "attention")


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


def _layer_without_adds(self, hidden_states, **kwargs):
    """A Llama-family decoder layer's forward without its residual adds (a bound); the prefill runs
    the layer's own forward."""
    if hidden_states.shape[1] != 1:
        return type(self).forward(self, hidden_states, **kwargs)
    attended = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
    return self.mlp(self.post_attention_layernorm(attended))


def _read_only(x, words, scales_and_zeros, out_features: int, pdl: int):
    """A linear that costs only its weight's bytes: the read kernel over them, launched with
    ``pdl`` (its ``USE_GDC``, as the method's kernels launch), and an unwritten output."""
    bench_gemv.read_weight(words, scales_and_zeros, pdl)
    return x.new_empty((*x.shape[:-1], out_features))


@contextlib.contextmanager
def _kernels_cut(cuts: set[str]):
    """The process-wide cuts (``linears``, ``attention``) while the variant runs (inside its
    ``launch_options``, whose programmatic settings the read kernels take): quantcore_torch's
    launch functions, which its custom ops call, swapped out and put back."""
    with contextlib.ExitStack() as stack:
        if "linears" in cuts:
            _triton = bench_decode._triton_for("--cuts linears")
            pdl = _triton.programmatic_use_gdc() if _triton.PDL else 0

            def plain(x, words, sz, group_size, bias, gate_up=False):
                return _read_only(x, words, sz, words.shape[0] // 2 if gate_up else words.shape[0], pdl)

            def rope(x, words, sz, group_size, bias, cos, sin, keys, values, position, q_features, sq=None, eps=0.0):
                return _read_only(x, words, sz, q_features, pdl)

            stack.enter_context(mock.patch.object(_triton, "_int4_interleaved_launch", plain))
            stack.enter_context(mock.patch.object(_triton, "_int4_interleaved_rope_launch", rope))
        if "attention" in cuts:
            from quantcore_torch import _attention

            def attend(q, keys, values, mask, scale, counter=None):
                return q.new_empty((1, 1, q.numel() // keys.shape[-1], keys.shape[-1]))

            stack.enter_context(mock.patch.object(_attention, "_decode_attention_launch", attend))
        yield


def apply_cuts(model, cuts: set[str]) -> int:
    """Take the layer cuts (``rope-kv``, ``norms``, ``adds``) out of every decoder layer of ``model``;
    returns the number of layers."""
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
        if "adds" in cuts:
            layer.forward = types.MethodType(_layer_without_adds, layer)
    return len(layers)


def time_variant(base, method: str, cuts: set[str], args) -> dict:
    with bench_decode.launch_options(method, args.model), _kernels_cut(cuts):
        model = bench_decode.make_variant(base, method)
        apply_cuts(model, cuts)
        dec = bench_decode.Decoder(model, 1, args.prompt, args.new, "cuda", compiled=True)
        dec.graph_step = "graph" in bench_decode.split_method(method)[1]
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
    parser.add_argument(
        "--cuts",
        default="rope-kv,norms,rope-kv+norms",
        help=f"comma-separated variants, each a cut or cuts joined by '+' (cuts: {', '.join(CUTS)})",
    )
    parser.add_argument("--prompt", type=_common.int_at_least(1), default=512)
    parser.add_argument("--new", type=_common.int_at_least(2), default=128)
    parser.add_argument("--repeats", type=_common.int_at_least(1), default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = [set()] + [set(v.split("+")) for v in args.cuts.split(",") if v]
    unknown = set().union(*variants) - set(CUTS)
    if unknown:
        parser.error(f"--cuts: unknown {sorted(unknown)} (known: {', '.join(CUTS)})")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device: the bound is a CUDA-graph step's time")
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
