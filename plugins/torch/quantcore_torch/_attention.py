"""A Triton attention for one decode token on a static KV cache (batch 1), split over the cache.

At batch-1 decode a layer's attention reads the cache once and does almost no arithmetic, yet
transformers' compiled SDPA path spends more than its reads on launches: on shared key/value
heads (grouped-query attention) it first copies every key/value head once per query head
(``repeat_kv``, two kernels), then cuDNN's attention runs as a kernel and a reduction. Here one
kernel takes the query heads of a key/value head together, ``BLOCK_L`` cache positions at a time
(split-KV, as flash-decoding does, so that a short cache still fills the GPU), and a second one
combines the splits' softmax statistics. Positions the mask rules out are not read.

The function is SDPA's: ``softmax(q k^T * scale + mask) v`` in fp32 with the probabilities
rounded to the cache's dtype before they weigh ``v``, as flash kernels do; the result rounds once
to that dtype. A boolean mask (transformers 5's ``sdpa`` mask) keeps ``True`` positions, a float
one (4.x) is added.

Imported by :mod:`quantcore_torch.kernels` where :mod:`._triton` imports (CUDA and Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import _TAGS, _eager, _gdc_done, _gdc_wait, _Launcher

__all__ = ["counter_mismatch", "decode_attention", "decode_attention_mismatch"]

# Cache positions a program takes a step, and its warps; the most splits of the cache (the
# combine kernel holds them all in one block): a longer cache gives each split several steps.
# 16 positions on 2 warps: on an H200 (`bench_attention.py`, a step's caches in one CUDA graph)
# the fastest of eight configs at a 640-position cache for both Llamas' heads (3.9 against 4.3 µs
# a layer for 32 on 4 warps at 1.1B, 8.3 against 8.6 at 7B) and at 4,096 positions for 7B's;
# 8 % slower than the best there for 1.1B's.
BLOCK_L = 16
SPLIT_WARPS = 2
MAX_SPLITS = 64
# Other split configs by head size, (BLOCK_L, warps) (0: any other head size): bench_attention.py.
SPLIT_CONFIG: dict[int, tuple[int, int]] = {}
# Mask kinds, the kernels' ``MASK``.
_NO_MASK, _BOOL_MASK, _ADDED_MASK = 0, 1, 2


@triton.jit
def _decode_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr, L, CHUNK, scale,
    G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_L: tl.constexpr, MASK: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):  # fmt: skip
    """Program ``(h, s)``: the ``G`` query heads of key/value head ``h`` against cache positions
    ``s * CHUNK`` to ``(s + 1) * CHUNK``, an online softmax over ``BLOCK_L`` positions a step;
    writes the split's running max ``m``, sum ``l`` and unnormalized output ``acc`` (fp32).
    ``USE_GDC``: a programmatic launch (``_triton.PDL``); every read waits, as the kernel before
    (the q/k/v projection) writes q and the cache's newest position."""
    head = tl.program_id(0)
    split = tl.program_id(1)
    rg = tl.arange(0, BLOCK_G)
    rd = tl.arange(0, D)
    rows = rg < G
    _gdc_wait(USE_GDC)
    q = tl.load(q_ptr + (head * G + rg)[:, None] * D + rd[None, :], mask=rows[:, None], other=0.0)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    cache = head.to(tl.int64) * L * D
    start = split * CHUNK
    for l0 in range(start, start + CHUNK, BLOCK_L):
        rl = l0 + tl.arange(0, BLOCK_L)
        kept = rl < L
        if MASK == 1:
            kept = kept & (tl.load(mask_ptr + rl, mask=kept, other=0) != 0)
        at = cache + rl[:, None] * D + rd[None, :]
        k = tl.load(k_ptr + at, mask=kept[:, None], other=0.0)  # positions ruled out are not read
        v = tl.load(v_ptr + at, mask=kept[:, None], other=0.0)  # issued with k's: both reads in flight
        s = tl.dot(q, tl.trans(k)) * scale
        if MASK == 2:
            s += tl.load(mask_ptr + rl, mask=kept, other=0.0).to(tl.float32)[None, :]
        s = tl.where(kept[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet stay at zero
        alpha = tl.exp(m_i - shift)
        p = tl.exp(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    _gdc_done(USE_GDC)
    out = (head * tl.num_programs(1) + split) * G + rg
    tl.store(m_ptr + out, m_i, mask=rows)
    tl.store(l_ptr + out, l_i, mask=rows)
    tl.store(acc_ptr + out[:, None] * D + rd[None, :], acc, mask=rows[:, None])


@triton.jit
def _decode_attention_combine_kernel(
    m_ptr, l_ptr, acc_ptr, o_ptr, counter_ptr, SPLITS,
    G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, ADVANCE: tl.constexpr, USE_GDC: tl.constexpr = False,
):  # fmt: skip
    """Program ``h``: query head ``h``'s output from its splits, each weighed by ``exp(m - max m)``.
    ``ADVANCE``: program 0 also adds one to the cache's token count at ``counter_ptr`` (no other
    program, and no kernel of this attention, reads it). ``USE_GDC``: a programmatic launch."""
    h = tl.program_id(0)
    _gdc_wait(USE_GDC)
    if ADVANCE:
        count = tl.load(counter_ptr)  # issued first: its latency hides behind the splits' loads
    rs = tl.arange(0, BLOCK_S)
    rd = tl.arange(0, D)
    inside = rs < SPLITS
    at = ((h // G) * SPLITS + rs) * G + h % G
    # The three reads first, all in flight at once: the kernel is their latency.
    m = tl.load(m_ptr + at, mask=inside, other=float("-inf"))
    l_s = tl.load(l_ptr + at, mask=inside, other=0.0)
    acc = tl.load(acc_ptr + at[:, None] * D + rd[None, :], mask=inside[:, None], other=0.0)
    top = tl.max(m, 0)
    w = tl.exp(m - tl.where(top == float("-inf"), 0.0, top))
    total = tl.sum(l_s * w, 0)  # the softmax's denominator
    out = tl.sum(acc * w[:, None], 0) / total
    _gdc_done(USE_GDC)
    tl.store(o_ptr + h * D + rd, out.to(o_ptr.dtype.element_ty))
    if ADVANCE:
        tl.store(counter_ptr, count + 1, mask=h == 0)


# Both launch programmatically in a captured graph where ``_triton.PDL`` is on (no weights to load
# early: what they gain is their launch, hidden behind the kernel before, and the o projection's
# weight loads issued during the combine). Under the ``auto`` trigger they let the next kernel
# launch right after their wait: late, they cost a 1.1B int4 step 26 µs (twenty-first run).
_SPLIT = _Launcher(_decode_attention_split_kernel, pdl=True, auto_early=True)
_COMBINE = _Launcher(_decode_attention_combine_kernel, pdl=True, auto_early=True)


def decode_attention_mismatch(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask) -> str | None:
    """Why :func:`decode_attention` cannot take these, or ``None``."""
    problems = []
    if keys.dim() != 4 or keys.shape[0] != 1 or values.shape != keys.shape:
        problems.append(f"keys and values of one shape [1, heads, length, head_dim], got {tuple(keys.shape)}")
        return "the decode attention needs " + "; ".join(problems)
    heads, length, head = keys.shape[1:]
    if head < 16 or head > 256 or head & (head - 1):
        problems.append(f"a head_dim that is a power of two from 16 to 256, got {head}")
    if q.numel() % (heads * head) or q.numel() // (heads * head) > 64:
        problems.append(f"one token's q of a multiple (at most 64) of {heads} heads of {head}, got {q.numel()} values")
    if keys.dtype not in (torch.float16, torch.bfloat16) or q.dtype != keys.dtype or values.dtype != keys.dtype:
        problems.append(f"fp16 or bf16 q, keys and values of one dtype, got {q.dtype}, {keys.dtype}, {values.dtype}")
    if not (q.is_contiguous() and keys.is_contiguous() and values.is_contiguous()):
        problems.append("contiguous q, keys and values")
    if mask is not None and (mask.numel() != length or mask.dim() != 4 or not mask.is_contiguous()):
        problems.append(f"a mask of one row of {length} positions shared by every head, got {tuple(mask.shape)}")
    return "the decode attention needs " + "; ".join(problems) if problems else None


def _decode_attention_launch(q, keys, values, mask, scale: float, counter=None) -> torch.Tensor:
    """One token's attention on a static cache: ``q`` (``heads * head_dim`` values, heads in
    order, each group of ``heads // kv_heads`` on one key/value head) against ``keys`` and
    ``values`` (``[1, kv_heads, length, head_dim]``), with ``mask`` (``None``, or one row of
    ``length``: boolean, ``True`` kept, or float, added). Returns ``[1, 1, heads, head_dim]`` in
    the cache's dtype (what transformers' attention functions return). ``counter`` (a one-value
    integer tensor on q's device, or ``None``): the combine kernel adds one to it, the step's
    cache advance that would otherwise be a kernel of its own."""
    problem = decode_attention_mismatch(q, keys, values, mask) or counter_mismatch(counter, q)
    if problem is not None:
        raise ValueError(problem)
    kv_heads, length, head = keys.shape[1:]
    groups = q.numel() // (kv_heads * head)
    block_l, warps = _split_config(head)
    steps = triton.cdiv(length, block_l)
    splits = min(steps, MAX_SPLITS)
    chunk = triton.cdiv(steps, splits) * block_l
    splits = triton.cdiv(length, chunk)
    stats = torch.empty((2, kv_heads * splits * groups), device=q.device, dtype=torch.float32)
    acc = torch.empty((kv_heads * splits * groups, head), device=q.device, dtype=torch.float32)
    kind = _NO_MASK if mask is None else _BOOL_MASK if mask.dtype == torch.bool else _ADDED_MASK
    masks = keys if mask is None else mask
    out = q.new_empty((1, 1, kv_heads * groups, head))
    block_g = max(16, triton.next_power_of_2(groups))
    args = (q, keys, values, masks, stats[0], stats[1], acc, length, chunk, float(scale))
    # What the compiled kernels were specialized on: sizes, dtypes, the pointers' 16-byte alignment.
    aligned = tuple(t.data_ptr() % 16 == 0 for t in (q, keys, values, masks))
    key = (q.device.index, kv_heads, length, head, groups, q.dtype, masks.dtype, kind, block_l, warps, *aligned)
    if not _SPLIT.run_kept(key, args):
        constexprs = {"G": groups, "D": head, "BLOCK_G": block_g, "BLOCK_L": block_l, "MASK": kind, "USE_GDC": False}
        constexprs["num_warps"] = warps
        _eager(_SPLIT, key, q, lambda meta: (kv_heads, splits), args, constexprs)
    advance = counter is not None
    args = (stats[0], stats[1], acc, out, counter if advance else stats, splits)
    key = (*key, advance)
    if not _COMBINE.run_kept(key, args):
        block_s = triton.next_power_of_2(splits)
        constexprs = {"G": groups, "D": head, "BLOCK_S": block_s, "ADVANCE": advance, "USE_GDC": False}
        _eager(_COMBINE, key, q, lambda meta: (kv_heads * groups, 1), args, constexprs)
    return out


def _split_config(head: int) -> tuple[int, int]:
    """The split kernel's ``BLOCK_L`` and warps for a head size (``SPLIT_CONFIG`` where set)."""
    config = SPLIT_CONFIG.get(head, SPLIT_CONFIG.get(0))
    if config is None:
        return BLOCK_L, SPLIT_WARPS
    block_l, warps = config
    if block_l < 16 or block_l & (block_l - 1) or warps not in (1, 2, 4, 8, 16):
        raise ValueError(
            f"SPLIT_CONFIG for head size {head}: (BLOCK_L, warps) with BLOCK_L a power of two of at least 16 "
            f"(tl.dot's smallest tile) and 1, 2, 4, 8 or 16 warps, got {config!r}"
        )
    return block_l, warps


def counter_mismatch(counter, q: torch.Tensor) -> str | None:
    """Why :func:`decode_attention` cannot advance ``counter``, or ``None``."""
    if counter is None:
        return None
    if counter.numel() != 1 or counter.dtype not in (torch.int32, torch.int64) or counter.device != q.device:
        return (
            f"the decode attention advances a one-value int32/int64 counter on {q.device}, "
            f"got {tuple(counter.shape)} {counter.dtype} on {counter.device}"
        )
    return None


@torch.library.custom_op("quantcore_torch::decode_attention", mutates_args=(), **_TAGS)
def _decode_attention_op(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    return _decode_attention_launch(q.contiguous(), keys, values, _contiguous(mask), scale)


@_decode_attention_op.register_fake
def _(q, keys, values, mask, scale):
    return q.new_empty((1, 1, q.numel() // keys.shape[-1], keys.shape[-1]))


@torch.library.custom_op("quantcore_torch::decode_attention_advance", mutates_args=("counter",), **_TAGS)
def _decode_attention_advance_op(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
    counter: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    return _decode_attention_launch(q.contiguous(), keys, values, _contiguous(mask), scale, counter)


@_decode_attention_advance_op.register_fake
def _(q, keys, values, mask, scale, counter):
    return q.new_empty((1, 1, q.numel() // keys.shape[-1], keys.shape[-1]))


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.is_contiguous() else t.contiguous()


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scale: float, counter=None
) -> torch.Tensor:
    """One token's attention on a static cache (see :func:`_decode_attention_launch`), and with
    ``counter``, the cache's count advanced by one: from eager code the kernels launch directly;
    under ``torch.compile`` this is a custom op."""
    if torch.compiler.is_compiling():
        if counter is None:
            return _decode_attention_op(q, keys, values, mask, scale)
        return _decode_attention_advance_op(q, keys, values, mask, scale, counter)
    return _decode_attention_launch(_contiguous(q), keys, values, mask, scale, counter)
