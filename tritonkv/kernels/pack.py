"""Pack the tokens set in a uint8 mask [rows, N], row after row, with their K and V rows.

AdaKV's output (tritonkv/adaptive.py, results.EvictedVarlen): each head keeps its own count of
tokens, packed head-major in ascending token order, with no padding. Two launches over the
mask, each program owning a chunk of a row:

  1. count: the marked tokens of every (row, chunk), int32;
  2. pack: a program sums the counts of the chunks before its own (rows before, then its
     row's chunks: the packed position of its first token), writes its tokens' indices and
     copies their K / V rows; the first program of a row also writes the row's length.

The total packed is known on the host (the allocation says how many tokens every batch row
keeps), so the outputs are allocated before the launches and nothing synchronizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cdiv, interpreting, multiprocessor_count, next_power_of_2
from .gather import _copy

PACK_WARPS = 4
COUNT_BLOCK = 1024      # mask bytes per step of the count pass
SUM_BLOCK = 1024        # chunk counts per step of a pack program's prefix sum
PROGRAMS_PER_SM = 4     # chunks per row: about this many programs per multiprocessor in all
MIN_CHUNK = 2048        # ... but no chunk shorter than this (the prefix sums stay short)


@triton.jit(do_not_specialize=["N", "chunk"])
def _count_kernel(mask_ptr, counts_ptr, N, chunk, BLOCK: tl.constexpr):
    """Program (i_c, i_row): counts[i_row, i_c] = marked tokens of chunk i_c of row i_row."""
    i_c = tl.program_id(0)
    i_row = tl.program_id(1)
    lo = i_c * chunk
    hi = tl.minimum(lo + chunk, N)
    row = mask_ptr + i_row.to(tl.int64) * N
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(lo, hi, BLOCK):
        o_n = start + tl.arange(0, BLOCK)
        acc += tl.load(row + o_n, mask=o_n < hi, other=0).to(tl.int32)
    tl.store(counts_ptr + i_row * tl.num_programs(0) + i_c, tl.sum(acc, 0))


@triton.jit
def _sum_range(counts_ptr, lo, hi, BLOCK: tl.constexpr):
    """counts[lo:hi] summed (int64)."""
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(lo, hi, BLOCK):
        o = start + tl.arange(0, BLOCK)
        acc += tl.load(counts_ptr + o, mask=o < hi, other=0).to(tl.int64)
    return tl.sum(acc, 0)


@triton.jit(do_not_specialize=["N", "chunk", "total"])
def _pack_kernel(mask_ptr, counts_ptr, packed_ptr, k_ptr, v_ptr, out_k_ptr, out_v_ptr,
                 s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, H, N, chunk, total,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, SUM: tl.constexpr):
    """Program (i_c, i_row): the marked tokens of chunk i_c of row i_row = b * H + h, at their
    packed positions: indices into ``packed[:total]``, K / V rows into out_k / out_v; the first
    chunk's program writes the row's length into ``packed[total + i_row]``."""
    i_c = tl.program_id(0)
    i_row = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    me = i_row * n_chunks + i_c
    offset = _sum_range(counts_ptr, 0, me, SUM)   # tokens of every chunk before this one
    if i_c == 0:
        length = _sum_range(counts_ptr, me, me + n_chunks, SUM)
        tl.store(packed_ptr + total + i_row, length)
    i_b = i_row // H
    i_h = i_row % H
    lo = i_c * chunk
    hi = tl.minimum(lo + chunk, N)
    row = mask_ptr + i_row.to(tl.int64) * N
    for start in range(lo, hi, BLOCK_T):
        o_n = start + tl.arange(0, BLOCK_T)
        kept = tl.load(row + o_n, mask=o_n < hi, other=0) != 0
        dst = offset + tl.cumsum(kept.to(tl.int64), 0) - 1
        tl.store(packed_ptr + dst, o_n.to(tl.int64), mask=kept)
        _copy(o_n.to(tl.int64), dst, kept, i_b, i_h, k_ptr, v_ptr, out_k_ptr, out_v_ptr, s_kb, s_kh, s_kn, s_kd,
              s_vb, s_vh, s_vn, s_vd, D, DV, BLOCK_D, BLOCK_DV)
        offset += tl.sum(kept.to(tl.int64), 0)


PACK_KERNELS = (_count_kernel, _pack_kernel)


def pack_chunks(rows: int, n: int, device: torch.device) -> int:
    """Chunks per row of the two pack launches: about PROGRAMS_PER_SM programs per multiprocessor
    over all rows, none shorter than MIN_CHUNK tokens; off the GPU (the interpreter, tests), up to
    three, so that the prefix sums over chunks are exercised."""
    if interpreting() or device.type != "cuda":
        return max(1, min(3, n))
    want = cdiv(PROGRAMS_PER_SM * multiprocessor_count(device), rows)
    return max(1, min(want, cdiv(n, MIN_CHUNK)))


def pack_launches(mask: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor, chunks: int):
    """[(kernel, grid, args, constexprs, num_warps)] of the count and pack launches.
    mask: uint8 [B * H, N] (nonzero: kept); counts: int32 scratch of ``B * H * chunks``;
    packed: int64 [total + B * H] (the kept indices, then each row's length); keys / values
    [B, H, N, D]; out_k / out_v: [total, D] / [total, D_v], total = packed.numel() - B * H."""
    rows, n = mask.shape
    if counts.numel() < rows * chunks:
        raise ValueError(f"counts: expected at least {rows * chunks} int32, got {counts.numel()}")
    d, dv = keys.shape[-1], values.shape[-1]
    chunk = cdiv(n, chunks)
    grid = (cdiv(n, chunk), rows)   # as many chunks as that chunk length takes
    block_t = max(16, min(64, 8192 // next_power_of_2(max(d, dv))))
    count = (_count_kernel, grid, [mask, counts, n, chunk], dict(BLOCK=COUNT_BLOCK), PACK_WARPS)
    pack = (_pack_kernel, grid, [mask, counts, packed, keys, values, out_k, out_v, *keys.stride(), *values.stride(),
                                 keys.shape[1], n, chunk, packed.numel() - rows],
            dict(D=d, DV=dv, BLOCK_T=block_t, BLOCK_D=next_power_of_2(d), BLOCK_DV=next_power_of_2(dv), SUM=SUM_BLOCK),
            PACK_WARPS)
    return [count, pack]
