"""Compact kept rows in place: ``x[b, h, j] = x[b, h, indices[b, h, j]]`` for j < n_kept, for
K and V at once, moving only the rows whose index changes.

What a fixed-capacity cache needs after a selection: the kept rows at the front of each row
of slots, in token order, without a second buffer (a gather into scratch plus a copy back
moves every kept row twice; this moves each displaced row once, and rows before the first
dropped one not at all).

Why it is safe in place: indices ascend and ``indices[j] >= j``, so row j is written only
after (or by the same program as) every read of row j. Program (i_p, i_row) owns the
destination rows ``[lo, hi)`` of its row and walks them in tiles, ascending; each tile's loads
complete before its stores (a barrier), and a later tile reads only rows past every earlier
tile's destinations. Only sources at or past ``hi`` belong to another program's destinations:
there are at most ``N - n_kept`` of them per program (the dropped rows before ``hi``), and a
first launch copies them to a small stash before the second launch moves anything. Two
launches, no grid-wide barrier.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, interpreting, multiprocessor_count, next_power_of_2
from .launch import launch
from ..reference import gather_rows

COMPACT_ROWS = 64     # destination rows per tile
COMPACT_WARPS = 4


@triton.jit
def _rows(ptr, s_b, s_h, s_n, i_b, i_h, o_n):
    return ptr + i_b.to(tl.int64) * s_b + i_h.to(tl.int64) * s_h + o_n.to(tl.int64)[:, None] * s_n


@triton.jit(do_not_specialize=["N", "n_kept", "chunk", "P", "n_stash"])
def _compact_kernel(idx_ptr, k_ptr, v_ptr, st_k_ptr, st_v_ptr,
                    s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, H, N, n_kept, chunk, P, n_stash,
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, STASH: tl.constexpr):
    """STASH: copy the sources at or past this program's ``hi`` into its stash slots (they are
    the last ``n_stash`` or fewer of its destinations); otherwise move the program's rows."""
    i_p = tl.program_id(0)
    i_row = tl.program_id(1)
    i_b = i_row // H
    i_h = i_row % H
    lo = i_p * chunk
    hi = tl.minimum(lo + chunk, n_kept)
    o_t = tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    p_idx = idx_ptr + i_row.to(tl.int64) * n_kept
    stash = (i_row * P + i_p).to(tl.int64) * n_stash   # this program's first stash slot
    if STASH:
        # destinations j in [hi - n_stash, hi) whose source is >= hi go to stash slot j - (hi - n_stash)
        for start in range(0, n_stash, BLOCK_T):
            o_j = hi - n_stash + start + o_t
            m_j = (o_j >= lo) & (o_j < hi) & (start + o_t < n_stash)
            src = tl.load(p_idx + o_j, mask=m_j, other=0)
            m_j = m_j & (src >= hi)
            m_k = m_j[:, None] & (o_d[None, :] < D)
            m_v = m_j[:, None] & (o_dv[None, :] < DV)
            slot = (stash + start + o_t)[:, None]
            tl.store(st_k_ptr + slot * D + o_d[None, :],
                     tl.load(_rows(k_ptr, s_kb, s_kh, s_kn, i_b, i_h, src) + o_d[None, :] * s_kd, mask=m_k), mask=m_k)
            tl.store(st_v_ptr + slot * DV + o_dv[None, :],
                     tl.load(_rows(v_ptr, s_vb, s_vh, s_vn, i_b, i_h, src) + o_dv[None, :] * s_vd, mask=m_v),
                     mask=m_v)
    else:
        for start in range(0, chunk, BLOCK_T):
            o_j = lo + start + o_t
            m_j = o_j < hi
            src = tl.load(p_idx + o_j, mask=m_j, other=0)
            moves = m_j & (src != o_j)
            if tl.sum(moves.to(tl.int32), 0) > 0:   # rows before the first dropped one stay
                stashed = moves & (src >= hi)
                own = moves & (src < hi)
                slot = (stash + o_j - (hi - n_stash))[:, None]
                m_k = (o_d[None, :] < D)
                m_v = (o_dv[None, :] < DV)
                b_k = tl.load(_rows(k_ptr, s_kb, s_kh, s_kn, i_b, i_h, src) + o_d[None, :] * s_kd,
                              mask=own[:, None] & m_k)
                b_k = tl.where(stashed[:, None], tl.load(st_k_ptr + slot * D + o_d[None, :],
                                                         mask=stashed[:, None] & m_k), b_k)
                b_v = tl.load(_rows(v_ptr, s_vb, s_vh, s_vn, i_b, i_h, src) + o_dv[None, :] * s_vd,
                              mask=own[:, None] & m_v)
                b_v = tl.where(stashed[:, None], tl.load(st_v_ptr + slot * DV + o_dv[None, :],
                                                         mask=stashed[:, None] & m_v), b_v)
                tl.debug_barrier()   # every read of the tile before any of its writes
                tl.store(_rows(k_ptr, s_kb, s_kh, s_kn, i_b, i_h, o_j) + o_d[None, :] * s_kd, b_k,
                         mask=moves[:, None] & m_k)
                tl.store(_rows(v_ptr, s_vb, s_vh, s_vn, i_b, i_h, o_j) + o_dv[None, :] * s_vd, b_v,
                         mask=moves[:, None] & m_v)
                tl.debug_barrier()   # and its writes before the next tile's reads


def compact_programs(rows: int, n_kept: int, device: torch.device) -> int:
    """Programs per row: 16 per multiprocessor over all rows (the moves are a chain of short
    tiles per program, latency-bound: on an H200, 64 rows of 13,107 kept rows take 95.8 us with
    4 per multiprocessor, 84.8 us with 16, perf/compact_probe.py); 3 on the CPU (so the stash
    between programs is always exercised)."""
    tiles = cdiv(max(n_kept, 1), COMPACT_ROWS)
    if interpreting() or device.type != "cuda":
        return min(tiles, 3)
    return max(1, min(tiles, cdiv(16 * multiprocessor_count(device), rows)))


def compact_launches(indices: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, programs: int = 0):
    """The two launches ``(fn, grid, args, constexprs, num_warps)`` of compact_in_place and its
    stash (allocated here); ``programs`` per row, 0 for compact_programs' choice."""
    b, h, n, d = keys.shape
    dv = values.shape[-1]
    n_kept = indices.shape[-1]
    p = programs or compact_programs(b * h, n_kept, keys.device)
    chunk = cdiv(cdiv(max(n_kept, 1), p), COMPACT_ROWS) * COMPACT_ROWS
    p = cdiv(max(n_kept, 1), chunk)
    n_stash = max(1, min(n - n_kept, chunk))   # sources past hi: the rows dropped before hi, at most
    st_k = torch.empty(b * h * p * n_stash, d, dtype=keys.dtype, device=keys.device)
    st_v = torch.empty(b * h * p * n_stash, dv, dtype=values.dtype, device=values.device)
    args = [indices, keys, values, st_k, st_v, *keys.stride(), *values.stride(), h, n, n_kept, chunk, p, n_stash]
    block_t = max(16, min(COMPACT_ROWS, 8192 // next_power_of_2(max(d, dv))))
    common = dict(D=d, DV=dv, BLOCK_T=block_t, BLOCK_D=next_power_of_2(d), BLOCK_DV=next_power_of_2(dv))
    return [(_compact_kernel, (p, b * h), args, dict(common, STASH=stash), COMPACT_WARPS) for stash in (True, False)]


def compact_in_place(indices: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, programs: int = 0) -> None:
    """``keys[b, h, :n_kept] = keys[b, h, indices[b, h]]`` and the same for ``values``, in place.

    indices: int64 [B, H, n_kept], ascending per row (what evict returns); keys / values
    [B, H, N, D] / [..., D_v], any strides with unit-stride rows. Rows from n_kept on are left
    as they were or hold moved-out rows. ``programs``: programs per row (0: chosen here). CPU
    tensors outside Triton's interpreter take the PyTorch reference (a gather, then a copy)."""
    if indices.shape[-1] == 0:
        return
    if not (keys.is_cuda or interpreting()):
        n_kept = indices.shape[-1]
        for x in (keys, values):
            x[:, :, :n_kept] = gather_rows(x, indices)
        return
    for fn, grid, args, constexprs, warps in compact_launches(indices, keys, values, programs):
        launch(fn, grid, args, constexprs, warps)
