"""AdaKV's cross-head selection on the kernel path (reference.select_adaptive_by_priority).

One call's launches (a compiler.Call, so tritonkv.planned records and replays it like any
other policy's): the statistics and score passes (the score kernel also zeroes the selects'
counters and the kept-token mask); a radix select per head that keeps the forced windows and
each head's floor and marks them in the mask (no indices written); a second radix select over each batch row's
H * N priorities, the marked tokens skipped, that takes the rest of the row's budget (ties to
the lower head, then token) and marks its tokens too; then kernels/pack.py packs the marked
tokens head by head. Every size is known on the host (the row's budget is B * H * k tokens
however the heads share it), so nothing synchronizes.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import dsl
from .budget import fraction_to_count
from .compiler import Call, CompiledPolicy, Launch, Layout, _align, run, scored
from .kernels.common import cdiv
from .kernels.pack import pack_chunks, pack_launches
from .kernels.select import (SELECT_SEED_ARG, select_warps, _select_kernel, select_launch, select_programs,
                             workspace_sizes)
from .results import EvictedVarlen, varlen_from

STAGE = (0,)   # both selects rank slot 0: the policy's one top clause, its own scores


def stage_counts(policy: dsl.Policy, alloc, heads: int) -> Tuple[int, int]:
    """(tokens each head keeps in the first stage: windows and floor, tokens each batch row's
    second stage takes across its heads)."""
    remainder = alloc.clause_counts[0]
    floor = min(remainder, fraction_to_count(policy.head_floor, remainder))
    return alloc.n_sink + alloc.n_recent + floor, heads * (remainder - floor)


def adaptive_programs(keys) -> Tuple[int, int]:
    """Programs per row of the two selects (occupancy learnt so far; planned.py plans again when
    a first call changed them)."""
    b, h, n, _ = keys.shape
    return (select_programs(b * h, n, STAGE, keys.device, mark=True),
            select_programs(b, h * n, STAGE, keys.device, skip=True, mark=True))


def prepare_adaptive(compiled: CompiledPolicy, policy: dsl.Policy, alloc, keys, values, queries, seed: int,
                     named=()) -> Call:
    """Allocate an AdaKV call's buffers and list its launches (module docstring). The call's
    ``indices`` is int64 [total + B * H]: the packed kept indices, then each head's count
    (results.varlen_from splits them); its keys / values are [total, D] / [total, D_v]."""
    b, h, n, d = keys.shape
    rows, device = b * h, keys.device
    own, pooled = stage_counts(policy, alloc, h)
    total = rows * alloc.total
    p1, p2 = adaptive_programs(keys)
    chunks = pack_chunks(rows, n, device)
    sizes = [sum(workspace_sizes(rows, p1, 1)), sum(workspace_sizes(b, p2, 1)), cdiv(rows * n, 4), rows * chunks]
    # int32 regions after the ranking workspace: select 1, select 2 and the mask, zeroed by the
    # score kernel; the pack's counts, which the count launch writes
    _, launches, scratch, _, priorities, (select1, select2, mask, counts) = scored(
        compiled, keys, values, queries, seed, named, Layout.dense(keys, values), sizes,
        sum(_align(size) for size in sizes[:3]))
    mask = mask.view(torch.uint8)[: rows * n].view(rows, n)
    if own:
        grid, sargs, sconst, _ = select_launch(priorities, STAGE, (own - alloc.n_sink - alloc.n_recent,),
                                               alloc.n_sink, alloc.n_recent, rows, n, own, device, p1, select1,
                                               mark=mask)
        launches.append(Launch(_select_kernel, grid, sargs, sconst, select_warps(), None, SELECT_SEED_ARG))
    if pooled:
        flat = mask.view(b, h * n)
        grid, sargs, sconst, _ = select_launch(priorities.view(1, b, h * n), STAGE, (pooled,), 0, 0, b, h * n,
                                               pooled, device, p2, select2, skip=flat, mark=flat)
        launches.append(Launch(_select_kernel, grid, sargs, sconst, select_warps(), None, SELECT_SEED_ARG))
    packed = torch.empty(total + rows, dtype=torch.int64, device=device)
    out_k = keys.new_empty(total, d)
    out_v = values.new_empty(total, values.shape[-1])
    launches += [Launch(fn, grid, largs, lconst, warps)
                 for fn, grid, largs, lconst, warps in pack_launches(mask, counts, packed, keys,
                                                                     values, out_k, out_v, chunks)]
    return Call(launches, scratch, priorities, packed, out_k, out_v)


def evict_adaptive(compiled: CompiledPolicy, policy: dsl.Policy, alloc, keys, values, queries, seed: int,
                   named=()) -> EvictedVarlen:
    """AdaKV (reference.select_adaptive_by_priority) on the kernel path, unplanned: one call's
    launches prepared and run."""
    call = prepare_adaptive(compiled, policy, alloc, keys, values, queries, seed, named)
    run(call)
    return varlen_from(call.keys, call.values, call.indices, keys.shape[1])
