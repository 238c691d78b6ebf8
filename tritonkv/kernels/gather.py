"""Copy the kept K and V rows, named by their indices, into contiguous outputs.

With ``WINDOWS`` the kernel also makes the indices: a policy with no selective clause keeps
the first ``n_sink`` and the last ``n_kept - n_sink`` tokens, so one launch writes indices,
keys and values (no select kernel); without ``ROWS`` it writes the indices only (an Evictor
with ``gather=False``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2
from .launch import launch

GATHER_ROWS = 64
GATHER_WARPS = 4


@triton.jit(do_not_specialize=["n_kept", "N", "n_sink"])
def _gather_kernel(idx_ptr, k_ptr, v_ptr, out_k_ptr, out_v_ptr,
                   s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, H, n_kept, N, n_sink,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WINDOWS: tl.constexpr,
                   ROWS: tl.constexpr):
    """Program (i_t, i_row): output rows i_t*BLOCK_T .. of row i_row = b * H + h."""
    i_t = tl.program_id(0)
    i_row = tl.program_id(1)
    i_b = i_row // H
    i_h = i_row % H
    o_j = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m_j = o_j < n_kept
    out = i_row.to(tl.int64) * n_kept + o_j
    if WINDOWS:
        idx = tl.where(o_j < n_sink, o_j, N - n_kept + o_j).to(tl.int64)
        tl.store(idx_ptr + out, idx, mask=m_j)
    else:
        idx = tl.load(idx_ptr + out, mask=m_j, other=0)
    if ROWS:
        _copy(idx, out, m_j, i_b, i_h, k_ptr, v_ptr, out_k_ptr, out_v_ptr, s_kb, s_kh, s_kn, s_kd,
              s_vb, s_vh, s_vn, s_vd, D, DV, BLOCK_D, BLOCK_DV)


@triton.jit
def _copy(idx, out, m_j, i_b, i_h, k_ptr, v_ptr, out_k_ptr, out_v_ptr, s_kb, s_kh, s_kn, s_kd,
          s_vb, s_vh, s_vn, s_vd, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr,
          BLOCK_DV: tl.constexpr):
    """out_k[out] = keys[i_b, i_h, idx], the same for values, on the lanes of m_j."""
    o_d = tl.arange(0, BLOCK_D)
    m_k = m_j[:, None] & (o_d[None, :] < D)
    p_k = k_ptr + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh + idx[:, None] * s_kn + o_d[None, :] * s_kd
    tl.store(out_k_ptr + out[:, None] * D + o_d[None, :], tl.load(p_k, mask=m_k), mask=m_k)
    o_dv = tl.arange(0, BLOCK_DV)
    m_v = m_j[:, None] & (o_dv[None, :] < DV)
    p_v = v_ptr + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh + idx[:, None] * s_vn + o_dv[None, :] * s_vd
    tl.store(out_v_ptr + out[:, None] * DV + o_dv[None, :], tl.load(p_v, mask=m_v), mask=m_v)


def gather_launch(indices: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, out_k=None, out_v=None,
                  n_sink=None, rows: bool = True):
    """(grid, args, constexprs, (out_k, out_v)) for gather_rows. With ``n_sink`` given, the
    kernel writes ``indices`` itself (the windows: first n_sink tokens, then the last ones);
    ``rows=False`` (with ``n_sink``): only that, no rows copied and (out_k, out_v) None."""
    b, h, n, d = keys.shape
    dv = values.shape[-1]
    n_kept = indices.shape[-1]
    if not rows:
        out_k = out_v = None
    else:
        if out_k is None:
            out_k = torch.empty(b, h, n_kept, d, dtype=keys.dtype, device=keys.device)
        if out_v is None:
            out_v = torch.empty(b, h, n_kept, dv, dtype=values.dtype, device=values.device)
    block_t = max(16, min(GATHER_ROWS, 8192 // next_power_of_2(max(d, dv))))
    grid = (cdiv(n_kept, block_t), b * h)
    args = [indices, keys, values, indices if out_k is None else out_k, indices if out_v is None else out_v,
            *keys.stride(), *values.stride(), h, n_kept, n, 0 if n_sink is None else n_sink]
    constexprs = dict(D=d, DV=dv, BLOCK_T=block_t, BLOCK_D=next_power_of_2(d),
                      BLOCK_DV=next_power_of_2(dv), WINDOWS=n_sink is not None, ROWS=rows)
    return grid, args, constexprs, (out_k, out_v)


def gather_rows(indices: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """keys[b, h, indices[b, h, j]] and values[...] as contiguous [B, H, n_kept, D] tensors."""
    grid, args, constexprs, outputs = gather_launch(indices, keys, values)
    if indices.shape[-1] > 0:
        launch(_gather_kernel, grid, args, constexprs, GATHER_WARPS)
    return outputs
