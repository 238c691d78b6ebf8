"""Attention of proxy queries to keys, one tile of keys at a time, never materialized.

Proxy query rows are numbered r = g * W_PAD + w for query head g of the KV head's GQA
group and window row w (< the window actually used; the rest is padding). Rows are
processed QB at a time: a chunk holds QB / W_PAD whole query heads when the window is
short, or a part of one head when it is long (W_PAD > QB). QR = max(G * W_PAD, QB) rows in
all: a group whose rows fill less than one tl.dot tile (G * W_PAD < 16) is one chunk whose
rows past G * W_PAD are padding (masked, as rows w >= the window are).

Softmax statistics per row (max m and sum l of 2^(s - m), s = q.k * log2(e) / sqrt(D)) come
first, from ``proxy_stats_tile`` over all keys, merged by ``proxy_stats_merge`` into one
log2-sum-exp2 per row, lse = m + log2(l); ``proxy_attention_tile`` then forms the
probabilities of a tile, 2^(s - lse) (one subtraction and one exp2 per logit, no division),
reduces them over the window, pools per query head and reduces over the group.

With one query per head (``window=1``: TOVA) the statistics pass also stores its logits
(LOGITS: G float32 per token and KV head, at ``lg_ptr + g * NS + n``) and the score pass reads
them instead of the keys: one pass over K instead of two, for 4 G bytes per token written and
read again (16 for G = 4, against 256 for a bf16 key of 128).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .primitives import pool, pool_cols
from .stats import MERGE_TILE, online_softmax_merge, softmax_of_partials

REDUCE_CODES = {"mean": 0, "sum": 1, "max": 2}  # the REDUCE / GROUP_REDUCE constexprs


@triton.jit
def softmax_exp2(z):
    """The passes' one exponent per logit, 2^z (z <= 0), on the exponent unit (MUFU.EX2). Tried and
    measured slower on an H100 (docs/performance-log.md, "The proxy passes' exponentials"): half-precision
    ex2 (ptxas splits it, no fewer MUFU), one in 2 or 4 by a degree-5 polynomial on the FMA units
    (1.01-1.28x slower graph time). perf/exp_probe.sh times the passes with this returning z."""
    return tl.exp2(z)


@triton.jit
def _query_rows(q_ptr, s_qb, s_qh, s_qw, s_qd, i_b, i_h, W_total, w, c,
                D: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr, W_PAD: tl.constexpr, QB: tl.constexpr):
    """Rows c*QB .. c*QB+QB-1 of the group's proxy queries [QB, BLOCK_D] (padding rows 0)."""
    o_r = c * QB + tl.arange(0, QB)
    w_r = o_r % W_PAD
    m_r = (w_r < w) & (o_r < G * W_PAD)
    o_d = tl.arange(0, BLOCK_D)
    p_q = (q_ptr + i_b.to(tl.int64) * s_qb + (i_h * G + o_r // W_PAD).to(tl.int64)[:, None] * s_qh
           + (W_total - w + w_r).to(tl.int64)[:, None] * s_qw + o_d[None, :] * s_qd)
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)
    return b_q, o_r, w_r, m_r


@triton.jit
def _products(b_q, b_k, IEEE: tl.constexpr):
    """q . k, float32 [QB, BLOCK_N] (a logit is this times QK_SCALE = log2(e) / sqrt(D)); float32
    caches use full-precision products rather than TF32.

    IEEE is also set for bfloat16 in Triton's CPU interpreter, whose bfloat16 tl.dot returns
    garbage (Triton 3.6); the operands are then upcast, which is exact."""
    if IEEE:
        b_q = b_q.to(tl.float32)
        b_k = b_k.to(tl.float32)
        return tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
    else:
        return tl.dot(b_q, tl.trans(b_k))


@triton.jit
def _logits(b_q, b_k, QK_SCALE: tl.constexpr, IEEE: tl.constexpr):
    """q . k * QK_SCALE, float32 [QB, BLOCK_N] (the decode kernel's logits)."""
    return _products(b_q, b_k, IEEE) * QK_SCALE


@triton.jit
def _visible(w_r, o_n, m_val, N, w, CAUSAL: tl.constexpr):
    """The keys a query row sees: the tile's counted lanes, and with CAUSAL those at or before
    the row's own position N - w + w_r. Padding rows are not masked: their statistics are
    never read (proxy_chunk gives them lse = +inf)."""
    if CAUSAL:
        return m_val[None, :] & (o_n[None, :] <= (N - w + w_r)[:, None])
    else:
        return m_val[None, :]


@triton.jit
def proxy_chunk(q_ptr, s_qb, s_qh, s_qw, s_qd, stats_ptr, i_b, i_h, W_total, w, c,
                D: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr, W_PAD: tl.constexpr, QB: tl.constexpr,
                WITH_STATS: tl.constexpr):
    """Query rows of chunk c with their row index in the window, mask, and (if WITH_STATS)
    their log2-sum-exp2 lse = m + log2(l) from stats_ptr (this row's final lse [QR], written
    by proxy_stats_merge): a probability is then 2^(s - lse). A padding row gets +inf, so
    that its probabilities are 0 with no mask."""
    b_q, o_r, w_r, m_r = _query_rows(q_ptr, s_qb, s_qh, s_qw, s_qd, i_b, i_h, W_total, w, c, D, BLOCK_D, G, W_PAD, QB)
    if WITH_STATS:
        b_lse = tl.load(stats_ptr + o_r, mask=m_r, other=float("inf"))
    else:
        b_lse = tl.zeros([QB], dtype=tl.float32)
    return b_q, w_r, m_r, b_lse


@triton.jit
def proxy_stats_tile(run_m, run_l, b_k, b_q, w_r, N, w, o_n, m_val, lg_ptr, NS, store,
                     CAUSAL: tl.constexpr, QK_SCALE: tl.constexpr, IEEE: tl.constexpr, G: tl.constexpr,
                     QB: tl.constexpr, LOGITS: tl.constexpr, FULL: tl.constexpr):
    """Online softmax statistics of one chunk's query rows [QB] over this tile's visible keys;
    with LOGITS (one chunk whose row g is query head g) also the tile's logits of the G heads,
    where ``store`` (the tile's own tokens, m_val, once each). With FULL (a tile whose lanes all
    count, before any causal window's keys) no logit is masked.

    The row max is taken over the unscaled products (QK_SCALE > 0: the same key wins, and the
    scaled max rounds as before), so each exponent is one fused multiply-add, q.k * QK_SCALE - m."""
    x = _products(b_q, b_k, IEEE)
    if not FULL:   # FULL: every lane counts and every row sees every key (codegen.SPLIT_TILE_LOOP)
        x = tl.where(_visible(w_r, o_n, m_val, N, w, CAUSAL), x, float("-inf"))
    if LOGITS:
        o_r = tl.arange(0, QB)
        tl.store(lg_ptr + o_r.to(tl.int64)[:, None] * NS + o_n[None, :], x * QK_SCALE,
                 mask=(o_r < G)[:, None] & m_val[None, :] & store)
    t_m = tl.max(x, 1) * QK_SCALE
    t_safe = tl.where(t_m == float("-inf"), 0.0, t_m)
    t_l = tl.sum(softmax_exp2(x * QK_SCALE - t_safe[:, None]), 1)
    return online_softmax_merge(run_m, run_l, t_m, t_l, True)


@triton.jit
def proxy_stats_merge(ws_ptr, part, final, i_row, i_c, S, NCH, QB: tl.constexpr, QROWS: tl.constexpr):
    """final[row] = lse [QROWS], m + log2(l) of the row's softmax statistics merged from the
    partials of chunk i_c, read SB splits at a time (one split per step made a chain of S
    dependent loads: 12-14 us for 8 rows of 65 splits on an H100). The score passes read it once
    per row (TOVA's score_heads: per head and tile), with no logarithm of their own: computing
    m + log2(l) there was 60% of score_heads' instructions (H100, 73f367d)."""
    SB: tl.constexpr = max(1, MERGE_TILE // QB)
    o_q = tl.arange(0, QB)
    o_s = tl.arange(0, SB)
    m = tl.full([QB], float("-inf"), tl.float32)
    l = tl.zeros([QB], dtype=tl.float32)
    for s0 in range(0, S, SB):
        m_s = (s0 + o_s < S)[:, None]
        base = ws_ptr + part + ((i_row * NCH + i_c) * S + s0 + o_s)[:, None] * (2 * QB) + o_q[None, :]
        t_m, t_l = softmax_of_partials(tl.load(base, mask=m_s, other=float("-inf")),
                                       tl.load(base + QB, mask=m_s, other=0.0), True)
        m, l = online_softmax_merge(m, l, t_m, t_l, True)
    tl.store(ws_ptr + final + i_row * QROWS + i_c * QB + o_q, m + tl.log2(l))


@triton.jit
def _reduce(x, axis: tl.constexpr, HOW: tl.constexpr):
    if HOW == 2:
        return tl.max(x, axis)
    else:
        return tl.sum(x, axis)


@triton.jit
def _combine(a, b, HOW: tl.constexpr):
    if HOW == 2:
        return tl.maximum(a, b)
    else:
        return a + b


@triton.jit
def _logits_t(b_k, b_q, QK_SCALE: tl.constexpr, IEEE: tl.constexpr):
    """Transposed logits k . q * QK_SCALE, float32 [BLOCK_N, QB]: keys are rows, so reducing
    over query rows is a reduction along each row (as a softmax row max in FlashAttention),
    not across warps."""
    if IEEE:
        s = tl.dot(b_k.to(tl.float32), tl.trans(b_q.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(b_k, tl.trans(b_q))
    return s * QK_SCALE


@triton.jit
def _pool_end(N, w, EXCLUDE: tl.constexpr):
    """Where the pooling sees the sequence end: where the window starts with EXCLUDE."""
    if EXCLUDE:
        return N - w
    else:
        return N


@triton.constexpr_function
def _logit_rows(G):
    """Rows of a tile of kept logits: the G query heads' (one query each), padded to a power of two."""
    return 1 << (G - 1).bit_length()


@triton.constexpr_function
def _pools_each_head(POOL, POOL_MAX, GROUP_REDUCE):
    """Whether each query head is pooled before the group reduction: average pooling is linear
    and commutes with a group sum or mean (SnapKV: one pool of [BLOCK_N] per tile instead of
    one per query head), max pooling or a group max does not."""
    return POOL > 1 and (POOL_MAX or GROUP_REDUCE == 2)


@triton.jit
def _chunk_update(acc_grp, acc_win, c, s_t, w_r, b_lse, o_t, o_n, N, w,
                  BLOCK_N: tl.constexpr, G: tl.constexpr, W_PAD: tl.constexpr, QB: tl.constexpr,
                  CAUSAL: tl.constexpr, REDUCE: tl.constexpr, POOL: tl.constexpr, POOL_MAX: tl.constexpr,
                  GROUP_REDUCE: tl.constexpr, EXCLUDE: tl.constexpr):
    """Add chunk c's probabilities for this tile of keys (its logits ``s_t`` [BLOCK_N, QB]) to
    the window / group accumulators, each query head pooled first where the pooling does not
    commute with the group reduction (``_pools_each_head``); otherwise ``proxy_attention_tile``
    pools the group's sum once. With EXCLUDE the pooling sees the sequence as ending where the
    window starts (N - w)."""
    n_pool = _pool_end(N, w, EXCLUDE)
    EACH: tl.constexpr = _pools_each_head(POOL, POOL_MAX, GROUP_REDUCE)
    # No mask per logit where none is needed: a padding query row's lse is +inf (probability
    # 0), and a lane outside [0, N) holds a value in [0, 1] that no kept lane reads (the
    # pooling pads there and the score is stored under the tile's mask). Window row w_r sits
    # at position N - w + w_r; with EXCLUDE the keys it must not see (the window's own, at
    # N - w and later) score 0 and the pooling pads there too (SnapKV), so only H2O's and
    # other causal windows without EXCLUDE compare positions. A logit a row sees is at most
    # its max m <= lse (up to the rounding of the other pass's dot product): the clamp at 0
    # changes no such probability beyond that, and keeps the unmasked lanes finite. NaN (a NaN
    # query or key) stays NaN, as the reference's softmax gives it (the GPU's plain min would
    # return the 0).
    p = softmax_exp2(tl.minimum(s_t - b_lse[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL))
    if CAUSAL and not EXCLUDE:
        p = tl.where(o_n[:, None] <= (N - w + w_r)[None, :], p, 0.0)
    if W_PAD <= QB:   # whole query heads in this chunk
        HPC: tl.constexpr = QB // W_PAD
        win = _reduce(tl.reshape(p, [BLOCK_N, HPC, W_PAD]), 2, REDUCE)     # [BLOCK_N, HPC]
        if REDUCE == 0:
            win = win / w
        if EACH:
            win = pool_cols(win, o_t, o_n, n_pool, POOL, POOL_MAX, HPC, BLOCK_N)
        acc_grp = _combine(acc_grp, _reduce(win, 1, GROUP_REDUCE), GROUP_REDUCE)
    else:             # a part of one query head's window
        CPH: tl.constexpr = W_PAD // QB
        acc_win = _combine(acc_win, _reduce(p, 1, REDUCE), REDUCE)
        if c % CPH == CPH - 1:
            head = acc_win
            if REDUCE == 0:
                head = head / w
            if EACH:
                head = pool(head, o_t, o_n, n_pool, POOL, POOL_MAX, BLOCK_N)
            acc_grp = _combine(acc_grp, head, GROUP_REDUCE)
            acc_win = tl.zeros([BLOCK_N], dtype=tl.float32)
    return acc_grp, acc_win


@triton.jit
def proxy_attention_tile(b_k, b_q0, w_r0, b_lse0, q_ptr, s_qb, s_qh, s_qw, s_qd, stats_ptr, lg_ptr, NS,
                         i_b, i_h, N, W_total, w, o_t, o_n, m_n, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, G: tl.constexpr, W_PAD: tl.constexpr, QB: tl.constexpr,
                         QR: tl.constexpr, CAUSAL: tl.constexpr, REDUCE: tl.constexpr, POOL: tl.constexpr,
                         POOL_MAX: tl.constexpr,
                         GROUP_REDUCE: tl.constexpr, EXCLUDE: tl.constexpr, QK_SCALE: tl.constexpr,
                         IEEE: tl.constexpr, LOGITS: tl.constexpr, FINISH: tl.constexpr):
    """reference.proxy_attention for one tile of keys; with FINISH off, the group's sum before the
    pooling, the group mean's division and the window's exclusion, which kernels/pooling.py's pass
    then applies (an average pooling that commutes with the group reduction: codegen.deferred_pools).

    b_q0, w_r0, b_lse0 are chunk 0 (proxy_chunk; no row mask: a padding row's lse is +inf),
    loaded once per program: when all query rows fit one chunk (the common case: G * W_PAD <=
    QB) nothing is reloaded per tile. With LOGITS the G heads' logits come from the statistics
    pass (``lg_ptr``) in a tile of their rows alone, with their own statistics (the chunk-0
    arguments and ``b_k`` are not read)."""
    NCH: tl.constexpr = QR // QB
    acc_grp = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_win = tl.zeros([BLOCK_N], dtype=tl.float32)
    if LOGITS:
        # the kept logits of the G heads' one row each (W_PAD = 1): no tl.dot here, so no 16-row
        # tile either; TOVA's 4 heads computed 16 rows' exponentials per token, 12 of them padding
        QL: tl.constexpr = _logit_rows(G)
        o_r = tl.arange(0, QL)
        m_r = o_r < G
        s_t = tl.load(lg_ptr + o_r.to(tl.int64)[None, :] * NS + o_n[:, None], mask=m_n[:, None] & m_r[None, :],
                      other=0.0)
        lse_l = tl.load(stats_ptr + o_r, mask=m_r, other=float("inf"))
        acc_grp, acc_win = _chunk_update(acc_grp, acc_win, 0, s_t, o_r * 0, lse_l, o_t, o_n, N, w,
                                         BLOCK_N, G, 1, QL, CAUSAL, REDUCE, POOL, POOL_MAX, GROUP_REDUCE, EXCLUDE)
    else:
        acc_grp, acc_win = _chunk_update(acc_grp, acc_win, 0, _logits_t(b_k, b_q0, QK_SCALE, IEEE), w_r0, b_lse0,
                                         o_t, o_n, N, w, BLOCK_N, G, W_PAD, QB, CAUSAL, REDUCE, POOL, POOL_MAX,
                                         GROUP_REDUCE, EXCLUDE)
    # chunks of 64 KB in bf16 reloaded per tile: pipelined 3 deep they overflow sm_90's shared memory
    CHUNK_STAGES: tl.constexpr = 1 if QB * BLOCK_D >= 32768 else None
    for c in tl.range(1, NCH, num_stages=CHUNK_STAGES):
        b_q, w_r, _, b_lse = proxy_chunk(q_ptr, s_qb, s_qh, s_qw, s_qd, stats_ptr, i_b, i_h, W_total, w, c,
                                         D, BLOCK_D, G, W_PAD, QB, True)
        acc_grp, acc_win = _chunk_update(acc_grp, acc_win, c, _logits_t(b_k, b_q, QK_SCALE, IEEE), w_r, b_lse,
                                         o_t, o_n, N, w, BLOCK_N, G, W_PAD, QB, CAUSAL, REDUCE, POOL,
                                         POOL_MAX, GROUP_REDUCE, EXCLUDE)
    if FINISH:
        if POOL > 1 and not _pools_each_head(POOL, POOL_MAX, GROUP_REDUCE):
            acc_grp = pool(acc_grp, o_t, o_n, _pool_end(N, w, EXCLUDE), POOL, POOL_MAX, BLOCK_N)
        acc_grp = group_finish(acc_grp, o_n, N, w, G, GROUP_REDUCE == 0, EXCLUDE)
    return acc_grp


@triton.jit
def group_finish(acc, o_n, N, w, G: tl.constexpr, GROUP_MEAN: tl.constexpr, EXCLUDE: tl.constexpr):
    """The last steps of a proxy attention's score, after its pooling (here or in kernels/pooling.py):
    the group mean's division, the window's own keys set to 0 (exclude_window)."""
    if GROUP_MEAN:
        acc = acc / G
    if EXCLUDE:
        acc = tl.where(o_n < N - w, acc, 0.0)
    return acc
