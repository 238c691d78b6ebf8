"""The compiled path of tkv.evict, unplanned: lower the policy, compile it, prepare and run
one call's launches (tritonkv.runtime.Evictor plans repeat calls through tritonkv.planned)."""

from __future__ import annotations

import torch

from . import dsl
from .adaptive import evict_adaptive
from .budget import allocate
from .compiler import check_backend, compile_policy, prepare, run, score
from .lowering import lower
from .results import Evicted


def evict_compiled(keys, values, queries, policy: dsl.Policy, k: int, seed: int, named=(),
                   return_priorities: bool = False, gather: bool = True):
    """tritonkv.evict's compiled path (arguments already validated), unplanned: every call
    computes its launches anew (tritonkv.runtime.Evictor plans them once). ``named``: the
    policy's signal and direction tensors in its order (validate.named_inputs).
    ``return_priorities``: also what each selective clause of the lowered policy ranked,
    float32 [n_clauses, B*H, N] (written by a second, identical scoring run: the call itself
    never stores a sample clause's priorities). ``gather=False``: the kept indices only (the
    result's keys and values are None)."""
    check_backend(keys)
    b, h, n, _ = keys.shape
    policy, alloc = lower(policy, allocate(policy, n, k))
    compiled = compile_policy(policy)
    if policy.heads == "adaptive":
        return evict_adaptive(compiled, policy, alloc, keys, values, queries, seed, named)
    if return_priorities and alloc.total == n:
        result = Evicted(keys.clone(), values.clone(), torch.arange(n, device=keys.device).expand(b, h, n).clone())
    else:
        call = prepare(compiled, alloc, keys, values, queries, seed, named, gather)
        run(call)
        result = Evicted(call.keys, call.values, call.indices)   # keys, values None without gather
    return (result, score(compiled, keys, values, queries, seed, named, clauses=True)) if return_priorities else result
