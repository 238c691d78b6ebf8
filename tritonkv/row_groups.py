"""An evict call cut into groups of rows whose launches overlap on the GPU (``TRITONKV_ROW_GROUPS``).

A call's launches form a chain: statistics and score passes over K, bound by bandwidth, then
select, whose ranking is bound by latency (passes over the scores and row barriers: ~12-15 us
on an H100 at any length, docs/performance-log.md). Rows (batch, KV head) are independent, so a
call can be cut into G groups of rows, each prepared as its own call (compiler.prepare) on views
of the inputs and writing into views of one set of outputs, and the groups' launches ordered as
a graph instead of a chain (compiler.Launch.after):

  - group g's first launch waits for group g-1's first launch, its other launches for the one
    before them in the group, so each group's passes run beside the groups before it;
  - group g's select also waits for group g-1's select: one select runs at a time (a select
    keeps all its programs resident and waits at row barriers; two sized to fill the GPU could
    wait on each other).

planned.py launches that graph as one CUDA graph; plain launches (the interpreter, a stream
that is capturing, graphs off) run the launches in list order, which every edge allows.

The cut: the batch where B >= 2, so that a batch row's heads stay together (heads that share one
selection, TOVA's head mean), else the KV heads of B = 1 where each head selects its own tokens.
Not cut: calls with nothing to rank, policies that draw noise (random(), sample clauses: their
draws are keyed by the row's place in the call), policies with signal or direction tensors, and
AdaKV (its own path). ``TRITONKV_ROW_GROUPS=G`` asks for G groups (at most one per batch row, or
per head); 1, the default, keeps calls whole.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import List, Optional, Tuple

import torch

from . import dsl
from .compiler import Call, CompiledPolicy, prepare, ranks, shared_selection
from .kernels.select import _select_kernel


def row_groups() -> int:
    """The groups ``TRITONKV_ROW_GROUPS`` asks for (1 where unset)."""
    value = os.environ.get("TRITONKV_ROW_GROUPS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TRITONKV_ROW_GROUPS: expected a whole number >= 1, got {value!r}")
    return int(value)


def draws_noise(policy: dsl.Policy) -> bool:
    """Whether a policy draws random numbers (random(), a sample clause)."""
    return any(isinstance(c, dsl.Sample) or any(isinstance(node, dsl.Random) for node in dsl.walk(c.score))
               for c in policy.selective)


def split(rows: int, groups: int) -> List[Tuple[int, int]]:
    """(start, size) of ``groups`` contiguous parts of ``rows``, sizes differing by at most one."""
    base, extra = divmod(rows, groups)
    sizes = [base + (g < extra) for g in range(groups)]
    return [(sum(sizes[:g]), size) for g, size in enumerate(sizes)]


def cut(policy: dsl.Policy, compiled: CompiledPolicy, alloc, shape, groups: int,
        named=()) -> Optional[Tuple[int, List[Tuple[int, int]]]]:
    """(axis, parts) of a call cut into ``groups`` (axis 0: batch rows, 1: KV heads), or None
    where it stays whole (see the module's doc)."""
    b, h, n = shape[:3]
    if groups < 2 or named or policy.heads == "adaptive" or not ranks(compiled, alloc, n) or draws_noise(policy):
        return None
    if b >= 2:
        return 0, split(b, min(groups, b))
    if h >= 2 and not shared_selection(compiled.program):
        return 1, split(h, min(groups, h))
    return None


def parts_of(plan, *tensors, heads: int):
    """Per part of a cut ``plan`` (cut's (axis, parts)), the views of ``tensors`` ([B, H, ...],
    or None; a tensor of more rows than ``heads`` on axis 1 is a queries tensor whose query heads
    of one KV head sit next to each other)."""
    axis, parts = plan

    def view(t, start, size):
        if t is None:
            return None
        per = t.shape[1] // heads if axis == 1 else 1
        return t.narrow(axis, start * per, size * per)
    return [[view(t, start, size) for t in tensors] for start, size in parts]


def group_inputs(policy: dsl.Policy, compiled: CompiledPolicy, alloc, keys, values, queries, named=()):
    """(keys, values, queries) of each call that prepare_call prepares: one, or one per group."""
    plan = cut(policy, compiled, alloc, keys.shape, row_groups(), named)
    return [(keys, values, queries)] if plan is None else parts_of(plan, keys, values, queries, heads=keys.shape[1])


def prepare_call(policy: dsl.Policy, compiled: CompiledPolicy, alloc, keys, values, queries, seed: int, named=(),
                 gather: bool = True) -> Call:
    """compiler.prepare, or the same call cut into row groups where ``TRITONKV_ROW_GROUPS``
    asks for them (``policy``: the lowered policy ``compiled`` was built from)."""
    plan = cut(policy, compiled, alloc, keys.shape, row_groups(), named)
    if plan is None:
        return prepare(compiled, alloc, keys, values, queries, seed, named, gather)
    b, h, n, d = keys.shape
    total = alloc.total
    out_i = torch.empty(b, h, total, dtype=torch.int64, device=keys.device)
    out_k = out_v = None
    if gather:
        out_k = torch.empty(b, h, total, d, dtype=keys.dtype, device=keys.device)
        out_v = torch.empty(b, h, total, values.shape[-1], dtype=values.dtype, device=values.device)
    calls, aliases = [], []
    for k, v, q, i, ok, ov in parts_of(plan, keys, values, queries, out_i, out_k, out_v, heads=h):
        for whole, view in ((keys, k), (values, v), (queries, q)):
            if view is not None:
                aliases.append((view, whole, view.data_ptr() - whole.data_ptr()))
        calls.append(prepare(compiled, alloc, k, v, q, seed, (), gather, out=(i, ok, ov)))
    merged = merge(calls, out_i, out_k, out_v)
    merged.aliases = tuple(aliases)
    return merged


def merge(calls: List[Call], out_i, out_k, out_v) -> Call:
    """One Call of the groups' calls: their launches in group order, with the edges of the
    module's doc; their scratch buffers as a list."""
    launches, firsts, selects = [], [], []
    for g, call in enumerate(calls):
        base = len(launches)
        at_select = next(i for i, step in enumerate(call.launches) if step.fn is _select_kernel)
        for i, step in enumerate(call.launches):
            after = (base + i - 1,) if i else ((firsts[-1],) if g else ())
            if g and i == at_select:
                after += (selects[-1],)
            launches.append(replace(step, after=after))
        firsts.append(base)
        selects.append(base + at_select)
    return Call(launches, [call.scratch for call in calls], None, out_i, out_k, out_v)
