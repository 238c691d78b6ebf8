"""AdaKV's cross-head selection on the kernel path (reference.select_adaptive_by_priority)."""

from __future__ import annotations

import torch

from . import dsl
from .budget import fraction_to_count
from .compiler import CompiledPolicy, score
from .kernels.select import select_indices
from .results import EvictedVarlen


def evict_adaptive(compiled: CompiledPolicy, policy: dsl.Policy, alloc, keys, values, queries, seed: int,
                   named=()):
    """AdaKV (reference.select_adaptive_by_priority) on the kernel path, without a host sync:
    scores from the generated kernel; the radix select per head keeps the forced windows and
    each head's floor; a second radix select over each batch row's H * N priorities (the
    first stage's tokens skipped) takes the rest of the row's budget, ties to the lower head,
    then token; the kept set is packed head by head with nonzero_static (its size, B * H * k,
    is known on the host)."""
    b, h, n, _ = keys.shape
    rows, device = b * h, keys.device
    priorities = score(compiled, keys, values, queries, seed, named)
    remainder = alloc.clause_counts[0]
    floor = min(remainder, fraction_to_count(policy.head_floor, remainder))
    own = alloc.n_sink + alloc.n_recent + floor
    kept = torch.zeros(rows, n, dtype=torch.uint8, device=device)
    if own:
        first = select_indices(priorities, (0,), (floor,), alloc.n_sink, alloc.n_recent, rows, n, own, device)
        kept.scatter_(1, first, 1)
    pooled = h * (remainder - floor)
    if pooled:
        flat = kept.view(b, h * n)
        second = select_indices(priorities.view(1, b, h * n), (0,), (pooled,), 0, 0, b, h * n, pooled, device,
                                skip=flat)
        flat.scatter_(1, second, 1)
    where = _kept_positions(kept.view(-1), rows * alloc.total)
    head, position = where // n, where % n
    i_b, i_h = head // h, head % h
    return EvictedVarlen(keys[i_b, i_h, position], values[i_b, i_h, position], position,
                         kept.sum(-1, dtype=torch.int64).view(b, h))


def _kept_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending positions of the ``count`` nonzeros of a flat mask, without a host sync where
    the device has nonzero_static (else nonzero, which synchronizes)."""
    try:
        return torch.nonzero_static(mask, size=count).squeeze(1)
    except (NotImplementedError, RuntimeError):   # pragma: no cover - a device without nonzero_static
        return mask.nonzero().squeeze(1)
