"""Fill the evicted slots of a fixed buffer with the kept rows past the budget, in place:
after ``x[b, h, :n_kept]`` holds a kept set again, without keeping the rows in token order.

What an evicting buffer needs when its policy ranks tokens by their own scores alone
(``dsl.order_free``): a buffer of ``n_kept + interval`` slots evicts back to ``n_kept`` by
moving only the kept rows at or past ``n_kept`` (at most ``interval`` per row) into the
slots below ``n_kept`` that were dropped. Compaction in token order (kernels/compact.py)
shifts every row after the first dropped one: at one token dropped per step that is half
the buffer on average, all of it when the oldest token goes.

Which row goes where (``reference.hole_sources``): the r-th dropped slot below ``n_kept``
takes the r-th kept slot at or past it, both ascending. From the ascending kept indices
``idx`` alone: the kept slots past ``n_kept`` are ``idx[first:]``, found by a binary search;
slot ``idx[t]`` has ``idx[t] - t`` holes before it, which never decreases with t, so the
r-th hole is ``r + u`` for the smallest ``u`` with ``idx[u] - u > r`` (``first`` if none),
another binary search. Sources are at or past ``n_kept`` and destinations below it: no row
is read after it is written, one launch, one program per (batch row, head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting, next_power_of_2
from .launch import launch
from ..reference import gather_rows, hole_sources

HOLE_WARPS = 4


@triton.jit
def _row(ptr, s_b, s_h, s_n, i_b, i_h, o_n):
    return ptr + i_b.to(tl.int64) * s_b + i_h.to(tl.int64) * s_h + o_n.to(tl.int64) * s_n


@triton.jit(do_not_specialize=["n_kept", "n_tail"])
def _fill_holes_kernel(idx_ptr, k_ptr, v_ptr, p_ptr, a_ptr,
                       s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_pb, s_ph, s_pn, s_ab, s_ah, s_an,
                       H, n_kept, n_tail,
                       D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, TAIL_STEPS: tl.constexpr, HOLE_STEPS: tl.constexpr,
                       HAS_POS: tl.constexpr, HAS_ACC: tl.constexpr):
    i_row = tl.program_id(0)
    i_b = i_row // H
    i_h = i_row % H
    p_idx = idx_ptr + i_row.to(tl.int64) * n_kept
    # first: the first kept index at or past n_kept (only the last n_tail can be)
    lo = n_kept - n_tail
    hi = n_kept
    for _ in tl.static_range(TAIL_STEPS):
        mid = (lo + hi) // 2
        v = tl.load(p_idx + mid, mask=mid < hi, other=n_kept)   # lo == hi: nothing changes
        past = v >= n_kept
        hi = tl.where(past, mid, hi)
        lo = tl.where(past, lo, mid + 1)
    first = lo
    o_t = tl.arange(0, BLOCK_T)
    o_d = tl.arange(0, BLOCK_D)
    o_dv = tl.arange(0, BLOCK_DV)
    for start in range(first, n_kept, BLOCK_T):
        t = start + o_t
        valid = t < n_kept
        src = tl.load(p_idx + t, mask=valid, other=0)
        r = t - first                                   # this source's rank: it fills the r-th hole
        lo_v = tl.zeros([BLOCK_T], dtype=tl.int32)
        hi_v = tl.zeros([BLOCK_T], dtype=tl.int32) + first
        for _ in tl.static_range(HOLE_STEPS):
            mid_v = (lo_v + hi_v) // 2
            open_ = mid_v < hi_v
            f = tl.load(p_idx + mid_v, mask=valid & open_, other=0) - mid_v   # holes before slot idx[mid_v]
            right = open_ & (f <= r)
            lo_v = tl.where(right, mid_v + 1, lo_v)
            hi_v = tl.where(open_ & ~right, mid_v, hi_v)
        dst = r + lo_v
        m_k = valid[:, None] & (o_d[None, :] < D)
        m_v = valid[:, None] & (o_dv[None, :] < DV)
        b_k = tl.load(_row(k_ptr, s_kb, s_kh, s_kn, i_b, i_h, src)[:, None] + o_d[None, :] * s_kd, mask=m_k)
        tl.store(_row(k_ptr, s_kb, s_kh, s_kn, i_b, i_h, dst)[:, None] + o_d[None, :] * s_kd, b_k, mask=m_k)
        b_v = tl.load(_row(v_ptr, s_vb, s_vh, s_vn, i_b, i_h, src)[:, None] + o_dv[None, :] * s_vd, mask=m_v)
        tl.store(_row(v_ptr, s_vb, s_vh, s_vn, i_b, i_h, dst)[:, None] + o_dv[None, :] * s_vd, b_v, mask=m_v)
        if HAS_POS:
            pos = tl.load(_row(p_ptr, s_pb, s_ph, s_pn, i_b, i_h, src), mask=valid)
            tl.store(_row(p_ptr, s_pb, s_ph, s_pn, i_b, i_h, dst), pos, mask=valid)
        if HAS_ACC:
            acc = tl.load(_row(a_ptr, s_ab, s_ah, s_an, i_b, i_h, src), mask=valid)
            tl.store(_row(a_ptr, s_ab, s_ah, s_an, i_b, i_h, dst), acc, mask=valid)


def _steps(n: int) -> int:
    """Halvings that take a binary search over n items to one (n + 1 outcomes)."""
    return max(1, (n + 1).bit_length())


def fill_holes_launch(indices: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      positions: torch.Tensor | None = None, accumulated: torch.Tensor | None = None):
    """The launch ``(fn, grid, args, constexprs, num_warps)`` of fill_holes."""
    b, h, n, d = keys.shape
    dv = values.shape[-1]
    n_kept = indices.shape[-1]
    n_tail = min(n - n_kept, n_kept)
    # positions, accumulators: where absent, a placeholder and zero strides (the kernel never reads them)
    (pos, s_pos), (acc, s_acc) = ((indices, (0, 0, 0)) if t is None else (t, t.stride())
                                  for t in (positions, accumulated))
    args = [indices, keys, values, pos, acc, *keys.stride(), *values.stride(), *s_pos, *s_acc, h, n_kept, n_tail]
    constexprs = dict(D=d, DV=dv, BLOCK_T=max(16, min(32, next_power_of_2(n_tail))), BLOCK_D=next_power_of_2(d),
                      BLOCK_DV=next_power_of_2(dv), TAIL_STEPS=_steps(n_tail), HOLE_STEPS=_steps(n_kept),
                      HAS_POS=positions is not None, HAS_ACC=accumulated is not None)
    return _fill_holes_kernel, (b * h,), args, constexprs, HOLE_WARPS


def fill_holes(indices: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               positions: torch.Tensor | None = None, accumulated: torch.Tensor | None = None) -> None:
    """Hold each row's kept slots in its first ``n_kept`` slots, in place, moving only the kept
    rows at or past ``n_kept`` (into the dropped slots below it; order is not kept).

    indices: int64 [B, H, n_kept], ascending per row (what evict returns), contiguous;
    keys / values [B, H, N, D] / [..., D_v], positions (optional, [B, H, N], any int dtype)
    and accumulated (optional, [B, H, N], a value per slot that moves with its row: a cache's
    accumulated attention): any strides with unit-stride rows. Slots from n_kept on are left
    as they were. CPU tensors outside Triton's interpreter take the PyTorch reference."""
    n_kept = indices.shape[-1]
    if n_kept == 0 or n_kept == keys.shape[2]:
        return
    if not (keys.is_cuda or interpreting()):
        source = hole_sources(indices)
        for x in (keys, values):
            x[:, :, :n_kept] = gather_rows(x, source)
        for x in (positions, accumulated):
            if x is not None:
                x[:, :, :n_kept] = x.gather(-1, source)
        return
    fn, grid, args, constexprs, warps = fill_holes_launch(indices.contiguous(), keys, values, positions, accumulated)
    launch(fn, grid, args, constexprs, warps)
