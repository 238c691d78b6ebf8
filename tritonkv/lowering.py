"""Rewrites of a policy that keep exactly the same tokens and cost the kernels less.

The compiled path evicts with ``lower(policy, allocation)``; the reference keeps the policy as
written, and the tests check that both keep the same tokens.

- The most recent tokens as a clause: a first selective clause ``top(position())`` (H2O's
  recency half) keeps the ``c`` latest tokens that the forced windows leave, which are the
  ``c`` tokens just before the recent window (positions are distinct, so nothing ties). That
  is the recent window grown by ``c``: no priority slot (4 bytes per token per head) and no
  radix select for it. Only where no ``sample`` clause follows, whose Gumbel stream is keyed
  by its clause index.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, Tuple

from . import dsl
from .budget import Allocation


def is_recency(clause: dsl.Clause) -> bool:
    """``top(position())`` as written: keep the latest tokens (H2O's recency half)."""
    return isinstance(clause, dsl.Top) and clause.score == dsl.Position() and not clause.transformed


_LOWERED: Dict[Tuple[int, Allocation], Tuple[dsl.Policy, Tuple[dsl.Policy, Allocation]]] = {}


def lower(policy: dsl.Policy, alloc: Allocation) -> Tuple[dsl.Policy, Allocation]:
    """(policy, allocation) the kernels run: the same kept set, fewer selective clauses.
    Remembered per policy object, so a lowered policy stays one object (the compiled-policy
    cache then hits by identity)."""
    key = (id(policy), alloc)
    hit = _LOWERED.get(key)
    if hit is not None and hit[0] is policy:
        return hit[1]
    lowered = _lower(policy, alloc)
    if len(_LOWERED) > 1024:
        _LOWERED.clear()
    _LOWERED[key] = (policy, lowered)   # holding the policy keeps its id from being reused
    return lowered


def _lower(policy: dsl.Policy, alloc: Allocation) -> Tuple[dsl.Policy, Allocation]:
    selective = policy.selective
    if len(selective) < 2 or policy.heads != "uniform" or not is_recency(selective[0]) \
            or any(isinstance(c, dsl.Sample) for c in selective):
        return policy, alloc
    at = next(i for i, c in enumerate(policy.clauses) if not c.forced)   # the first selective clause
    clauses = policy.clauses[:at] + policy.clauses[at + 1:]
    grown = Allocation(alloc.n_sink, alloc.n_recent + alloc.clause_counts[0], alloc.clause_counts[1:])
    return replace(policy, clauses=clauses), grown
