"""Threshold select, order-preserving compaction and row gather, in one kernel.

A row is one (batch, KV head). Its tokens are kept by, in order: the forced windows
(tokens < n_sink and >= N - n_recent), then each selective clause j, which keeps the
``count_j`` highest priorities among the tokens not kept yet (ties to the lower index).
Priorities are float32 ``[n_slots, rows, N]``, written by the scoring kernel.

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
before its chunk; it then writes indices and gathers K and V rows in token order.

P programs share a row, each owning a contiguous chunk of it. They meet at row barriers
(an atomic counter per row), so all programs of the grid must be resident at once: the
launcher keeps the grid within one program per multiprocessor. With P = 1 (the Triton
interpreter, or many rows) the barriers return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting, multiprocessor_count

RADIX_BITS = 8
N_DIGITS = 4
N_BINS = 1 << RADIX_BITS
MAX_CLAUSES = 4
SCAN_BLOCK = 1024   # tokens per step of the passes over priorities
GATHER_BLOCK = 32   # rows per step of the K / V gather
BARRIERS_PER_CLAUSE = N_DIGITS + 1


@triton.jit
def orderable_key(x):
    """float32 -> uint32 in the same order; NaN counts as -inf and -0.0 as +0.0."""
    x = tl.where(x == 0.0, 0.0, x)
    x = tl.where(x != x, float("-inf"), x)
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def row_barrier(counter_ptr, target):
    """Wait until ``target`` arrivals at this row's counter (grid.sync's pattern per row)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _pick(j: tl.constexpr, a0, a1, a2, a3):
    if j == 0:
        return a0
    elif j == 1:
        return a1
    elif j == 2:
        return a2
    else:
        return a3


@triton.jit
def _clause_key(prio_ptr, slot, i_row, rows, N, o_n, m_n):
    p = tl.load(prio_ptr + (slot * rows + i_row).to(tl.int64) * N + o_n, mask=m_n, other=0.0)
    return orderable_key(p)


@triton.jit
def _kept_before(j: tl.constexpr, prio_ptr, state_ptr, i_row, rows, N, o_n, m_n, n_sink, n_recent,
                 slot0, slot1, slot2, slot3):
    """Tokens kept by the forced windows and by clauses 0 .. j-1 (only valid lanes)."""
    kept = (o_n < n_sink) | (o_n >= N - n_recent)
    for i in tl.static_range(j):
        key = _clause_key(prio_ptr, _pick(i, slot0, slot1, slot2, slot3), i_row, rows, N, o_n, m_n)
        t = tl.load(state_ptr + 3 * i).to(tl.uint32, bitcast=True)
        cut = tl.load(state_ptr + 3 * i + 1)
        kept = kept | (key > t) | ((key == t) & (o_n <= cut))
    return kept & m_n


@triton.jit(do_not_specialize=["N", "n_kept", "n_sink", "n_recent", "chunk",
                               "count0", "count1", "count2", "count3"])
def _select_gather_kernel(
    prio_ptr, k_ptr, v_ptr, out_k_ptr, out_v_ptr, out_i_ptr,
    hist_ptr, bar_ptr, cnt_ptr, state_ptr,
    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    N, H, rows, n_kept, n_sink, n_recent, chunk,
    slot0, slot1, slot2, slot3, count0, count1, count2, count3,
    D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, P: tl.constexpr, P_PAD: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_row = tl.program_id(1)
    lo = i_p * chunk
    hi = tl.minimum(lo + chunk, N)
    o_blk = tl.arange(0, BLOCK)
    o_bin = tl.arange(0, 256)
    o_p = tl.arange(0, P_PAD)
    m_p = o_p < P
    my_state = state_ptr + (i_row * P + i_p) * (3 * C)
    bar = bar_ptr + i_row

    for j in tl.static_range(C):
        slot = _pick(j, slot0, slot1, slot2, slot3)
        remaining = _pick(j, count0, count1, count2, count3) + 0
        prefix = tl.full([], 0, tl.uint32)
        p_hist = hist_ptr + ((i_row * C + j) * 4) * 256
        # ---- radix select: four digits of 8 bits, most significant first
        for digit in tl.static_range(4):
            shift = 24 - 8 * digit
            local = tl.zeros([256], dtype=tl.int32)
            for start in range(0, chunk, BLOCK):
                o_n = lo + start + o_blk
                m_n = o_n < hi
                cand = m_n & ~_kept_before(j, prio_ptr, my_state, i_row, rows, N, o_n, m_n, n_sink, n_recent,
                                           slot0, slot1, slot2, slot3)
                key = _clause_key(prio_ptr, slot, i_row, rows, N, o_n, m_n)
                if digit > 0:
                    cand = cand & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                local += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=cand)
            tl.atomic_add(p_hist + digit * 256 + o_bin, local, mask=local > 0, sem="relaxed", scope="gpu")
            row_barrier(bar, P * (j * 5 + digit + 1))
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
            m_n = o_n < hi
            cand = m_n & ~_kept_before(j, prio_ptr, my_state, i_row, rows, N, o_n, m_n, n_sink, n_recent,
                                       slot0, slot1, slot2, slot3)
            key = _clause_key(prio_ptr, slot, i_row, rows, N, o_n, m_n)
            n_eq += tl.sum((cand & (key == prefix)).to(tl.int32), 0)
            n_gt += tl.sum((cand & (key > prefix)).to(tl.int32), 0)
        p_cnt = cnt_ptr + (i_row * C + j) * 2 * P_PAD
        tl.store(p_cnt + i_p, n_eq)
        tl.store(p_cnt + P_PAD + i_p, n_gt)
        row_barrier(bar, P * (j * 5 + 5))
        eq_all = tl.load(p_cnt + o_p, mask=m_p, other=0, cache_modifier=".cg")
        need = remaining - tl.sum(tl.where(o_p < i_p, eq_all, 0), 0)   # ties still to keep, from my chunk on
        cut = tl.where(need >= n_eq, N, -1)
        if (need > 0) & (need < n_eq):
            seen = tl.full([], 0, tl.int32)
            for start in range(0, chunk, BLOCK):
                o_n = lo + start + o_blk
                m_n = o_n < hi
                cand = m_n & ~_kept_before(j, prio_ptr, my_state, i_row, rows, N, o_n, m_n, n_sink, n_recent,
                                           slot0, slot1, slot2, slot3)
                key = _clause_key(prio_ptr, slot, i_row, rows, N, o_n, m_n)
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
        p_cnt = cnt_ptr + (i_row * C + j) * 2 * P_PAD
        eq_all = tl.load(p_cnt + o_p, mask=m_p, other=0, cache_modifier=".cg")
        gt_all = tl.load(p_cnt + P_PAD + o_p, mask=m_p, other=0, cache_modifier=".cg")
        r_j = tl.load(my_state + 3 * j + 2)
        ties_before = tl.cumsum(eq_all, 0) - eq_all
        kept_per_chunk += gt_all + tl.minimum(tl.maximum(r_j - ties_before, 0), eq_all)
    offset = tl.sum(tl.where(m_p & (o_p < i_p), kept_per_chunk, 0), 0)

    # ---- gather the kept rows, in token order
    o_t = tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    i_b = i_row // H
    i_h = i_row % H
    p_k_row = k_ptr + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    p_v_row = v_ptr + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    out_row = i_row.to(tl.int64) * n_kept
    for start in range(0, chunk, BLOCK_T):
        o_n = lo + start + o_t
        m_n = o_n < hi
        kept = _kept_before(C, prio_ptr, my_state, i_row, rows, N, o_n, m_n, n_sink, n_recent,
                            slot0, slot1, slot2, slot3)
        dst = out_row + offset + tl.cumsum(kept.to(tl.int32), 0) - 1
        tl.store(out_i_ptr + dst, o_n.to(tl.int64), mask=kept)
        b_k = tl.load(p_k_row + o_n[:, None].to(tl.int64) * s_kn + o_d[None, :] * s_kd,
                      mask=kept[:, None] & (o_d[None, :] < D))
        tl.store(out_k_ptr + dst[:, None] * D + o_d[None, :], b_k, mask=kept[:, None] & (o_d[None, :] < D))
        b_v = tl.load(p_v_row + o_n[:, None].to(tl.int64) * s_vn + o_dv[None, :] * s_vd,
                      mask=kept[:, None] & (o_dv[None, :] < DV))
        tl.store(out_v_ptr + dst[:, None] * DV + o_dv[None, :], b_v, mask=kept[:, None] & (o_dv[None, :] < DV))
        offset += tl.sum(kept.to(tl.int32), 0)


def programs_per_row(rows: int, n: int, device: torch.device) -> int:
    """How many programs share a row: enough to fill the GPU, never more than can be
    resident at once (the row barriers need that), one in the interpreter."""
    if interpreting() or device.type != "cuda":
        return 1
    sms = multiprocessor_count(device)
    return max(1, min(sms // rows, triton.cdiv(n, SCAN_BLOCK)))


def select_gather_launch(priorities: torch.Tensor, slots, counts, n_sink: int, n_recent: int,
                         keys: torch.Tensor, values: torch.Tensor, n_kept: int):
    """(grid, args, constexprs, outputs) of one select_gather call; see select_gather."""
    b, h, n, d = keys.shape
    dv = values.shape[-1]
    rows = b * h
    clauses = len(slots)
    if clauses > MAX_CLAUSES:
        raise ValueError(f"policy: at most {MAX_CLAUSES} selective clauses are supported, got {clauses}")
    device = keys.device
    out_k = torch.empty(b, h, n_kept, d, dtype=keys.dtype, device=device)
    out_v = torch.empty(b, h, n_kept, dv, dtype=values.dtype, device=device)
    out_i = torch.empty(b, h, n_kept, dtype=torch.int64, device=device)
    p = programs_per_row(rows, n, device)
    p_pad = triton.next_power_of_2(p)
    chunk = triton.cdiv(triton.cdiv(n, p), SCAN_BLOCK) * SCAN_BLOCK
    c = max(clauses, 1)
    zeroed = torch.zeros(rows * c * N_DIGITS * N_BINS + rows, dtype=torch.int32, device=device)
    hist, bar = zeroed[: rows * c * N_DIGITS * N_BINS], zeroed[rows * c * N_DIGITS * N_BINS:]
    cnt = torch.empty(rows * c * 2 * p_pad, dtype=torch.int32, device=device)
    state = torch.empty(rows * p * 3 * c, dtype=torch.int32, device=device)
    slot_args = list(slots) + [0] * (MAX_CLAUSES - clauses)
    count_args = list(counts) + [0] * (MAX_CLAUSES - clauses)
    prio = priorities if priorities.numel() else torch.empty(1, dtype=torch.float32, device=device)
    args = [prio, keys, values, out_k, out_v, out_i, hist, bar, cnt, state,
            *keys.stride(), *values.stride(), n, h, rows, n_kept, n_sink, n_recent, chunk,
            *slot_args, *count_args]
    constexprs = dict(D=d, DV=dv, C=clauses, P=p, P_PAD=p_pad, BLOCK=SCAN_BLOCK, BLOCK_T=GATHER_BLOCK,
                      BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv))
    return (p, rows), args, constexprs, (out_k, out_v, out_i)


SELECT_WARPS = 4


def select_gather(priorities: torch.Tensor, slots, counts, n_sink: int, n_recent: int,
                  keys: torch.Tensor, values: torch.Tensor, n_kept: int):
    """Keep, per row, the forced windows and each clause's top ``counts[j]`` of
    ``priorities[slots[j]]``; return kept keys, values and indices in token order.

    priorities: float32 [n_slots, B * H, N] contiguous; keys / values [B, H, N, D] any strides.
    """
    grid, args, constexprs, outputs = select_gather_launch(priorities, slots, counts, n_sink, n_recent,
                                                           keys, values, n_kept)
    if n_kept > 0:
        _select_gather_kernel[grid](*args, **constexprs, num_warps=SELECT_WARPS)
    return outputs
