"""The baselines tritonkv is measured against, doing the same policy:

- eager: what popular eviction libraries run today — each score computed with PyTorch
  operations in float32 (reference.py's formulas), forced windows masked out, ``torch.topk``
  per clause, then a sort of the kept positions and a gather of K and V;
- compiled: ``torch.compile`` of that same function (one compilation per policy, dynamic
  shapes, so a new N does not recompile).
"""

from __future__ import annotations

import functools

import torch

from tritonkv import dsl, reference
from tritonkv.budget import allocate


def eager_evict(keys, values, queries, policy: dsl.Policy, k: int, seed: int = 0, core=None):
    """Evict with the eager formulas; ``core`` swaps in a compiled _evict_core."""
    alloc = allocate(policy, keys.shape[2], k)
    return (core or _evict_core)(keys, values, queries, alloc.n_sink, alloc.n_recent, alloc.total,
                                 list(alloc.clause_counts), seed, policy=policy)


def _evict_core(keys, values, queries, n_sink, n_recent, total, counts, seed, policy):
    b, h, n, _ = keys.shape
    inputs = reference.Inputs(keys.float(), values.float(), None if queries is None else queries.float(), seed)
    positions = torch.arange(n, device=keys.device)
    kept = ((positions < n_sink) | (positions >= n - n_recent)).expand(b, h, n)
    memo = {}
    for index, (clause, count) in enumerate(zip(policy.selective, counts)):
        p = reference.priority(clause, reference.score(clause.score, inputs, memo), index, seed)
        top = torch.topk(p.masked_fill(kept, float("-inf")), count, dim=-1).indices
        kept = kept.scatter(-1, top, True)
    index = torch.sort(torch.where(kept, positions, n), dim=-1).values[..., :total]
    gather = lambda x: torch.gather(x, 2, index.unsqueeze(-1).expand(b, h, total, x.shape[-1]))  # noqa: E731
    return gather(keys), gather(values), index


@functools.lru_cache(maxsize=None)
def compiled_evict(policy: dsl.Policy):
    """torch.compile of the same function for one policy (dynamic shapes; the budget split is
    computed outside, so a new budget does not recompile; PyTorch still specializes batch 1
    and N below 32767)."""
    core = torch.compile(_evict_core, dynamic=True)
    return functools.partial(eager_evict, policy=policy, core=core)
