"""Row statistics that a score needs before it can be evaluated per token.

Each statistic is accumulated per program over a range of tiles (``*_tile``), written as
a partial, and the partials of a row are merged by a finalize kernel (``*_merge``) in a
fixed order, a block of partials at a time (one per loop step made a chain of dependent
loads), so results never depend on scheduling. Only lanes in ``m_val`` count: tiles overlap
by their halo, and each token must be counted once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .primitives import NORM_EPS

PARTIALS_BLOCK: tl.constexpr = tl.constexpr(64)   # scalar partials a merge reads per step
MERGE_TILE: tl.constexpr = tl.constexpr(2048)      # values per step of a merge of vector partials


# ---------------------------------------------------------------------------- anchor
@triton.jit
def anchor_tile(acc, b_kf, b_knorm, m_val):
    """acc [R, BLOCK_D] += the tile's L2-normalized keys, its rows r, r + R, r + 2R, ... summed into
    accumulator row r (R = BLOCK_N // ANCHOR_FOLD: geometry.anchor_fold). In a tile's blocked layout
    the rows folded together sit in one thread, so folding is additions in registers and the
    accumulator shrinks (sm_90, KeyDiff at D = 64-256 with a fold of 4: 64 -> 48 registers per
    thread, the tile loop's instructions unchanged: perf/sass_ops.py). The accumulator is summed
    over its rows only once, in anchor_store, so no tile pays a reduction across warps. Each row's
    scale (1 / its norm, 0 for a row that does not count) is formed once, so an element costs one
    multiply-add (sm_90, KeyDiff: 268 instructions per warp and tile, against 379 when each element
    was divided, selected and added; 64 registers either way)."""
    scale = tl.where(m_val, 1.0 / tl.maximum(b_knorm, NORM_EPS), 0.0)
    unit = b_kf * scale[:, None]
    R: tl.constexpr = acc.shape[0]
    return acc + tl.sum(tl.reshape(unit, [unit.shape[0] // R, R, unit.shape[1]]), 0)


@triton.jit
def anchor_store(ws_ptr, part, i_row, i_s, S, acc, active, BLOCK_D: tl.constexpr):
    o_d = tl.arange(0, BLOCK_D)
    tl.store(ws_ptr + part + (i_row * S + i_s) * BLOCK_D + o_d, tl.sum(acc, 0), mask=(o_d >= 0) & active)


@triton.jit
def anchor_merge(ws_ptr, part, final, i_row, S, N, BLOCK_D: tl.constexpr):
    """final[row] = normalize(sum of partials / N): the unit anchor (partials read SB at a time)."""
    SB: tl.constexpr = max(1, MERGE_TILE // BLOCK_D)
    o_d = tl.arange(0, BLOCK_D)
    o_s = tl.arange(0, SB)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, SB):
        rows = (i_row * S + s0 + o_s)[:, None] * BLOCK_D
        acc += tl.sum(tl.load(ws_ptr + part + rows + o_d[None, :], mask=(s0 + o_s < S)[:, None], other=0.0), 0)
    mean = acc / N
    unit = mean / tl.maximum(tl.sqrt(tl.sum(mean * mean, 0)), NORM_EPS)
    tl.store(ws_ptr + final + i_row * BLOCK_D + o_d, unit)


# ---------------------------------------------------------------------------- moments
@triton.jit
def welford_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s merge of (count, mean, sum of squared deviations)."""
    n = n_a + n_b
    frac = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def moments_tile(n, mean, m2, x, m_val):
    cnt = tl.sum(m_val.to(tl.float32), 0)
    t_mean = tl.sum(tl.where(m_val, x, 0.0), 0) / tl.maximum(cnt, 1.0)
    dev = x - t_mean
    t_m2 = tl.sum(tl.where(m_val, dev * dev, 0.0), 0)
    return welford_merge(n, mean, m2, cnt, t_mean, t_m2)


@triton.jit
def moments_store(ws_ptr, part, i_row, i_s, S, n, mean, m2, active):
    base = ws_ptr + part + (i_row * S + i_s) * 3
    tl.store(base, n, mask=active)
    tl.store(base + 1, mean, mask=active)
    tl.store(base + 2, m2, mask=active)


@triton.jit
def moments_of_partials(ws_ptr, part, i_row, S):
    """(mean, population std) of a row from its S (count, mean, M2) partials, a block of
    PARTIALS_BLOCK at a time (Chan et al.'s merge of a block: its count, its count-weighted mean,
    its M2 with each partial's deviation from that mean), blocks merged in order."""
    o_s = tl.arange(0, PARTIALS_BLOCK)
    n = tl.full([], 0.0, tl.float32)
    mean = tl.full([], 0.0, tl.float32)
    m2 = tl.full([], 0.0, tl.float32)
    for s0 in range(0, S, PARTIALS_BLOCK):
        m_s = s0 + o_s < S
        base = ws_ptr + part + (i_row * S + s0 + o_s) * 3
        b_n = tl.load(base, mask=m_s, other=0.0)
        b_mean = tl.load(base + 1, mask=m_s, other=0.0)
        t_n = tl.sum(b_n, 0)
        t_mean = tl.sum(b_n * b_mean, 0) / tl.maximum(t_n, 1.0)
        dev = b_mean - t_mean
        t_m2 = tl.sum(tl.load(base + 2, mask=m_s, other=0.0) + b_n * dev * dev, 0)
        n, mean, m2 = welford_merge(n, mean, m2, t_n, t_mean, t_m2)
    return mean, tl.sqrt(m2 / tl.maximum(n, 1.0))


@triton.jit
def moments_merge(ws_ptr, part, final, i_row, S, active):
    """final[row] = (mean, population std)."""
    mean, std = moments_of_partials(ws_ptr, part, i_row, S)
    tl.store(ws_ptr + final + i_row * 2, mean, mask=active)
    tl.store(ws_ptr + final + i_row * 2 + 1, std, mask=active)


# ---------------------------------------------------------------------------- softmax
@triton.jit
def online_softmax_merge(m_a, l_a, m_b, l_b, USE_EXP2: tl.constexpr):
    """Merge (max, sum of exp(x - max)) pairs; a side that saw nothing has (-inf, 0)."""
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    if USE_EXP2:
        return m, l_a * tl.exp2(m_a - m_safe) + l_b * tl.exp2(m_b - m_safe)
    else:
        return m, l_a * tl.exp(m_a - m_safe) + l_b * tl.exp(m_b - m_safe)


@triton.jit
def softmax_of_partials(b_m, b_l, USE_EXP2: tl.constexpr):
    """(max, sum of exp(x - max)) over axis 0 of a block of partials (max, sum) (-inf, 0 where
    empty), as one partial to merge in order (online_softmax_merge)."""
    t_m = tl.max(b_m, 0)
    shifted = b_m - tl.expand_dims(tl.where(t_m == float("-inf"), 0.0, t_m), 0)
    if USE_EXP2:
        return t_m, tl.sum(b_l * tl.exp2(shifted), 0)
    else:
        return t_m, tl.sum(b_l * tl.exp(shifted), 0)


@triton.jit
def softmax_tile(run_m, run_l, x, temperature, m_val):
    y = tl.where(m_val, x / temperature, float("-inf"))
    t_m = tl.max(y, 0)
    t_safe = tl.where(t_m == float("-inf"), 0.0, t_m)
    t_l = tl.sum(tl.where(m_val, tl.exp(y - t_safe), 0.0), 0)
    return online_softmax_merge(run_m, run_l, t_m, t_l, False)


@triton.jit
def softmax_store(ws_ptr, part, i_row, i_s, S, run_m, run_l, active):
    base = ws_ptr + part + (i_row * S + i_s) * 2
    tl.store(base, run_m, mask=active)
    tl.store(base + 1, run_l, mask=active)


@triton.jit
def softmax_merge(ws_ptr, part, final, i_row, S, active):
    """final[row] = (max, sum of exp(x / t - max)), from a block of PARTIALS_BLOCK partials at a time."""
    o_s = tl.arange(0, PARTIALS_BLOCK)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    for s0 in range(0, S, PARTIALS_BLOCK):
        m_s = s0 + o_s < S
        base = ws_ptr + part + (i_row * S + s0 + o_s) * 2
        t_m, t_l = softmax_of_partials(tl.load(base, mask=m_s, other=float("-inf")),
                                       tl.load(base + 1, mask=m_s, other=0.0), False)
        m, l = online_softmax_merge(m, l, t_m, t_l, False)
    tl.store(ws_ptr + final + i_row * 2, m, mask=active)
    tl.store(ws_ptr + final + i_row * 2 + 1, l, mask=active)
