"""A proxy attention's average pooling over keys, after the score kernel instead of inside it.

Pooled in the score kernel, a key's score needs its neighbours' (HALF = kernel // 2 on each
side): tiles of 64 keys overlap by 2 * HALF (60 new keys a tile at SnapKV's kernel 5) and the
pooling shifts each tile's [BLOCK_N] vector through shared memory once per offset. On an H100
(perf/proxy_score_probe.py, 128K, B = 1 / 4) that made SnapKV's score pass 1.14x / 1.18x the same
pass unpooled in whole tiles. So where a slot is such an attention (codegen.deferred_pools) and
``TRITONKV_POOL_AFTER=1`` (geometry.pool_after), the score kernel stores the unpooled sum over the
group's heads (proxy_attention_tile with FINISH off), and ``_pool_kernel`` finishes it in place as
proxy_attention_tile would have: the pooling (zero padding outside [0, N - w) with
exclude_window, else [0, N)), the group mean's division, the window's keys set to 0. The same
float32 operations in the same order: the same values.

In place, the program of one segment of a row (POOL_SEG keys, ``pool_segment``) cannot read the
keys beside its segment once the neighbouring programs have pooled theirs: the score kernel
also stores, per segment, the first and last HALF unpooled values (``store_edges``) in an edge
region of the workspace (2 * HALF floats per segment and row, after the attention's row
statistics), and a program reads the keys beside its segment from there.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import cdiv, next_power_of_2
from .proxy import group_finish
from .sequences import sequence_of

POOL_WARPS = 4
MAX_SEGMENT = 2048   # keys per program of the pooling pass (16 float32 a thread at 4 warps; edges: 1 B per 256 keys)
MAX_DEFERRED_KERNEL = 15   # the widest pooling deferred (HALF <= 7 fits the narrowest segment)


def pool_segment(n: int, paged: bool = False) -> int:
    """Keys per program of the pooling pass over rows of ``n`` keys (the score kernel's POOL_SEG):
    about an eighth of a short row (so that the edges between segments are exercised at the sizes
    tests run), at most MAX_SEGMENT, at least 16 (> 2 * HALF for every deferred kernel). Paged:
    MAX_SEGMENT, whatever the length, so that sequences of any length batch together (the
    constexprs of a batch's kernels are one, tritonkv.paged_plan)."""
    return MAX_SEGMENT if paged else max(16, min(MAX_SEGMENT, next_power_of_2(cdiv(n, 8))))


def edge_floats(n: int, kernel: int, seg: int) -> int:
    """Float32 elements of one row's edges: 2 * HALF per segment of ``seg`` keys."""
    return cdiv(n, seg) * 2 * (kernel // 2)


@triton.jit
def row_edges(ws_ptr, lse_off, rows, q_rows, i_row, NS, SEG: tl.constexpr, HALF: tl.constexpr):
    """Pointer to row i_row's edges (rows of NS keys, segments of SEG): a pooled slot's edges lie right
    after its attention's row statistics (lse_off + rows * q_rows floats into the workspace, where
    geometry allocates them), a row's after another (edge_floats). The score kernel's stores and the
    pass's loads both address them through here."""
    return ws_ptr + lse_off + rows * q_rows + i_row.to(tl.int64) * (tl.cdiv(NS, SEG) * 2 * HALF)


@triton.constexpr_function
def _end_lanes(HALF):
    """Lanes of the tensor of a segment's 2 * HALF end tokens (a power of two)."""
    return max(2, 1 << (2 * HALF - 1).bit_length())


@triton.jit
def store_edges(edge_ptr, x, o_n, m, SEG: tl.constexpr, HALF: tl.constexpr):
    """Store the lanes of x [BLOCK_N] (tokens o_n, mask m) that are among the first or last HALF
    of their segment of SEG tokens at edge_ptr + segment * 2 * HALF + (0 .. 2 * HALF - 1): first
    ones, then last ones (one row's edges)."""
    r = o_n % SEG
    at = tl.where(r < HALF, r, r - (SEG - 2 * HALF))
    tl.store(edge_ptr + (o_n // SEG) * (2 * HALF) + at, x, mask=m & ((r < HALF) | (r >= SEG - HALF)))


@triton.jit
def _unpooled(row, edges, p, lo, n_pool, SEG: tl.constexpr, HALF: tl.constexpr):
    """The unpooled values of tokens p next to a segment's ends, 0 outside [0, n_pool): from the
    slot inside the segment [lo, lo + SEG), else from the neighbouring segment's edges (the
    previous one's last HALF at its slots HALF .., the next one's first HALF at 0 ..)."""
    ok = (p >= 0) & (p < n_pool)
    inside = (p >= lo) & (p < lo + SEG)
    at = tl.where(p < lo, (lo // SEG - 1) * (2 * HALF) + 2 * HALF + (p - lo), (lo // SEG + 1) * (2 * HALF) + (p - lo - SEG))
    return tl.where(inside, tl.load(row + p, mask=ok & inside, other=0.0),
                    tl.load(edges + at, mask=ok & ((p < lo) | (p >= lo + SEG)), other=0.0))


@triton.jit(do_not_specialize=["slot", "rows", "N", "w", "lse_off", "q_rows", "H"])
def _pool_kernel(prio_ptr, ws_ptr, sq_ptr, slot, rows, N, w, lse_off, q_rows, H, SEG: tl.constexpr, KERNEL: tl.constexpr,
                 G: tl.constexpr, GROUP_MEAN: tl.constexpr, EXCLUDE: tl.constexpr, PAGE: tl.constexpr):
    """Program (segment, row): pool the segment's unpooled values in place (the average of
    primitives.pool), then proxy.group_finish: with GROUP_MEAN divide by the group's G, with
    EXCLUDE set the window's w keys to 0. N is the
    slots' row stride (the longest sequence where PAGE > 0, each row's length then read from
    its sequence table entry). A lane's neighbours come from shifted loads of the segment
    itself; the HALF lanes at each end, whose neighbours lie partly outside it, are pooled
    apart from the edges (token by token: 4 of 2,048 at SnapKV's kernel 5)."""
    HALF: tl.constexpr = KERNEL // 2
    i_seg = tl.program_id(0)
    i_row = tl.program_id(1)
    NS = N
    if PAGE > 0:
        _, N, _, _, _ = sequence_of(sq_ptr, i_row // H)
    n_pool = N
    if EXCLUDE:
        n_pool = N - w
    lo = i_seg * SEG
    o_i = tl.arange(0, SEG)
    row = prio_ptr + (slot * rows + i_row).to(tl.int64) * NS
    seg_row = row + lo
    edges = row_edges(ws_ptr, lse_off, rows, q_rows, i_row, NS, SEG, HALF)
    acc = tl.load(seg_row + o_i - HALF, mask=(o_i >= HALF) & (lo + o_i - HALF < n_pool), other=0.0)
    for j in tl.static_range(1 - HALF, HALF + 1):
        acc = acc + tl.load(seg_row + o_i + j, mask=(o_i + j >= 0) & (o_i + j < SEG) & (lo + o_i + j < n_pool),
                            other=0.0)
    acc = group_finish(acc / KERNEL, lo + o_i, N, w, G, GROUP_MEAN, EXCLUDE)
    # the first and last HALF tokens, with the neighbours beside the segment
    o_e = tl.arange(0, _end_lanes(HALF))
    q = tl.where(o_e < HALF, lo + o_e, lo + SEG - 2 * HALF + o_e)
    end = _unpooled(row, edges, q - HALF, lo, n_pool, SEG, HALF)
    for j in tl.static_range(1 - HALF, HALF + 1):
        end = end + _unpooled(row, edges, q + j, lo, n_pool, SEG, HALF)
    end = group_finish(end / KERNEL, q, N, w, G, GROUP_MEAN, EXCLUDE)
    tl.debug_barrier()   # every thread's loads of the segment before any thread's stores into it
    tl.store(seg_row + o_i, acc, mask=(o_i >= HALF) & (o_i < SEG - HALF) & (lo + o_i < N))
    tl.store(row + q, end, mask=(o_e < 2 * HALF) & (q < N))


def pool_launch(priorities, workspace, sequences, slot: int, rows: int, n: int, w: int, lse_off: int, q_rows: int,
                heads: int, kernel: int, group: int, group_mean: bool, exclude: bool, page: int, seg: int):
    """(kernel, grid, args, constexprs) of the pooling pass over one slot of ``priorities``
    [n_slots, rows, n] in segments of ``seg`` keys (the score kernel's POOL_SEG); ``lse_off``,
    ``q_rows``: the slot's attention's row statistics in ``workspace``, its edges after them
    (row_edges); ``sequences``: a paged call's sequence table (else any tensor: not read)."""
    return (_pool_kernel, (cdiv(n, seg), rows),
            [priorities, workspace, sequences, slot, rows, n, w, lse_off, q_rows, heads],
            dict(SEG=seg, KERNEL=kernel, G=group, GROUP_MEAN=group_mean, EXCLUDE=exclude, PAGE=page))
