"""Threshold select and order-preserving compaction of the kept token indices.

A row is one (batch, KV head). Its tokens are kept by, in order: the forced windows
(tokens < n_sink and >= N - n_recent), then each selective clause j, which keeps the
``count_j`` highest priorities among the tokens not kept yet (ties to the lower index).
The slots are float32 ``[n_slots, rows, N]``, written by the scoring kernel; clause j's
priority is computed from its slot as it is loaded (kernels/keys.py: a sample clause's
noise is drawn there, not stored).

How one clause is selected, exactly and without a sort:
  1. priorities become uint32 keys whose unsigned order is the float order (NaN = -inf,
     -0.0 = +0.0); tokens that are not candidates are left out of every count;
  2. radix select, four 8-bit digits from the top: a 256-bin histogram of the current digit
     over the keys that match the digits found so far locates the digit of the count-th
     largest key. After four digits that key is the threshold t, and r says how many of
     the keys equal to t are kept;
  3. the keys equal to t are kept in token order: each program counts its ties, and the
     program where the r-th tie falls finds its index (the "cut").
Compaction: every program counts what it keeps, so each knows how many kept tokens come
before its chunk; it then writes the kept indices in token order. kernels/gather.py copies
the K and V rows they name.

P programs share a row, each owning a contiguous chunk of it. They meet at row barriers
(an atomic counter per row), so all programs of the grid must be resident at once: the
launcher keeps the grid within what the GPU holds at once (programs_per_row). With P = 1 (the Triton
interpreter, or many rows) the barriers return at once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .common import cdiv, env_flag, interpreting, next_power_of_2, record_occupancy, resident_programs
from .keys import MAX_CLAUSES, clause_keys, clause_priority, clause_views, key_args
from .launch import launch
from .sequences import allocation_of, sequence_of

RADIX_BITS = 8
N_DIGITS = 4
N_BINS = 1 << RADIX_BITS
SCAN_BLOCK = 1024        # tokens per step of the passes over a long row's priorities,
SHORT_SCAN_BLOCK = 512   # and over a row of at most SHORT_ROW tokens: its smaller tiles leave room
SHORT_ROW = 32768        # for more resident programs, so short rows get twice the programs (on an
                         # H200, 64 rows of 1,639 / 13,108 tokens: 84 -> 68 / 302 -> 277 us per evict)
SPARSE_BINS = 64         # see _select_kernel's SPARSE_BINS
MAX_PROGRAMS_PER_ROW = 256   # P_PAD of the kernel
# what a clause whose keys are stored (CACHED) leaves in its slot for a token that is no candidate;
# a candidate's key is at least orderable_key(-inf) = 0x007FFFFF
STORED_KEPT: tl.constexpr = tl.constexpr(0)   # kept by the forced windows or an earlier clause
STORED_OUT: tl.constexpr = tl.constexpr(1)    # skipped, or past the row's end
SELECT_WARPS = 4


@triton.jit
def orderable_key(x):
    """float32 -> uint32 in the same order; NaN counts as -inf and -0.0 as +0.0."""
    x = tl.where(x == 0.0, 0.0, x)
    x = tl.where(x != x, float("-inf"), x)
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def zero_fill(ptr, numel, pid, n_programs):
    """Program ``pid`` of ``n_programs`` zeroes its share of ``numel`` int32 at ``ptr``: how the
    score kernel clears select's histograms and barriers before select runs (no memset launch)."""
    o = tl.arange(0, 1024)
    for start in range(pid * 1024, numel, n_programs * 1024):
        tl.store(ptr + start + o, 0, mask=start + o < numel)


@triton.jit
def row_barrier(counter_ptr, target):
    """Wait until ``target`` arrivals at this row's counter (grid.sync's pattern per row)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _clause_key(j: tl.constexpr, prio_ptr, views, seed, i_row, rows, at, o_n, m_n,
                SAMPLED: tl.constexpr, NORMED: tl.constexpr, STREAM_BASE: tl.constexpr):
    """``at`` = (row stride of the slots, batch row and head of the noise): see clause_priority."""
    return orderable_key(clause_priority(j, prio_ptr, views, seed, i_row, rows, at[0], at[1], at[2], o_n, m_n,
                                         SAMPLED, NORMED, STREAM_BASE))


@triton.jit
def _skipped(skip_ptr, i_row, NS, o_n, m_n, HAS_SKIP: tl.constexpr):
    """Tokens marked in the uint8 skip mask [rows, N] (AdaKV's second stage: the tokens its
    first stage kept); none without one."""
    if HAS_SKIP:
        return tl.load(skip_ptr + i_row.to(tl.int64) * NS + o_n, mask=m_n, other=0) != 0
    else:
        return o_n < 0


@triton.jit
def _kept_before(j: tl.constexpr, prio_ptr, state_ptr, i_row, rows, N, o_n, m_n, n_sink, n_recent,
                 views, seed, at, skip_ptr, HAS_SKIP: tl.constexpr, SAMPLED: tl.constexpr, NORMED: tl.constexpr,
                 STREAM_BASE: tl.constexpr):
    """Tokens kept by the forced windows and by clauses 0 .. j-1 (only valid lanes); a
    skipped token is never kept by a clause."""
    picked = o_n < 0
    for i in tl.static_range(j):
        key = _clause_key(i, prio_ptr, views, seed, i_row, rows, at, o_n, m_n, SAMPLED, NORMED, STREAM_BASE)
        picked = picked | _picked_by(i, key, state_ptr, o_n)
    if HAS_SKIP:
        if j > 0:   # with no clause before, nothing is picked: no mask to load
            picked = picked & ~_skipped(skip_ptr, i_row, at[0], o_n, m_n, HAS_SKIP)
    kept = (o_n < n_sink) | (o_n >= N - n_recent) | picked
    return kept & m_n


@triton.jit
def _picked_by(i: tl.constexpr, key, state_ptr, o_n):
    """Tokens kept by clause i (resolved): keys above its threshold, and its ties up to its cut."""
    t = tl.load(state_ptr + 3 * i).to(tl.uint32, bitcast=True)
    cut = tl.load(state_ptr + 3 * i + 1)
    return (key > t) | ((key == t) & (o_n <= cut))


@triton.jit
def _stored_keys(prio_ptr, views, j: tl.constexpr, rows, i_row, NS):
    """Clause j's slot row, read as the uint32 keys that a CACHE = 1 pass stores there."""
    slot = views[j][0]
    return (prio_ptr + (slot * rows + i_row).to(tl.int64) * NS).to(tl.pointer_type(tl.uint32))


@triton.jit
def _load_stored(prio_ptr, views, j: tl.constexpr, rows, i_row, NS, o_n, m_n):
    """What a CACHE = 1 pass stored for tokens o_n (STORED_OUT past the row's end)."""
    return tl.load(_stored_keys(prio_ptr, views, j, rows, i_row, NS) + o_n, mask=m_n, other=STORED_OUT)


@triton.jit
def _candidates(j: tl.constexpr, o_n, hi, prio_ptr, state_ptr, i_row, rows, N, n_sink, n_recent,
                views, seed, at, skip_ptr, HAS_SKIP: tl.constexpr, SAMPLED: tl.constexpr, NORMED: tl.constexpr,
                STREAM_BASE: tl.constexpr, CACHE: tl.constexpr = 0):
    """(candidate mask, key) of clause j for the tokens o_n: in range, not kept by the forced
    windows or an earlier clause, not skipped. CACHE = 0 computes them; 1 also stores them in
    clause j's slot, one uint32 per token: a candidate's key (>= 0x007FFFFF, orderable_key's
    smallest), else STORED_KEPT for a token kept already, STORED_OUT for one never kept (skipped);
    2 reads what 1 stored (one load, not every clause's priority and noise again)."""
    m_n = o_n < hi
    if CACHE == 2:
        stored = _load_stored(prio_ptr, views, j, rows, i_row, at[0], o_n, m_n)
        return m_n & (stored > STORED_OUT), stored
    kept = _kept_before(j, prio_ptr, state_ptr, i_row, rows, N, o_n, m_n, n_sink, n_recent,
                        views, seed, at, skip_ptr, HAS_SKIP, SAMPLED, NORMED, STREAM_BASE)
    cand = m_n & ~kept
    if HAS_SKIP:
        cand = cand & ~_skipped(skip_ptr, i_row, at[0], o_n, m_n, HAS_SKIP)
    key = _clause_key(j, prio_ptr, views, seed, i_row, rows, at, o_n, m_n, SAMPLED, NORMED, STREAM_BASE)
    if CACHE == 1:
        stored = tl.where(cand, key, tl.where(kept, STORED_KEPT, STORED_OUT).to(tl.uint32))
        tl.store(_stored_keys(prio_ptr, views, j, rows, i_row, at[0]) + o_n, stored, mask=m_n)
    return cand, key


@triton.jit
def _count_digit(local, cand, key, digit: tl.constexpr, prefix, p_hist, SPARSE_BINS: tl.constexpr):
    """``local`` plus the histogram of digit ``digit`` of the block's candidates whose higher
    digits match ``prefix``; after the first digit, a block with at most SPARSE_BINS such keys
    adds them to the row's histogram at ``p_hist`` by an atomic each instead."""
    shift: tl.constexpr = 24 - 8 * digit
    bins = ((key >> shift) & 0xFF).to(tl.int32)
    if digit > 0:
        cand = cand & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
    if (digit == 0) | (SPARSE_BINS == 0):
        local += tl.histogram(bins, 256, mask=cand)
    else:
        if tl.sum(cand.to(tl.int32), 0) > SPARSE_BINS:
            local += tl.histogram(bins, 256, mask=cand)
        else:   # a few keys still match: an atomic each, no 256-bin histogram
            tl.atomic_add(p_hist + digit * 256 + bins, 1, mask=cand, sem="relaxed", scope="gpu")
    return local


@triton.jit
def _key_at(j: tl.constexpr, o_n, m_n, prio_ptr, views, seed, i_row, rows, at, SAMPLED: tl.constexpr,
            NORMED: tl.constexpr, STREAM_BASE: tl.constexpr, CACHED: tl.constexpr):
    """Clause j's key of the candidates o_n (where m_n): what its CACHED pass stored, else computed."""
    if j == CACHED:
        return _load_stored(prio_ptr, views, j, rows, i_row, at[0], o_n, m_n)
    return _clause_key(j, prio_ptr, views, seed, i_row, rows, at, o_n, m_n, SAMPLED, NORMED, STREAM_BASE)


@triton.jit
def _row_tile(src_ptr, s_b, s_h, s_n, s_d, i_b, i_h, o_n, kept, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """(pointers, mask) of src[i_b, i_h, o_n] for the lanes in ``kept``: a [rows, BLOCK_D] tile."""
    o_d = tl.arange(0, BLOCK_D)
    m = kept[:, None] & (o_d[None, :] < D)
    p_src = src_ptr + i_b.to(tl.int64) * s_b + i_h.to(tl.int64) * s_h + o_n.to(tl.int64)[:, None] * s_n \
        + o_d[None, :] * s_d
    return p_src, m


@triton.jit
def _copy_rows(src_ptr, s_b, s_h, s_n, s_d, dst_ptr, i_b, i_h, o_n, dst, kept,
               D: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst_ptr[dst] = src[i_b, i_h, o_n] for the lanes in ``kept`` (rows of D contiguous outputs)."""
    p_src, m = _row_tile(src_ptr, s_b, s_h, s_n, s_d, i_b, i_h, o_n, kept, D, BLOCK_D)
    tl.store(dst_ptr + dst[:, None] * D + tl.arange(0, BLOCK_D)[None, :], tl.load(p_src, mask=m), mask=m)


@triton.jit
def _copy_kv_rows(k_ptr, s_kb, s_kh, s_kn, s_kd, v_ptr, s_vb, s_vh, s_vn, s_vd, out_k_ptr, out_v_ptr, g_row, n_out,
                  H, n_kept, idx, slot, m, D: tl.constexpr, BLOCK_D: tl.constexpr, DV: tl.constexpr,
                  BLOCK_DV: tl.constexpr, PAIRED: tl.constexpr):
    """The K and V rows of tokens ``idx`` into output slots ``slot`` of rows g_row .. g_row + n_out - 1
    (every head of a shared selection, or the one row), for the lanes in ``m``. PAIRED: a row's K
    and V tiles are both loaded before either is stored (two loads in flight: the compiler keeps a
    load after a store it cannot prove apart), else K's copy, then V's."""
    for h in range(0, n_out):
        row = g_row + h
        out_dst = row.to(tl.int64) * n_kept + slot
        if PAIRED:
            p_k, m_k = _row_tile(k_ptr, s_kb, s_kh, s_kn, s_kd, row // H, row % H, idx, m, D, BLOCK_D)
            p_v, m_v = _row_tile(v_ptr, s_vb, s_vh, s_vn, s_vd, row // H, row % H, idx, m, DV, BLOCK_DV)
            k_tile = tl.load(p_k, mask=m_k)
            v_tile = tl.load(p_v, mask=m_v)
            tl.store(out_k_ptr + out_dst[:, None] * D + tl.arange(0, BLOCK_D)[None, :], k_tile, mask=m_k)
            tl.store(out_v_ptr + out_dst[:, None] * DV + tl.arange(0, BLOCK_DV)[None, :], v_tile, mask=m_v)
        else:
            _copy_rows(k_ptr, s_kb, s_kh, s_kn, s_kd, out_k_ptr, row // H, row % H, idx, out_dst, m, D, BLOCK_D)
            _copy_rows(v_ptr, s_vb, s_vh, s_vn, s_vd, out_v_ptr, row // H, row % H, idx, out_dst, m, DV, BLOCK_DV)


@triton.jit(do_not_specialize=["N", "n_kept", "n_sink", "n_recent", "chunk", "P", "seed", "mom_S",
                               "drop_one", "count0", "count1", "count2", "count3", "mom0", "mom1", "mom2", "mom3"])
def _select_kernel(
    prio_ptr, out_i_ptr, hist_ptr, bar_ptr, cnt_ptr, state_ptr, skip_ptr, ws_ptr, sq_ptr,
    k_ptr, v_ptr, out_k_ptr, out_v_ptr, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, H,
    N, rows, n_kept, n_sink, n_recent, chunk, P, seed, mom_S, drop_one,
    count0, count1, count2, count3,
    slot0, slot1, slot2, slot3, inv_t0, inv_t1, inv_t2, inv_t3, mom0, mom1, mom2, mom3,
    C: tl.constexpr, P_PAD: tl.constexpr, BLOCK: tl.constexpr,
    GATHER: tl.constexpr, GATHER_T: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_SKIP: tl.constexpr,
    SAMPLED: tl.constexpr, NORMED: tl.constexpr, STREAM_BASE: tl.constexpr, PER_SEQ: tl.constexpr,
    SHARED: tl.constexpr, SPREAD_WINDOWS: tl.constexpr, CACHED: tl.constexpr, SPARSE_BINS: tl.constexpr,
    MARK: tl.constexpr, PAIRED: tl.constexpr,
):
    """Program (i_p, i_row): the P programs of row i_row select together; with GATHER the
    program also copies the K / V rows of the tokens it keeps (no separate gather launch).
    Clause j ranks kernels/keys.py's priority of its slot (``ws_ptr``: moment partials, ``seed``:
    the Gumbel noise of sample clauses). With PER_SEQ row i_row is head i_row % H of sequence
    i_row // H of the sequence table ``sq_ptr`` (kernels/sequences.py), whose length and counts
    replace the scalars (N is then the slots' row stride, ``chunk`` one for the longest); its
    indices go to row (index, head) of ``out_i`` and its noise is batch row 0's, as on its
    dense copy. With SHARED, the H heads of a batch row rank the same priorities (every clause
    a head-reduced top, kernels/transform.py): program row i_row is batch row i_row, it ranks
    head 0's slots (row ``i_src``) once and writes the indices (and gathers the rows) of all H
    heads. With ``drop_one`` (nonzero: every row keeps all its tokens but one, which the last
    clause drops) the last clause finds its lowest key in one pass instead of four digits.
    With GATHER and SPREAD_WINDOWS the rows of the forced windows (sink and recent) are copied
    in equal shares by the row's P programs, not by the programs whose chunks hold them: H2O's
    recency half is half of a row's kept rows, all in its last chunk. CACHED (the last clause, or
    -1): that clause's first pass stores its candidates' keys in its slot (kernels/select.py
    _candidates), and its later passes and the compaction read them: its priorities, the noise
    of a sample clause and the earlier clauses' keys are computed once, not in every pass.
    SPARSE_BINS: in the digit passes after the first, a block of keys of which at most this many
    still match the digits found so far counts them by an atomic add each instead of a 256-bin
    histogram (ballots over every lane of the block): after the first digit most blocks hold few.
    MARK: instead of writing indices, the compaction sets the kept tokens' bytes of the uint8 mask
    ``skip_ptr`` [rows, N] to 1 (AdaKV's stages, tritonkv/adaptive.py: the first stage's kept
    tokens are the second's skip mask, and both stages' are what kernels/pack.py packs)."""
    i_p = tl.program_id(0)
    i_row = tl.program_id(1)     # the row of select's workspace
    i_src = i_row                # the row of the slots ranked
    if SHARED:
        i_src = i_row * H
    i_out = i_row
    at = (N, i_src // H, i_src % H)
    if PER_SEQ:
        i_seq, N, _, _, _ = sequence_of(sq_ptr, i_row // H)
        n_sink, n_recent, count0, count1, count2, count3 = allocation_of(sq_ptr, i_row // H)
        i_out = i_seq * H + i_row % H
        at = (at[0], i_seq * 0, i_row % H)
    lo = i_p * chunk
    hi = tl.minimum(lo + chunk, N)
    o_blk = tl.arange(0, BLOCK)
    o_bin = tl.arange(0, 256)
    o_p = tl.arange(0, P_PAD)
    m_p = o_p < P
    my_state = state_ptr + (i_row * P + i_p) * (3 * C)
    bar = bar_ptr + i_row
    views = clause_views(ws_ptr, mom_S, i_src, slot0, slot1, slot2, slot3, inv_t0, inv_t1, inv_t2, inv_t3,
                         mom0, mom1, mom2, mom3, C, NORMED)
    counts = (count0, count1, count2, count3)
    passed = tl.full([], 0, tl.int32)                 # row barriers passed (the same in every program)

    for j in tl.static_range(C):
        remaining = counts[j] + 0
        prefix = tl.full([], 0, tl.uint32)
        p_hist = hist_ptr + ((i_row * C + j) * 4) * 256
        p_cnt = cnt_ptr + (i_row * C + j) * 2 * P
        lowest = (drop_one != 0) & (j == C - 1)   # the same in every program of the grid
        if lowest:
            # ---- the one token dropped: the lowest key (its ties below resolve which one). The
            # row's max of ~key (>= 0, so the zeroed cell starts below every value) is ~ its min
            low = tl.full([], 0xFFFFFFFF, tl.uint32)
            for start in range(0, chunk, BLOCK):
                o_n = lo + start + o_blk
                cand, key = _candidates(j, o_n, hi, prio_ptr, my_state, i_src, rows, N, n_sink, n_recent,
                                        views, seed, at, skip_ptr, HAS_SKIP, SAMPLED, NORMED, STREAM_BASE,
                                        (j == CACHED) * 1)   # a stored clause's first pass stores its keys
                low = tl.minimum(low, tl.min(tl.where(cand, key, 0xFFFFFFFF), 0))
            p_low = p_hist.to(tl.pointer_type(tl.uint32))
            tl.atomic_max(p_low, low ^ 0xFFFFFFFF, sem="relaxed", scope="gpu")
            passed += 1
            row_barrier(bar, P * passed)
            prefix = tl.load(p_low, cache_modifier=".cg") ^ 0xFFFFFFFF
        else:
            # ---- radix select: four digits of 8 bits, most significant first
            for digit in tl.static_range(4):
                shift = 24 - 8 * digit
                local = tl.zeros([256], dtype=tl.int32)
                for start in range(0, chunk, BLOCK):
                    o_n = lo + start + o_blk
                    cand, key = _candidates(j, o_n, hi, prio_ptr, my_state, i_src, rows, N, n_sink, n_recent,
                                            views, seed, at, skip_ptr, HAS_SKIP, SAMPLED, NORMED, STREAM_BASE,
                                            (j == CACHED) * (1 + (digit > 0)))   # stored, then read
                    local = _count_digit(local, cand, key, digit, prefix, p_hist, SPARSE_BINS)
                tl.atomic_add(p_hist + digit * 256 + o_bin, local, mask=local > 0, sem="relaxed", scope="gpu")
                passed += 1
                row_barrier(bar, P * passed)
                hist = tl.load(p_hist + digit * 256 + o_bin, cache_modifier=".cg")
                suffix = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist      # keys with this digit or above
                b_star = tl.max(tl.where(suffix >= remaining, o_bin, -1), 0)
                above = tl.sum(tl.where(o_bin == b_star, suffix - hist, 0), 0)
                prefix = prefix | (b_star.to(tl.uint32) << shift)
                remaining = remaining - above
        # ---- ties: count mine and the keys above the threshold, then find my cut
        n_eq = tl.full([], 0, tl.int32)
        n_gt = tl.full([], 0, tl.int32)
        for start in range(0, chunk, BLOCK):
            o_n = lo + start + o_blk
            cand, key = _candidates(j, o_n, hi, prio_ptr, my_state, i_src, rows, N, n_sink, n_recent,
                                    views, seed, at, skip_ptr, HAS_SKIP, SAMPLED, NORMED, STREAM_BASE,
                                    (j == CACHED) * 2)
            n_eq += tl.sum((cand & (key == prefix)).to(tl.int32), 0)
            n_gt += tl.sum((cand & (key > prefix)).to(tl.int32), 0)
        tl.store(p_cnt + i_p, n_eq)
        tl.store(p_cnt + P + i_p, n_gt)
        passed += 1
        row_barrier(bar, P * passed)   # a lowest clause's second barrier
        eq_all = tl.load(p_cnt + o_p, mask=m_p, other=0, cache_modifier=".cg")
        if lowest:   # the ties kept: all but one of the keys equal to the lowest
            remaining = counts[j] - tl.sum(tl.load(p_cnt + P + o_p, mask=m_p, other=0, cache_modifier=".cg"), 0)
        need = remaining - tl.sum(tl.where(o_p < i_p, eq_all, 0), 0)   # ties still to keep, from my chunk on
        cut = tl.where(need >= n_eq, N, -1)
        if (need > 0) & (need < n_eq):
            seen = tl.full([], 0, tl.int32)
            for start in range(0, chunk, BLOCK):
                o_n = lo + start + o_blk
                cand, key = _candidates(j, o_n, hi, prio_ptr, my_state, i_src, rows, N, n_sink, n_recent,
                                        views, seed, at, skip_ptr, HAS_SKIP, SAMPLED, NORMED, STREAM_BASE,
                                        (j == CACHED) * 2)
                eq = (cand & (key == prefix)).to(tl.int32)
                rank = seen + tl.cumsum(eq, 0)
                cut = tl.maximum(cut, tl.max(tl.where((eq > 0) & (rank == need), o_n, -1), 0))
                seen += tl.sum(eq, 0)
        tl.store(my_state + 3 * j, prefix.to(tl.int32, bitcast=True))
        tl.store(my_state + 3 * j + 1, cut)
        tl.store(my_state + 3 * j + 2, remaining)
        tl.debug_barrier()

    # ---- compaction: kept tokens in the chunks before mine
    c_lo = o_p * chunk
    c_hi = tl.minimum(c_lo + chunk, N)
    kept_per_chunk = tl.maximum(tl.minimum(c_hi, n_sink) - c_lo, 0) \
        + tl.maximum(c_hi - tl.maximum(c_lo, N - n_recent), 0)
    for j in tl.static_range(C):
        p_cnt = cnt_ptr + (i_row * C + j) * 2 * P
        eq_all = tl.load(p_cnt + o_p, mask=m_p, other=0, cache_modifier=".cg")
        gt_all = tl.load(p_cnt + P + o_p, mask=m_p, other=0, cache_modifier=".cg")
        r_j = tl.load(my_state + 3 * j + 2)
        ties_before = tl.cumsum(eq_all, 0) - eq_all
        kept_per_chunk += gt_all + tl.minimum(tl.maximum(r_j - ties_before, 0), eq_all)
    offset = tl.sum(tl.where(m_p & (o_p < i_p), kept_per_chunk, 0), 0)

    # ---- write the kept indices, in token order (SHARED: into each head's row); with GATHER,
    # then the rows they name (of every head)
    g_row = i_row                # the first (batch, head) row gathered
    n_out = 1                    # rows written
    if SHARED:
        i_out = i_src
        g_row = i_src
        n_out = H
    out_row = out_i_ptr + i_out.to(tl.int64) * n_kept
    o_g = tl.arange(0, GATHER_T)
    for start in range(0, chunk, BLOCK):
        o_n = lo + start + o_blk
        m_n = o_n < hi
        if CACHED >= 0:   # kept already before the stored clause, or by it
            stored = _load_stored(prio_ptr, views, CACHED, rows, i_src, at[0], o_n, m_n)
            kept = m_n & ((stored == STORED_KEPT)
                          | ((stored > STORED_OUT) & _picked_by(CACHED, stored, my_state, o_n)))
        else:
            kept = _kept_before(C, prio_ptr, my_state, i_src, rows, N, o_n, m_n, n_sink, n_recent,
                                views, seed, at, skip_ptr, HAS_SKIP, SAMPLED, NORMED, STREAM_BASE)
        dst = offset + tl.cumsum(kept.to(tl.int32), 0) - 1
        if MARK:   # a skip mask is read above, for these tokens only, before this store
            tl.store(skip_ptr + i_row.to(tl.int64) * at[0] + o_n, kept.to(tl.uint8), mask=kept)
        else:
            for h in range(0, n_out):
                tl.store(out_row + h * n_kept + dst, o_n.to(tl.int64), mask=kept)
        n_here = tl.sum(kept.to(tl.int32), 0)
        if GATHER:
            # the block's kept rows, densely: read back the indices just written (a barrier
            # makes every thread's stores visible to the whole program). Kept in token order,
            # the block's sink tokens come first and its recent ones last: with SPREAD_WINDOWS
            # only the selected ones between them are copied here
            first, last = offset, offset + n_here
            if SPREAD_WINDOWS:
                first += tl.sum((kept & (o_n < n_sink)).to(tl.int32), 0)
                last -= tl.sum((kept & (o_n >= N - n_recent)).to(tl.int32), 0)
            tl.debug_barrier()
            for r in range(first - offset, last - offset, GATHER_T):
                o_j = offset + r + o_g
                m_j = o_j < last
                idx = tl.load(out_row + o_j, mask=m_j, other=0)
                _copy_kv_rows(k_ptr, s_kb, s_kh, s_kn, s_kd, v_ptr, s_vb, s_vh, s_vn, s_vd, out_k_ptr, out_v_ptr,
                              g_row, n_out, H, n_kept, idx, o_j, m_j, D, BLOCK_D, DV, BLOCK_DV, PAIRED)
        offset += n_here
    if GATHER and SPREAD_WINDOWS:
        # the windows' rows, this program's share: window token t < n_sink is token t, kept
        # first; the others are the recent tokens, kept last (the row keeps ``total``)
        total = tl.sum(tl.where(m_p, kept_per_chunk, 0), 0)
        n_win = n_sink + n_recent
        share = tl.cdiv(n_win, P)
        w_lo = i_p * share
        w_hi = tl.minimum(w_lo + share, n_win)
        for r in range(w_lo, w_hi, GATHER_T):
            t = r + o_g
            m_t = t < w_hi
            in_sink = t < n_sink
            idx = tl.where(in_sink, t, N - n_recent + (t - n_sink))
            slot = tl.where(in_sink, t, total - n_recent + (t - n_sink))
            _copy_kv_rows(k_ptr, s_kb, s_kh, s_kn, s_kd, v_ptr, s_vb, s_vh, s_vn, s_vd, out_k_ptr, out_v_ptr,
                          g_row, n_out, H, n_kept, idx, slot, m_t, D, BLOCK_D, DV, BLOCK_DV, PAIRED)


SELECT_SEED_ARG = _select_kernel.arg_names.index("seed")   # where select_launch passes the seed


def spread_windows() -> bool:
    """Whether a gathering select copies the forced windows' rows in equal shares over a row's
    programs (``TRITONKV_SPREAD_WINDOWS=0``: by the programs whose chunks hold them, for A/B
    timing)."""
    return os.environ.get("TRITONKV_SPREAD_WINDOWS") != "0"


def drop_one_enabled() -> bool:
    """Whether a select that drops one token per row finds it in one pass (``TRITONKV_DROP_ONE=0``:
    the radix select of every clause, for A/B timing)."""
    return os.environ.get("TRITONKV_DROP_ONE") != "0"


def cached_clause(keys, own_slots: bool) -> int:
    """The clause whose keys select stores in its slot after its first pass, or -1 for none:
    the last clause, where finding its candidates again costs more than a load (a sample
    clause's noise or a normalized clause's moments; the earlier clauses' keys), and only in
    slots that are the call's own scratch (``own_slots``), which nothing reads after select.
    ``TRITONKV_CACHE_KEYS=0``: none (A/B timing)."""
    keys = clause_keys(keys)
    if not own_slots or not keys or os.environ.get("TRITONKV_CACHE_KEYS") == "0":
        return -1
    last = keys[-1]
    return len(keys) - 1 if len(keys) > 1 or last.sampled or last.normalized else -1


def select_warps() -> int:
    """``num_warps`` of select: SELECT_WARPS, or ``TRITONKV_SELECT_WARPS`` (4 or 8; off until
    timed): twice the threads per program share its blocks' keys and its copy's tiles, so
    fewer registers per thread and twice the warps per SM for the same programs."""
    value = os.environ.get("TRITONKV_SELECT_WARPS", str(SELECT_WARPS))
    if value not in ("4", "8"):
        raise ValueError(f"TRITONKV_SELECT_WARPS: expected 4 or 8, got {value!r}")
    return int(value)


def paired_copy() -> bool:
    """Whether a gathering select loads a row's K and V tiles before storing either (two loads
    in flight per copy step; ``TRITONKV_COPY_PAIRED=0``: K's copy, then V's): 0.91-1.0x the graph
    time of the copy one tensor at a time (H100, KeyDiff, KNorm, TOVA fused, 128K-512K, B 1 / 4)."""
    return env_flag("TRITONKV_COPY_PAIRED", True)


def copy_rows(d: int, dv: int) -> int:
    """Kept rows a gathering select copies per step: a [rows, head dim] tile within 8K elements
    (as kernels/gather.py), 16 to 64; ``TRITONKV_SELECT_COPY_ROWS`` (a power of two, 16 to 64;
    off until timed) sets fewer, whose smaller tile frees registers for more programs per SM."""
    rows = max(16, min(64, 8192 // next_power_of_2(max(d, dv, 1))))
    override = os.environ.get("TRITONKV_SELECT_COPY_ROWS")
    if override:
        if override not in ("16", "32", "64"):
            raise ValueError(f"TRITONKV_SELECT_COPY_ROWS: expected 16, 32 or 64 rows, got {override!r}")
        rows = min(rows, int(override))
    return rows


def sparse_bins() -> int:
    """Matching keys per block up to which a digit pass counts by atomics (kernels' SPARSE_BINS);
    ``TRITONKV_SPARSE_BINS`` overrides (0: every block by histogram, for A/B timing)."""
    return int(os.environ.get("TRITONKV_SPARSE_BINS", SPARSE_BINS))


def scan_block(n: int) -> int:
    """Tokens per step of select's passes over rows of ``n`` tokens (and the unit of its chunks);
    ``TRITONKV_SELECT_BLOCK`` overrides it (tuning)."""
    override = os.environ.get("TRITONKV_SELECT_BLOCK")
    if override:
        return int(override)
    return SHORT_SCAN_BLOCK if n <= SHORT_ROW else SCAN_BLOCK


def chunk_unit(n: int) -> int:
    """Tokens that a program's chunk of a row of ``n`` is a multiple of: the scan block, or
    ``TRITONKV_SELECT_CHUNK`` (a multiple of 16; off until timed). A finer unit lets the
    programs that fit be used where rounding chunks to whole blocks leaves some out (TOVA at
    B = 4, 128K: 99 fit, 64 run with chunks of 2,048) and gives a short row more programs than
    blocks (a chunk's last block is then partly masked)."""
    override = os.environ.get("TRITONKV_SELECT_CHUNK")
    if not override:
        return scan_block(n)
    if not override.isdigit() or int(override) % 16 or int(override) == 0:
        raise ValueError(f"TRITONKV_SELECT_CHUNK: expected a positive multiple of 16 tokens, got {override!r}")
    return int(override)


def programs_per_row(rows: int, n: int, device: torch.device, resident: int) -> int:
    """How many programs share a row: enough to fill the GPU, no more than can be resident
    at once (``resident`` programs of the grid; the row barriers need that), one in the
    interpreter."""
    if interpreting() or device.type != "cuda":
        return 1
    return max(1, min(resident // rows, cdiv(n, chunk_unit(n)), MAX_PROGRAMS_PER_ROW))


def workspace_sizes(rows: int, programs: int, clauses: int):
    """int32 elements of select's workspace: histograms, barrier
    counters (these two first: they must start at zero), per-program tie counts, per-program
    clause states."""
    c = max(clauses, 1)
    return [rows * c * N_DIGITS * N_BINS, rows, rows * c * 2 * programs, rows * programs * 3 * c]


def zeroed_numel(rows: int, clauses: int) -> int:
    """How many int32 at the start of the workspace must be zero when select starts."""
    return sum(workspace_sizes(rows, 1, clauses)[:2])


def chunking(n: int, programs: int):
    """(tokens per program, programs) for ``programs`` requested per row."""
    unit = chunk_unit(n)
    chunk = cdiv(cdiv(n, programs), unit) * unit
    return chunk, cdiv(n, chunk)


def select_programs(rows: int, n: int, keys, device: torch.device, d: int = 0, dv: int = 0,
                    skip: bool = False, per_seq: bool = False, shared: bool = False, own_slots: bool = False,
                    mark: bool = False) -> int:
    """Programs per row that select_launch will use on ``device`` (occupancy learnt so far);
    keys: the clauses (kernels/keys.py ClauseKeys, or slot indices); d, dv: head dims of a
    fused gather, 0 for none; ``rows``: the rows selected (batch rows when ``shared``)."""
    resident = resident_programs(_select_kernel, device, select_warps(),
                                 _constexprs(clause_keys(keys), n, d, dv, skip, per_seq, shared, own_slots, mark))
    return chunking(n, programs_per_row(rows, n, device, resident))[1]


def _constexprs(keys, n: int, d: int = 0, dv: int = 0, skip: bool = False, per_seq: bool = False,
                shared: bool = False, own_slots: bool = False, mark: bool = False):
    """The kernel's constexprs for rows of ``n`` tokens; d > 0 fuses the gather of K / V rows (head dims d, dv); skip:
    a uint8 mask of tokens that are not candidates; per_seq: rows read a sequence table; shared: the heads of a
    batch row share one selection; own_slots: see cached_clause; mark: set the kept tokens in a uint8 mask."""
    # rows copied per step: a [GATHER_T, BLOCK_D] tile within 8K elements (as kernels/gather.py)
    gather_t = copy_rows(d, dv)
    return dict(C=len(keys), P_PAD=MAX_PROGRAMS_PER_ROW, BLOCK=scan_block(n), GATHER=d > 0, GATHER_T=gather_t,
                D=d, DV=dv, BLOCK_D=next_power_of_2(max(d, 1)), BLOCK_DV=next_power_of_2(max(dv, 1)),
                HAS_SKIP=skip, PER_SEQ=per_seq, SHARED=shared, SPREAD_WINDOWS=spread_windows(),
                CACHED=cached_clause(keys, own_slots), SPARSE_BINS=sparse_bins(), MARK=mark,
                PAIRED=paired_copy() and d > 0,
                **key_args(keys, [0] * len(keys))[1])


def select_launch(priorities: torch.Tensor, keys, counts, n_sink: int, n_recent: int, rows: int, n: int,
                  n_kept: int, device: torch.device, programs: int = 1, workspace=None, out_i=None,
                  gather=None, skip=None, heads: int = 1, seed: int = 0, moments=None, sequences=None,
                  shared: bool = False, own_slots: bool = False, mark=None):
    """(grid, args, constexprs, indices) of one select call; see select_indices. ``workspace``
    (int32, ``sum(workspace_sizes(...))`` elements, the first ``zeroed_numel`` of them zero) and
    ``out_i`` (int64 [rows, n_kept]) are allocated here when not given. ``gather = (keys,
    values, out_keys, out_values)`` also copies the kept rows ([B, H, N, D] in, contiguous
    [B, H, n_kept, D] out). ``skip``: uint8 [rows, N], nonzero where a token is no candidate.
    ``heads`` (KV heads per batch row), ``seed`` and ``moments = (float32 workspace, offset of
    each clause's moment partials, partials per row)`` are what sampled / normalized clause
    keys read (kernels/keys.py). ``sequences``: a batched paged call's sequence table
    (kernels/sequences.py), whose rows replace ``n``, ``counts``, ``n_sink`` and ``n_recent``
    (``n``: the longest sequence; ``out_i`` rows of ``n_kept``, one per (sequence index, head)).
    ``shared``: every clause ranks a head-reduced priority (the same in each of the ``heads``
    rows of a batch row), so one program row per batch row ranks it and writes every head's
    indices (``programs``: per batch row). ``own_slots``: ``priorities`` is the call's own scratch,
    read by nothing after select, which may then store a clause's keys in it (cached_clause).
    ``mark``: a uint8 [rows, N] mask (``skip`` itself, if given) in which the kept tokens are set to 1
    instead of writing their indices (``out_i`` is then the mask, and no gather is allowed)."""
    if shared and (skip is not None or sequences is not None or rows % heads):
        raise ValueError("shared: one selection per batch row takes dense rows of whole batch rows, "
                         "without a skip mask or a sequence table")
    if mark is not None and (shared or sequences is not None or gather is not None or out_i is not None
                             or (skip is not None and skip is not mark)):
        raise ValueError("mark: a dense per-row selection's mask, the skip mask itself if it has one, "
                         "without indices or a gather")
    keys = clause_keys(keys)
    clauses = len(keys)
    if clauses > MAX_CLAUSES:
        raise ValueError(f"policy: at most {MAX_CLAUSES} selective clauses are supported, got {clauses}")
    if out_i is None:
        out_i = mark if mark is not None else torch.empty(rows, n_kept, dtype=torch.int64, device=device)
    chunk, p = chunking(n, programs)
    sizes = workspace_sizes(rows, p, clauses)
    if workspace is None:
        workspace = torch.zeros(sum(sizes), dtype=torch.int32, device=device)
    hist, bar, cnt, state = workspace[:sum(sizes)].split(sizes)
    count_args = list(counts) + [0] * (MAX_CLAUSES - clauses)
    prio = priorities if priorities.numel() else torch.empty(1, dtype=torch.float32, device=device)
    stats, offsets, splits = (prio, [0] * clauses, 1) if moments is None else moments
    key_values, key_constexprs = key_args(keys, offsets)
    if gather is None:
        copy_args, d, dv = [prio] * 4 + [0] * 8 + [heads], 0, 0
    else:
        k, v, out_k, out_v = gather
        copy_args = [k, v, out_k, out_v, *k.stride(), *v.stride(), k.shape[1]]
        d, dv = k.shape[-1], v.shape[-1]
    # every row drops one token, and by the last clause (the windows and the clauses fill n_kept;
    # rows of a sequence table or with a skip mask take the general path)
    drop_one = int(clauses > 0 and n_kept == n - 1 and n_sink + n_recent + sum(counts) == n_kept
                   and skip is None and sequences is None and drop_one_enabled())
    mask = skip if mark is None else mark
    args = [prio, out_i, hist, bar, cnt, state, prio if mask is None else mask, stats,
            prio if sequences is None else sequences, *copy_args, n, rows, n_kept,
            n_sink, n_recent, chunk, p, seed, splits, drop_one, *count_args, *key_values]
    constexprs = _constexprs(keys, n, d, dv, skip is not None, sequences is not None, shared, own_slots,
                             mark is not None)
    return (p, rows // heads if shared else rows), args, constexprs, out_i


def select_indices(priorities: torch.Tensor, keys, counts, n_sink: int, n_recent: int, rows: int, n: int,
                   n_kept: int, device: torch.device, skip=None, heads: int = 1, seed: int = 0,
                   moments=None, shared: bool = False, own_slots: bool = False) -> torch.Tensor:
    """Per row, the ascending indices [rows, n_kept] of the tokens kept by the forced windows
    and by each clause's top ``counts[j]`` of its priority: ``priorities[keys[j]]`` (float32
    [n_slots, rows, N]) for a slot index, kernels/keys.py's priority for a ClauseKey; never a
    token marked in ``skip`` (uint8 [rows, N]) by a clause. ``shared``: the ``heads`` rows of a
    batch row rank the same priorities, selected once (see select_launch). ``own_slots``: select
    may overwrite ``priorities`` (cached_clause)."""
    p = select_programs(rows // heads if shared else rows, n, keys, device, skip=skip is not None, shared=shared,
                        own_slots=own_slots)
    grid, args, constexprs, out_i = select_launch(priorities, keys, counts, n_sink, n_recent, rows, n,
                                                  n_kept, device, p, skip=skip, heads=heads, seed=seed,
                                                  moments=moments, shared=shared, own_slots=own_slots)
    if n_kept > 0:
        launch_select(grid, args, constexprs, device)
    return out_i


def launch_select(grid, args, constexprs, device: torch.device):
    warps = select_warps()
    compiled = launch(_select_kernel, grid, args, constexprs, warps)
    if device.type == "cuda":
        record_occupancy(_select_kernel, compiled, warps, constexprs)
