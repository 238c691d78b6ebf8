"""Compact the sequences of a paged KV cache in place: slot j of a sequence's head h gets the
token that head h keeps j-th. One launch per pool compacts every sequence.

The kept indices of a head ascend, so the token kept j-th sits at position ``idx[j] >= j``:
writing slot j can only overwrite a token that this head keeps at some output slot <= j. A
program walks one head's output slots in tiles, in order; within a tile it loads every source
row, waits at a barrier, then stores, so a store never lands on a row that a slot of this tile
or of a later tile still has to read (those read positions >= their own slot, beyond every slot
written so far). Sequences, heads and slices of the head dim touch disjoint bytes, so programs never race.
Slots whose token is already in place (the sinks, an unevicted prefix) are not written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, next_power_of_2
from .launch import launch

COMPACT_WARPS = 4
COMPACT_DIM = 32       # head-dim elements per program (64 B of bf16): the programs of a head split its rows
COMPACT_ROWS = 256     # output slots per tile


@triton.jit(do_not_specialize=["n_kept"])
def _compact_kernel(pos_ptr, x_ptr, bt_ptr, s_btb, s_page, s_h, s_slot, s_d, n_kept, H,
                    PAGE: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (i_h, i_dc, i_b): sequence i_b, head i_h, dims i_dc*BLOCK_D ..; pos: int64
    [B, H, n_kept], each head's kept positions ascending, padded with -1 (nothing to move)."""
    i_h = tl.program_id(0)
    o_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i_b = tl.program_id(2)
    m_d = o_d < D
    head = x_ptr + i_h.to(tl.int64) * s_h + o_d[None, :].to(tl.int64) * s_d
    table = bt_ptr + i_b.to(tl.int64) * s_btb
    row = pos_ptr + (i_b * H + i_h).to(tl.int64) * n_kept
    for start in range(0, n_kept, BLOCK_T):
        o_j = start + tl.arange(0, BLOCK_T)
        src = tl.load(row + o_j, mask=o_j < n_kept, other=-1)
        move = (src >= 0) & (src != o_j)
        src_page = tl.load(table + src // PAGE, mask=move, other=0).to(tl.int64)
        dst_page = tl.load(table + o_j // PAGE, mask=move, other=0).to(tl.int64)
        m = move[:, None] & m_d[None, :]
        rows = tl.load(head + (src_page * s_page + (src % PAGE) * s_slot)[:, None], mask=m)
        tl.debug_barrier()   # every source row of the tile is read before any slot is written
        tl.store(head + (dst_page * s_page + (o_j % PAGE).to(tl.int64) * s_slot)[:, None], rows, mask=m)


def compact_launch(positions: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, page: int,
                   strides) -> tuple:
    """(fn, grid, args, constexprs, num_warps) compacting every sequence of ``pages`` in place.
    ``positions``: int64 [B, H, n_kept], ascending per head, -1 past a head's kept tokens;
    ``block_table``: int32 [B, max_pages] (last dim contiguous); ``strides``: (page, head, slot,
    dim) strides of ``pages``; ``page``: slots per page."""
    batch, heads, n_kept = positions.shape
    d = pages.shape[-1]
    block_d = min(COMPACT_DIM, next_power_of_2(d))
    grid = (heads, cdiv(d, block_d), batch)
    args = [positions, pages, block_table, block_table.stride(0), *strides, n_kept, heads]
    constexprs = dict(PAGE=page, D=d, BLOCK_T=COMPACT_ROWS, BLOCK_D=block_d)
    return _compact_kernel, grid, args, constexprs, COMPACT_WARPS


def compact(positions: torch.Tensor, pages: torch.Tensor, block_table: torch.Tensor, page: int, strides) -> None:
    """Run compact_launch's kernel (nothing to do when nothing is kept)."""
    fn, grid, args, constexprs, warps = compact_launch(positions, pages, block_table, page, strides)
    if positions.shape[-1] > 0:
        launch(fn, grid, args, constexprs, warps, 1)   # one stage: no loads run ahead of the tile's stores
