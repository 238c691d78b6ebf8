"""A clause ranked by ``score.normalize()``, normalized after the score kernel from the
stored score (reference.normalize), instead of a statistics pass that recomputes the score.

The score kernel stores the operand x (one float32 per token); ``_slot_moments_kernel``
reduces it to per-program (count, mean, M2) partials; ``_slot_normalize_kernel`` merges a
row's partials in a fixed order and rewrites the slot in place as (x - mean) / std (0 where
std <= 1e-6 |mean|). That reads 12 bytes per token instead of recomputing x: for an attention
score, a whole proxy-attention pass. A sample clause of ``x.normalize()`` needs only the
partials: the select kernel standardizes x as it loads it (kernels/keys.py), 4 bytes per token.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import cdiv, even_tiling
from .primitives import standardize
from .stats import moments_of_partials, moments_tile

DEFERRED_BLOCK = 1024
DEFERRED_WARPS = 4


@triton.jit(do_not_specialize=["part", "slot", "rows", "N", "S", "tiles_per_prog"])
def _slot_moments_kernel(prio_ptr, ws_ptr, part, slot, rows, N, S, tiles_per_prog, BLOCK: tl.constexpr):
    """Program (i_s, i_row): the moments of its tiles of the stored slot."""
    i_s = tl.program_id(0)
    i_row = tl.program_id(1)
    row = prio_ptr + (slot * rows + i_row).to(tl.int64) * N
    n = tl.full([], 0.0, tl.float32)
    mean = tl.full([], 0.0, tl.float32)
    m2 = tl.full([], 0.0, tl.float32)
    for it in range(0, tiles_per_prog):
        o_n = (i_s * tiles_per_prog + it) * BLOCK + tl.arange(0, BLOCK)
        m = o_n < N
        n, mean, m2 = moments_tile(n, mean, m2, tl.load(row + o_n, mask=m, other=0.0), m)
    base = ws_ptr + part + (i_row * S + i_s) * 3
    tl.store(base, n)
    tl.store(base + 1, mean)
    tl.store(base + 2, m2)


@triton.jit(do_not_specialize=["part", "slot", "rows", "N", "S", "tiles_per_prog"])
def _slot_normalize_kernel(prio_ptr, ws_ptr, part, slot, rows, N, S, tiles_per_prog, BLOCK: tl.constexpr):
    """Program (i_s, i_row): merge the row's partials, standardize its tiles in place."""
    i_s = tl.program_id(0)
    i_row = tl.program_id(1)
    mean, std = moments_of_partials(ws_ptr, part, i_row, S)
    row = prio_ptr + (slot * rows + i_row).to(tl.int64) * N
    for it in range(0, tiles_per_prog):
        o_n = (i_s * tiles_per_prog + it) * BLOCK + tl.arange(0, BLOCK)
        m = o_n < N
        tl.store(row + o_n, standardize(tl.load(row + o_n, mask=m, other=0.0), mean, std), mask=m)


def deferred_tiling(n: int, splits_for) -> tuple:
    """(programs per row, tiles per program) over N tokens in DEFERRED_BLOCK tiles;
    ``splits_for(n_tiles)`` is the programs-per-row rule of the statistics passes."""
    n_tiles = cdiv(n, DEFERRED_BLOCK)
    return even_tiling(n_tiles, splits_for(n_tiles))


def moments_launch(priorities, workspace, part: int, slot: int, rows: int, n: int, splits: int, tiles: int):
    """(kernel, grid, args, constexprs) of the moment partials of one slot, at ``part``."""
    return (_slot_moments_kernel, (splits, rows), [priorities, workspace, part, slot, rows, n, splits, tiles],
            dict(BLOCK=DEFERRED_BLOCK))


def deferred_launches(priorities, workspace, part: int, slot: int, rows: int, n: int, splits: int, tiles: int):
    """[(kernel, grid, args, constexprs)] of the two passes that normalize one slot in place."""
    apply = [priorities, workspace, part, slot, rows, n, splits, tiles]
    return [moments_launch(priorities, workspace, part, slot, rows, n, splits, tiles),
            (_slot_normalize_kernel, (splits, rows), apply, dict(BLOCK=DEFERRED_BLOCK))]
