"""A chain of int4 one-row linears in one persistent kernel, grid barriers between them (CUDA).

At a 1.1B Llama's shapes a decode step's 88 fused int4 linears read 2 to 11.5 MB each, and each
kernel spends most of its 3.4 to 8.4 µs on what every launch pays: the launch, the first DRAM
latency, the tail (docs/benchmarks.md, the fifteenth run). A persistent kernel pays them once:
as many programs as the GPU holds at a time loop over the links of a chain, each taking its share
of a link's output rows. Between links the programs meet at a barrier in global memory, and a
program issues its first weight tile of the next link before it waits there: the weights do not
depend on the link before, only the input does. This is the experiment the fifteenth run named
(a megakernel's overlap, for the linears alone); ``bench/bench_gemv.py --stack-methods
int4-chain...`` times it against the same links as separate launches.

A link is an interleaved int4 weight (``kernels.int4_interleaved_layout``) from an input vector
to an output vector; a gate/up link writes ``silu(gate) * up`` (``_triton._store_gate_up``'s
rounding). A later link may read an earlier one's output: the barrier orders them.

The barrier: program ``p`` adds one to link ``i``'s counter (release) once its rows of link ``i``
are stored; a program reads link ``i + 1``'s input once link ``i``'s counter holds every
program (acquire). All programs must be resident at once, or the first to wait waits forever:
the launch takes no more programs than the GPU holds (:func:`resident_programs`), and a wait
gives up after a bounded number of reads and counts a timeout that :meth:`Int4Chain.check`
raises on. The last program out sets the counters back to zero for the next launch (a CUDA graph
replays it as it is).

``one_launch=False`` launches the same kernel once a link, a program a tile, without barriers:
the baseline, and what Triton's CPU interpreter (whose programs run one after another) can run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._triton import INT4_MAGIC, _barrier_wait, _interleaved_input, _interleaved_rows, _silu, _store_row

__all__ = ["ChainConfig", "ChainLink", "Int4Chain", "resident_programs"]

# The table: a row a link, 16 int64 columns (the kernel loads a row whole): the weight's, scales',
# input's and output's addresses, N, K, the weight's and scales' row strides, the zero points'
# offset, gate/up (0 or 1), six unused.
# Reads a wait makes before it gives up (a second or so on an H100); the launch's other waits
# then give up at once.
SPINS = 1 << 20


@triton.jit
def _link_rows(t, N, gate_up, BLOCK_N: tl.constexpr):
    """Tile ``t``'s weight rows and their mask: ``BLOCK_N`` rows from ``t * BLOCK_N``, or, for a
    gate/up link, ``BLOCK_N // 2`` gate rows and as many up rows, alternating
    (``_triton._tile_rows``'s, by tile rather than by program)."""
    r = tl.arange(0, BLOCK_N)
    j = t * (BLOCK_N // 2) + r // 2
    half = N // 2
    rn = tl.where(gate_up != 0, j + (r % 2) * half, t * BLOCK_N + r)
    n_mask = tl.where(gate_up != 0, j < half, rn < N)
    return rn, n_mask


@triton.jit
def _store_gate_up_tile(out, y_ptr, t, N, BLOCK_N: tl.constexpr):
    """``_triton._store_gate_up`` for tile ``t`` (no bias)."""
    dtype = y_ptr.dtype.element_ty
    gate, up = tl.split(tl.reshape(out.to(dtype).to(tl.float32), (BLOCK_N // 2, 2)))
    j = t * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(y_ptr + j, (_silu(gate, dtype) * up).to(dtype), mask=j < N // 2)


@triton.jit
def _field(row, fields, index: tl.constexpr):
    """Column ``index`` of a table row loaded whole."""
    return tl.sum(tl.where(fields == index, row, 0), axis=0)


@triton.jit
def _int4_chain_kernel(
    table_ptr, counters_ptr, first, last, magic, spins, sleep,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    BF16: tl.constexpr, BARRIERS: tl.constexpr,
):  # fmt: skip
    """Links ``first`` to ``last - 1`` of the table (see the module): program ``p`` of ``P`` takes
    tiles ``p, p + P, ...`` of each link. ``BARRIERS``: one persistent launch for them all; else
    one launch a link (``last == first + 1``), nothing to wait for."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dtype = tl.bfloat16 if BF16 else tl.float16
    for i in range(first, last):
        # The link's row in one load a warp: every program reads it, and ten scalar loads of one
        # line from each of a thousand programs queue at one L2 slice.
        fields = tl.arange(0, 16)
        row = tl.load(table_ptr + i * 16 + fields)
        w_ptr = _field(row, fields, 0).to(tl.pointer_type(tl.int32))
        sz_ptr = _field(row, fields, 1).to(tl.pointer_type(dtype))
        x_ptr = _field(row, fields, 2).to(tl.pointer_type(dtype))
        y_ptr = _field(row, fields, 3).to(tl.pointer_type(dtype))
        N = _field(row, fields, 4).to(tl.int32)
        K = _field(row, fields, 5).to(tl.int32)
        stride_wn = _field(row, fields, 6).to(tl.int32)
        stride_sn = _field(row, fields, 7).to(tl.int32)
        zero_offset = _field(row, fields, 8).to(tl.int32)
        gate_up = _field(row, fields, 9).to(tl.int32)
        tiles = tl.where(gate_up != 0, tl.cdiv(N // 2, BLOCK_N // 2), tl.cdiv(N, BLOCK_N))
        ready = tl.where(i > first, programs, 0) * BARRIERS  # the first tile waits for link i - 1
        if BARRIERS:  # noqa: SIM102
            if pid >= tiles:  # no tile of this link: in step with the others all the same
                _barrier_wait(counters_ptr, i, ready, spins, sleep)
        for t in range(pid, tiles, programs):
            rn, n_mask = _link_rows(t, N, gate_up, BLOCK_N)
            out = _interleaved_rows(
                x_ptr, w_ptr, sz_ptr, rn, n_mask, K, stride_wn, stride_sn, zero_offset, magic,
                GROUP, BLOCK_N, BLOCK_K, PREFETCH, 3 if BARRIERS else 0, counters_ptr, i, ready, spins, sleep,
            )  # fmt: skip
            ready = ready * 0
            if gate_up != 0:
                _store_gate_up_tile(out, y_ptr, t, N, BLOCK_N)
            else:
                _store_row(out, y_ptr, y_ptr, rn, n_mask, False)
        if BARRIERS:
            tl.debug_barrier()  # every thread's stores before the count
            tl.atomic_add(counters_ptr + 2 + i, 1, sem="release", scope="gpu")
    if BARRIERS:
        done = tl.atomic_add(counters_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if done == programs - 1:  # the last one out: every other program has left its waits
            for i in range(first, last):
                tl.store(counters_ptr + 2 + i, 0)
            tl.store(counters_ptr + 1, 0)


class ChainLink(NamedTuple):
    """One link: ``y = x @ W.T`` (``gate_up``: ``y = silu(gate) * up`` of the stacked weight's two
    halves, ``y`` half as wide) for an interleaved int4 weight ``words`` / ``scales_and_zeros``."""

    x: torch.Tensor
    words: torch.Tensor
    scales_and_zeros: torch.Tensor
    y: torch.Tensor
    gate_up: bool = False


class ChainConfig(NamedTuple):
    """A program's tile (the one-row kernels' ``(BLOCK_N, BLOCK_K, num_warps, PREFETCH)``) and, for
    the persistent launch, programs a multiprocessor (all must be resident: :func:`resident_programs`)."""

    block_n: int = 2
    block_k: int = 2048
    warps: int = 2
    prefetch: bool = False
    per_sm: int = 8
    sleep: int = 0  # nanoseconds between a waiting thread's reads of a barrier


def resident_programs(registers: int, warps: int, shared: int, properties) -> int:
    """How many programs of a kernel (``registers`` a thread, ``warps``, ``shared`` bytes) one
    multiprocessor of a GPU (``torch.cuda.get_device_properties``) holds at once."""
    per_warp = -(-registers * 32 // 256) * 256  # registers are allocated 256 at a time, a warp
    by_registers = properties.regs_per_multiprocessor // (per_warp * warps) if registers else 32
    by_threads = properties.max_threads_per_multi_processor // (32 * warps)
    by_shared = properties.shared_memory_per_multiprocessor // shared if shared else 32
    return max(0, min(32, by_registers, by_threads, by_shared))


class Int4Chain:
    """A chain of :class:`ChainLink`\\ s run by :func:`_int4_chain_kernel`: call it to run them all
    (one launch, or one a link with ``one_launch=False``). The links' tensors are held here: the
    kernel reads them by address. Each link's input must be 4-byte aligned and contiguous, as the
    interleaved kernels read it."""

    def __init__(
        self, links: Sequence[ChainLink], group_size: int, config: ChainConfig | None = None, one_launch: bool = True
    ) -> None:
        config = ChainConfig() if config is None else config
        if not links:
            raise ValueError("a chain needs at least one link")
        first = links[0].x
        self.links = tuple(links)
        self.group_size = group_size
        self.config = config
        self.one_launch = one_launch
        if one_launch and first.device.type != "cuda":
            raise ValueError(
                f"a persistent launch needs a CUDA device, not {first.device}; one_launch=False runs a launch a link"
            )
        if config.block_k % group_size or config.block_n % 2:
            raise ValueError(f"{config}: BLOCK_K must hold whole groups of {group_size}, BLOCK_N an even count")
        rows = []
        for index, link in enumerate(self.links):
            problem = self._mismatch(link, first)
            try:
                _interleaved_input(link.x, link.words, link.scales_and_zeros, group_size)
            except ValueError as error:  # the weight does not fit the input
                problem = problem or str(error)
            if problem is not None:
                raise ValueError(f"link {index}: {problem}")
            sz = link.scales_and_zeros
            rows.append([
                link.words.data_ptr(), sz.data_ptr(), link.x.data_ptr(), link.y.data_ptr(),
                link.words.shape[0], link.x.shape[-1], link.words.stride(0), sz.stride(1), sz.stride(0),
                int(link.gate_up), 0, 0, 0, 0, 0, 0,
            ])  # fmt: skip
        self.table = torch.tensor(rows, dtype=torch.int64, device=first.device)
        # [timeouts, programs out, one count a link]
        self.counters = torch.zeros(2 + len(self.links), dtype=torch.int32, device=first.device)
        self.programs = 0
        self._meta = dict(
            GROUP=group_size, BLOCK_N=config.block_n, BLOCK_K=config.block_k, PREFETCH=config.prefetch,
            BF16=first.dtype == torch.bfloat16, num_warps=config.warps, num_stages=1,
        )  # fmt: skip

    @staticmethod
    def _mismatch(link: ChainLink, first: torch.Tensor) -> str | None:
        x, y = link.x, link.y
        if x.dtype not in (torch.float16, torch.bfloat16) or x.dtype != first.dtype or y.dtype != x.dtype:
            return (
                f"x and y must share the first input's fp16 / bf16 dtype ({first.dtype}), got {x.dtype} and {y.dtype}"
            )
        if x.device != first.device or y.device != x.device or link.words.device != x.device:
            return "every tensor must be on the first input's device"
        if x.numel() != x.shape[-1] or not x.is_contiguous() or not y.is_contiguous():
            return f"x must be one contiguous row and y contiguous, got {tuple(x.shape)} and {tuple(y.shape)}"
        if x.data_ptr() % 4:
            return "x must be 4-byte aligned"
        n = link.words.shape[0]
        if link.gate_up and n % 2:
            return f"a gate/up weight stacks two halves: {n} rows is odd"
        want = n // 2 if link.gate_up else n
        if y.numel() != want:
            return f"y must hold {want} values, has {y.numel()}"
        return None

    def _args(self, first: int, last: int) -> tuple:
        return (self.table, self.counters, first, last, INT4_MAGIC, SPINS, self.config.sleep)

    def _persistent_grid(self) -> int:
        device = self.table.device
        compiled = _int4_chain_kernel.warmup(*self._args(0, len(self.links)), **self._meta, BARRIERS=True, grid=(1,))
        compiled._init_handles()
        properties = torch.cuda.get_device_properties(device)
        fits = resident_programs(compiled.n_regs, self.config.warps, compiled.metadata.shared, properties)
        if self.config.per_sm > fits:
            raise ValueError(
                f"{self.config}: {self.config.per_sm} programs a multiprocessor asked for, {fits} fit "
                f"({compiled.n_regs} registers a thread); a persistent launch needs them all resident"
            )
        return self.config.per_sm * properties.multi_processor_count

    def __call__(self) -> None:
        if not self.one_launch:
            for i, link in enumerate(self.links):
                n = link.words.shape[0]
                tiles = (
                    triton.cdiv(n // 2, self.config.block_n // 2)
                    if link.gate_up
                    else triton.cdiv(n, self.config.block_n)
                )
                _int4_chain_kernel[(tiles,)](*self._args(i, i + 1), **self._meta, BARRIERS=False)
            return
        if not self.programs:
            self.programs = self._persistent_grid()
        _int4_chain_kernel[(self.programs,)](*self._args(0, len(self.links)), **self._meta, BARRIERS=True)

    def check(self) -> None:
        """Raise if a wait of a launch so far gave up (its outputs are then wrong); synchronizes."""
        timeouts = int(self.counters[0].item())
        if timeouts:
            raise RuntimeError(
                f"{timeouts} barrier waits gave up: not every program of the persistent launch was resident "
                f"({self.programs} programs, {self.config})"
            )
