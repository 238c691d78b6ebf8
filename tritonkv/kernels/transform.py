"""A top clause's priority transforms, in place after the score kernel (reference.clause_transform):

  - head reduce: every KV head of a batch row gets the mean / sum / max of the priority over
    the row's heads (all heads then keep the same tokens);
  - chunk reduce: every token gets the sum / mean / max over its chunk of ``CHUNK`` consecutive
    positions (chunks aligned at 0), so the select kernel, which breaks ties by the lower
    index, takes chunks whole.

A program owns ``CHUNKS`` whole chunks of one row (or of all H rows of a batch row when heads
are reduced), so it reads and writes only its own tokens: the transform is safe in place.
NaN counts as -inf, as in the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import cdiv, next_power_of_2

REDUCE_CODES = {None: 0, "mean": 1, "sum": 2, "max": 3}   # HEADS; CHUNK_REDUCE uses mean / sum / max
TRANSFORM_WARPS = 4
TILE_TOKENS = 1024   # lanes per program: CHUNKS * CHUNK_PAD


@triton.jit
def _without_nan(x):
    return tl.where(x != x, float("-inf"), x)


@triton.jit(do_not_specialize=["slot", "rows", "N", "H"])
def _transform_kernel(prio_ptr, slot, rows, N, H,
                      HEADS: tl.constexpr, CHUNK: tl.constexpr, CHUNK_PAD: tl.constexpr,
                      CHUNKS: tl.constexpr, CHUNK_REDUCE: tl.constexpr):
    """Program (i_c, i_r): chunks i_c * CHUNKS .. of row i_r (HEADS == 0) or of the H rows of
    batch row i_r (HEADS > 0)."""
    i_c = tl.program_id(0)
    i_r = tl.program_id(1)
    o_c = i_c * CHUNKS + tl.arange(0, CHUNKS)
    o_t = tl.arange(0, CHUNK_PAD)
    o_n = o_c[:, None] * CHUNK + o_t[None, :]                  # [CHUNKS, CHUNK_PAD] positions
    m = (o_t[None, :] < CHUNK) & (o_n < N)
    base = prio_ptr + (slot * rows).to(tl.int64) * N
    if HEADS == 0:
        first, count = i_r, 1
    else:
        first, count = i_r * H, H
    x = _without_nan(tl.load(base + first.to(tl.int64) * N + o_n, mask=m, other=0.0))
    for j in range(1, count):
        y = _without_nan(tl.load(base + (first + j).to(tl.int64) * N + o_n, mask=m, other=0.0))
        if HEADS == 3:
            x = tl.maximum(x, y)
        else:
            x = x + y
    if HEADS == 1:
        x = x / count
    if CHUNK > 1:
        if CHUNK_REDUCE == 3:
            c = tl.max(tl.where(m, x, float("-inf")), 1)
        else:
            c = tl.sum(tl.where(m, x, 0.0), 1)
            if CHUNK_REDUCE == 1:
                c = c / tl.maximum(tl.sum(m.to(tl.float32), 1), 1.0)
        x = tl.broadcast_to(c[:, None], [CHUNKS, CHUNK_PAD])
    for j in range(0, count):
        tl.store(base + (first + j).to(tl.int64) * N + o_n, x, mask=m)


def transform_launch(priorities, slot: int, batch: int, heads: int, n: int, chunk: int, chunk_reduce: str,
                     head_reduce):
    """(grid, args, constexprs) of the transform of ``priorities[slot]`` ([slots, B*H, N] float32)."""
    chunk_pad = next_power_of_2(chunk)
    chunks = max(1, TILE_TOKENS // chunk_pad)
    head_code = REDUCE_CODES[head_reduce]
    grid = (cdiv(cdiv(n, chunk), chunks), batch if head_code else batch * heads)
    args = [priorities, slot, batch * heads, n, heads]
    constexprs = dict(HEADS=head_code, CHUNK=chunk, CHUNK_PAD=chunk_pad, CHUNKS=chunks,
                      CHUNK_REDUCE=REDUCE_CODES[chunk_reduce])
    return grid, args, constexprs
