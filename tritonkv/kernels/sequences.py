"""The per-sequence table of a batched paged call (tritonkv.paged): one int32 row per sequence
that the generated kernels and the select kernel read instead of their scalar arguments, so
one launch of each stage serves sequences of different lengths.

Fields of a row, in order:
  INDEX    the sequence's row in the block table, queries, signals and the kept positions
  TOKENS   its length N (the scalar ``N`` of a batched launch is the longest length: the row
           stride of the slots)
  SPLITS   statistics programs of its row that have tiles (those past it store the
           identity partial: merged, it changes nothing), and
  TILES    tiles per program, both those of its dense copy [1, H_kv, N, D] (tritonkv.geometry),
           so statistics are summed in the same order as tkv.evict sums them
  TABLE    element offset of its block table row
  SINK, RECENT, COUNT0 .. COUNT3: its Allocation (budget.py), what select keeps
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .keys import MAX_CLAUSES

FIELDS = tl.constexpr(7 + MAX_CLAUSES)


def sequence_table(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    """int32 [len(rows), FIELDS] on ``device``: each row (index, tokens, splits, tiles, table offset,
    n_sink, n_recent, clause counts...), the counts padded with zeros."""
    width = FIELDS.value
    flat = [list(r) + [0] * (width - len(r)) for r in rows]
    return torch.tensor(flat, dtype=torch.int32).to(device)


@triton.jit
def sequence_of(sq_ptr, i_seq):
    """(index, tokens, splits, tiles per program, block table offset) of sequence i_seq."""
    p = sq_ptr + i_seq * FIELDS
    return tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3), tl.load(p + 4)


@triton.jit
def allocation_of(sq_ptr, i_seq):
    """(n_sink, n_recent, count0, count1, count2, count3) of sequence i_seq."""
    p = sq_ptr + i_seq * FIELDS
    return tl.load(p + 5), tl.load(p + 6), tl.load(p + 7), tl.load(p + 8), tl.load(p + 9), tl.load(p + 10)
