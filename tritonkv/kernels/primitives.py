"""Per-tile building blocks that generated scoring kernels call.

A tile is BLOCK_N consecutive token lanes of one (batch, KV head) row: lane ``o_t`` holds
token ``o_n``. Lanes outside [0, N) are padding. Every helper computes in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-12)   # as reference.NORM_EPS


@triton.jit
def token_rows(bt_ptr, i_b, o_n, m_n, PAGE: tl.constexpr):
    """Where each lane's token lives, as (outer, inner) int64 indices that the caller scales by
    its (outer, inner) strides: (batch, position) in a dense cache (PAGE = 0), (page, slot)
    in a paged one, the page read from ``bt_ptr`` (one sequence's block table)."""
    if PAGE == 0:
        return o_n.to(tl.int64) * 0 + i_b.to(tl.int64), o_n.to(tl.int64)
    else:
        page = tl.load(bt_ptr + o_n // PAGE, mask=m_n, other=0)
        return page.to(tl.int64), (o_n % PAGE).to(tl.int64)


@triton.jit
def uniform(seed, o_n, i_b, i_h, STREAM: tl.constexpr):
    """Uniform [0, 1) float32 per lane: Philox counter (token, batch, head, stream), key seed.
    The same numbers as tritonkv.philox.uniform."""
    c0 = o_n.to(tl.uint32)
    zero = c0 * 0
    x, _, _, _ = tl.philox(seed, c0, zero + i_b.to(tl.uint32), zero + i_h.to(tl.uint32), zero + STREAM)
    return tl.uint_to_uniform_float(x)


@triton.jit
def gumbel(seed, o_n, i_b, i_h, STREAM: tl.constexpr):
    """Standard Gumbel noise -log(-log(u)); u = 0 gives -inf."""
    u = uniform(seed, o_n, i_b, i_h, STREAM)
    return -tl.log(-tl.log(u))


@triton.jit
def shifted(x, o_t, o_n, N, J: tl.constexpr, BLOCK_N: tl.constexpr, PAD: tl.constexpr):
    """x at lane + J (the token J places later); PAD where that token is outside [0, N).
    Lanes whose neighbour falls outside the tile get garbage: they lie in the halo."""
    idx = tl.minimum(tl.maximum(o_t + J, 0), BLOCK_N - 1)
    y = tl.gather(x, idx, 0)
    ok = (o_n + J >= 0) & (o_n + J < N)
    return tl.where(ok, y, PAD)


@triton.jit
def shifted_cols(x, o_t, o_n, N, J: tl.constexpr, COLS: tl.constexpr, BLOCK_N: tl.constexpr,
                 PAD: tl.constexpr):
    """``shifted`` for each column of x [BLOCK_N, COLS] (tokens along rows)."""
    idx = tl.minimum(tl.maximum(o_t + J, 0), BLOCK_N - 1)
    y = tl.gather(x, tl.broadcast_to(idx[:, None], [BLOCK_N, COLS]), 0)
    ok = (o_n + J >= 0) & (o_n + J < N)
    return tl.where(ok[:, None], y, PAD)


@triton.jit
def pool(x, o_t, o_n, N, KERNEL: tl.constexpr, IS_MAX: tl.constexpr, BLOCK_N: tl.constexpr):
    """Centred 1-D pooling over tokens, as reference.pool1d: avg pads with 0 and divides
    by KERNEL; max pads with -inf."""
    HALF: tl.constexpr = KERNEL // 2
    if IS_MAX:
        acc = shifted(x, o_t, o_n, N, -HALF, BLOCK_N, float("-inf"))
        for j in tl.static_range(1 - HALF, HALF + 1):
            acc = tl.maximum(acc, shifted(x, o_t, o_n, N, j, BLOCK_N, float("-inf")))
    else:
        acc = shifted(x, o_t, o_n, N, -HALF, BLOCK_N, 0.0)
        for j in tl.static_range(1 - HALF, HALF + 1):
            acc = acc + shifted(x, o_t, o_n, N, j, BLOCK_N, 0.0)
        acc = acc / KERNEL
    return acc


@triton.jit
def pool_cols(x, o_t, o_n, N, KERNEL: tl.constexpr, IS_MAX: tl.constexpr, COLS: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """``pool`` for each column of x [BLOCK_N, COLS]."""
    HALF: tl.constexpr = KERNEL // 2
    if IS_MAX:
        acc = shifted_cols(x, o_t, o_n, N, -HALF, COLS, BLOCK_N, float("-inf"))
        for j in tl.static_range(1 - HALF, HALF + 1):
            acc = tl.maximum(acc, shifted_cols(x, o_t, o_n, N, j, COLS, BLOCK_N, float("-inf")))
    else:
        acc = shifted_cols(x, o_t, o_n, N, -HALF, COLS, BLOCK_N, 0.0)
        for j in tl.static_range(1 - HALF, HALF + 1):
            acc = acc + shifted_cols(x, o_t, o_n, N, j, COLS, BLOCK_N, 0.0)
        acc = acc / KERNEL
    return acc


@triton.jit
def row_norm(b):
    """L2 norm of each row of a float32 block [BLOCK_N, BLOCK_D]."""
    return tl.sqrt(tl.sum(b * b, 1))


@triton.jit
def cosine_to(b_kf, b_knorm, b_unit_anchor):
    """normalize(k) . a for each key row, a already unit length (reference.anchor_similarity)."""
    return tl.sum(b_kf * b_unit_anchor[None, :], 1) / tl.maximum(b_knorm, NORM_EPS)


@triton.jit
def position(o_n, N):
    """i / N, rounded as PyTorch's float32 division."""
    return tl.math.div_rn(o_n.to(tl.float32), N.to(tl.float32))


@triton.jit
def standardize(x, mean, std):
    """(x - mean) / std, 0 where std <= 1e-6 * |mean| (equal to float32 precision) or NaN,
    as reference.normalize."""
    return tl.where(std > 1e-6 * tl.abs(mean), (x - mean) / std, 0.0)


@triton.jit
def softmax_apply(x, temperature, row_max, row_sum):
    """exp(x / t - max) / sum, with the max and sum of exp of x / t over the row."""
    return tl.exp(x / temperature - row_max) / row_sum
