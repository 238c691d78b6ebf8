"""tritonkv.evict's reference path (``backend="reference"``, and ``"auto"`` off CUDA): the
policy evaluated by reference.py in float32 PyTorch, the kept rows gathered in the input dtype.
It sits below both api.py and runtime.py, which dispatch to it."""

from __future__ import annotations

from . import reference
from .results import Evicted, pack_varlen
from .validate import split_named


def evict_reference(keys, values, queries, policy, k: int, seed: int, named=()):
    """The reference path: scores in float32 PyTorch, selection by stable sort. ``named``:
    the signals' and directions' tensors in the policy's order (validate.named_inputs)."""
    signals, directions = split_named(policy, named)
    inputs = reference.Inputs(keys.float(), values.float(),
                              None if queries is None else queries.float(), seed, signals, directions)
    if policy.heads == "adaptive":
        kept = reference.select_adaptive(policy, inputs, k)
        return pack_varlen(keys, values, kept)
    kept = reference.select(policy, inputs, k)
    index = reference.kept_indices(kept)
    return Evicted(reference.gather_rows(keys, index), reference.gather_rows(values, index), index)
