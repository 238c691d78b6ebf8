"""What the select kernel ranks a clause by, computed from the clause's slot as it is loaded.

A slot holds a score, one float32 per token (the score kernel's output, normalized or
transformed in place where a top clause asks for it). A ``top`` clause ranks its slot as it
is. A ``sample`` clause ranks ``score * float32(1 / t) + Gumbel`` (reference.priority), and
that is computed here, token by token, whenever select loads the slot:

  - the Gumbel noise is a pure function of (seed, batch, head, token, stream), the stream
    that of the clause's index (reference.gumbel_stream), so it is drawn again rather than
    stored;
  - a sample clause of ``x.normalize()`` ranks the slot of x, standardized by that slot's
    row moments (kernels/deferred.py's per-program partials, merged here in the same fixed
    order as the in-place normalize merges them).

So a sample clause shares the slot of a top clause of the same score (NACL) or of its
operand (snapkv+sample) and needs no memory of its own: 4 bytes per token per head less.
The arithmetic is the one the score kernel and the normalize pass used to store, so the
priorities, and the kept sets, are bit for bit the same. ``_priorities_kernel`` writes the
clause priorities out (tests and ``return_priorities``: the values select ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import triton
import triton.language as tl

from ..reference import GUMBEL_STREAM_BASE
from .common import cdiv
from .primitives import gumbel, standardize
from .stats import moments_of_partials

MAX_CLAUSES = 4
PRIORITIES_BLOCK = 1024


@dataclass(frozen=True)
class ClauseKey:
    """How one selective clause is ranked: the values of ``slot``, for a sample clause
    (``sampled``) first standardized by the slot's row moments where ``normalized``, then
    ``* (1 / temperature) + Gumbel`` of the clause's stream."""

    slot: int
    sampled: bool = False
    temperature: float = 1.0
    normalized: bool = False


def clause_keys(keys: Sequence) -> Tuple[ClauseKey, ...]:
    """ClauseKeys from ClauseKeys or plain slot indices (a clause that ranks its slot as is)."""
    return tuple(k if isinstance(k, ClauseKey) else ClauseKey(int(k)) for k in keys)


def key_args(keys: Sequence[ClauseKey], moments: Sequence[int]):
    """(runtime arguments, constexprs) that describe the clauses to the kernels: slots,
    1 / t and moment-partial offsets per clause (padded to MAX_CLAUSES), and the bit masks of
    the sampled and the normalized clauses. ``moments[j]``: where clause j's slot's moment
    partials are in the workspace (read only if it is normalized)."""
    pad = MAX_CLAUSES - len(keys)
    slots = [k.slot for k in keys] + [0] * pad
    inverse_t = [1.0 / k.temperature for k in keys] + [1.0] * pad
    offsets = list(moments) + [0] * pad
    constexprs = dict(SAMPLED=sum(1 << j for j, k in enumerate(keys) if k.sampled),
                      NORMED=sum(1 << j for j, k in enumerate(keys) if k.normalized),
                      STREAM_BASE=GUMBEL_STREAM_BASE)
    return slots + inverse_t + offsets, constexprs


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
def clause_views(ws_ptr, mom_S, i_row, slot0, slot1, slot2, slot3, inv_t0, inv_t1, inv_t2, inv_t3,
                 mom0, mom1, mom2, mom3, C: tl.constexpr, NORMED: tl.constexpr):
    """Per clause j < C, what its key needs of row i_row: (slot, 1 / t, mean, std), the
    moments merged from the slot's partials where clause j is normalized (else 0, 1)."""
    views = ()
    for j in tl.static_range(C):
        if (NORMED >> j) & 1:
            mean, std = moments_of_partials(ws_ptr, _pick(j, mom0, mom1, mom2, mom3), i_row, mom_S)
        else:
            mean, std = tl.full([], 0.0, tl.float32), tl.full([], 1.0, tl.float32)
        views = views + ((_pick(j, slot0, slot1, slot2, slot3), _pick(j, inv_t0, inv_t1, inv_t2, inv_t3),
                          mean, std),)
    return views


@triton.jit
def clause_priority(j: tl.constexpr, prio_ptr, views, seed, i_row, rows, NS, i_db, i_h, o_n, m_n,
                    SAMPLED: tl.constexpr, NORMED: tl.constexpr, STREAM_BASE: tl.constexpr):
    """Clause j's priority of the tokens o_n of row i_row (reference.priority); the slots' rows
    are NS apart, and a sample clause draws the noise of batch row i_db, head i_h."""
    slot, inv_t, mean, std = views[j]
    p = tl.load(prio_ptr + (slot * rows + i_row).to(tl.int64) * NS + o_n, mask=m_n, other=0.0)
    if (NORMED >> j) & 1:
        p = standardize(p, mean, std)
    if (SAMPLED >> j) & 1:
        p = p * inv_t + gumbel(seed, o_n, i_db, i_h, STREAM_BASE + j)
    return p


@triton.jit(do_not_specialize=["seed", "rows", "H", "N", "mom_S", "mom0", "mom1", "mom2", "mom3"])
def _priorities_kernel(prio_ptr, out_ptr, ws_ptr, seed, rows, H, N, mom_S,
                       slot0, slot1, slot2, slot3, inv_t0, inv_t1, inv_t2, inv_t3, mom0, mom1, mom2, mom3,
                       C: tl.constexpr, SAMPLED: tl.constexpr, NORMED: tl.constexpr, STREAM_BASE: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Program (i_n, i_row): out[j, i_row, tile] = clause j's priority, for every clause."""
    i_n = tl.program_id(0)
    i_row = tl.program_id(1)
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    views = clause_views(ws_ptr, mom_S, i_row, slot0, slot1, slot2, slot3, inv_t0, inv_t1, inv_t2, inv_t3,
                         mom0, mom1, mom2, mom3, C, NORMED)
    for j in tl.static_range(C):
        p = clause_priority(j, prio_ptr, views, seed, i_row, rows, N, i_row // H, i_row % H, o_n, m_n, SAMPLED,
                            NORMED, STREAM_BASE)
        tl.store(out_ptr + (j * rows + i_row).to(tl.int64) * N + o_n, p, mask=m_n)


def priorities_launch(priorities, out, workspace, keys: Sequence[ClauseKey], moments: Sequence[int],
                      moment_splits: int, seed: int, heads: int):
    """(grid, args, constexprs) of writing every clause's priority to ``out`` [C, rows, N]
    from the slots ``priorities`` [n_slots, rows, N] (moment partials in ``workspace``)."""
    _, rows, n = priorities.shape
    runtime, constexprs = key_args(keys, moments)
    args = [priorities, out, workspace, seed, rows, heads, n, moment_splits, *runtime]
    return (cdiv(n, PRIORITIES_BLOCK), rows), args, dict(C=len(keys), BLOCK=PRIORITIES_BLOCK, **constexprs)
