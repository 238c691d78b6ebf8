"""The compiled path of tritonkv.paged.evict: one launch of each stage for a whole batch.

Each sequence is lowered and compiled as tkv.evict would its dense copy [1, H_kv, n, D]; the
sequences whose kernels are the same (one compiled policy, the same constexprs and proxy
windows) form a group, and each group runs its statistics, score and select kernels once
for all its sequences: a sequence table (kernels/sequences.py) gives each row its length,
its dense copy's statistics tiling, its block table row and its counts, and select writes
the kept positions straight into the call's ``positions``. A sequence that ranks nothing
(windows only, or a budget that keeps all of it) needs no kernel: its positions are in the
template that ``positions`` is copied from. Compaction is one launch per pool for all.

Policies whose slots are normalized, transformed (chunks, head_reduce) or whose sample clauses
read row moments (kernels/deferred.py, kernels/transform.py: one scalar length per launch) group
each sequence alone: keydiff+knorm, chunkkv, tova and snapkv+sample launch per sequence; so
does NACL when its fractional window (1% of each length) differs between sequences.

What a call needs besides its tensors' addresses depends only on its signature, so it is
planned once (``plan``: per-sequence allocations, groups, sequence tables, the position
template, the block table entries to free, all on the device) and cached; a repeat call
allocates its scratch and launches, with no host-to-device copy, so it can be captured in a
CUDA graph after a warm-up call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from . import dsl
from .budget import allocate
from .compiler import CompiledPolicy, Layout, compile_policy, prepare_paged, run
from .geometry import geometry
from .kernels.sequences import sequence_table
from .lowering import lower
from .reference import proxy_window


@dataclass
class Group:
    compiled: CompiledPolicy
    layout: Layout      # [G, H, longest, D] with its sequence table


@dataclass
class BatchPlan:
    kept: List[int]                # tokens each sequence keeps per head
    template: torch.Tensor         # int64 [B, H, max kept]: the windows' positions, -1 past each count
    groups: List[Group]
    evicts: bool                   # some sequence keeps fewer tokens than it holds
    freed: Tuple[torch.Tensor, torch.Tensor]   # (rows, columns) of the block table entries to free
    freed_counts: List[int]


def _batchable(compiled: CompiledPolicy) -> bool:
    program = compiled.program
    return not program.moment_slots and not any(s.deferred or s.transformed for s in program.slots)


def _group_key(compiled: CompiledPolicy, geo, n: int, w_total: int, b: int):
    program = compiled.program
    windows = tuple(proxy_window(g, n, w_total) for g in program.globals if isinstance(g, dsl.ProxyAttention))
    return (id(compiled), tuple(sorted(geo.constexprs.items())), windows) + (() if _batchable(compiled) else (b,))


def plan(policy: dsl.Policy, k_pool, v_pool, table: torch.Tensor, lengths: List[int], kept: List[int],
         queries) -> BatchPlan:
    """The batch plan of a call (arguments already validated; ``kept``: min(budget, n) per sequence)."""
    device, heads, page = k_pool.pages.device, k_pool.heads, k_pool.page_size
    q_shape = None if queries is None else tuple(queries.shape)
    w_total = 0 if queries is None else queries.shape[2]
    members: Dict[tuple, list] = {}
    sinks = []
    for b, (n, k) in enumerate(zip(lengths, kept)):
        lowered, alloc = lower(policy, allocate(policy, n, k))
        compiled = compile_policy(lowered)
        if not compiled.program.clause_keys or alloc.total == n:   # ranks nothing: in the template
            sinks.append(n if alloc.total == n else alloc.n_sink)
            continue
        sinks.append(0)   # select writes all k positions of a ranked sequence
        geo = geometry(compiled.program, (1, heads, n, k_pool.dim), (1, heads, n, v_pool.dim), q_shape,
                       k_pool.pages.dtype, k_pool.pages.element_size(), device, page)
        row = (b, n, geo.splits, geo.tiles_per_prog, b * table.stride(0), alloc.n_sink, alloc.n_recent,
               *alloc.clause_counts)
        members.setdefault(_group_key(compiled, geo, n, w_total, b), [compiled, []])[1].append(row)
    groups = []
    for compiled, rows in members.values():
        longest = max(r[1] for r in rows)
        layout = Layout((len(rows), heads, longest, k_pool.dim), (len(rows), heads, longest, v_pool.dim),
                        k_pool.strides, v_pool.strides, table, page, sequence_table(rows, device),
                        max(r[2] for r in rows))
        groups.append(Group(compiled, layout))
    pages_held = [-(-n // page) for n in lengths]
    pages_kept = [-(-k // page) for k in kept]
    rows = [b for b, (a, z) in enumerate(zip(pages_kept, pages_held)) for _ in range(a, z)]
    cols = [j for a, z in zip(pages_kept, pages_held) for j in range(a, z)]
    return BatchPlan(kept, _template(lengths, kept, sinks, heads).to(device), groups,
                     any(k < n for n, k in zip(lengths, kept)),
                     (torch.tensor(rows, dtype=torch.long).to(table.device),
                      torch.tensor(cols, dtype=torch.long).to(table.device)),
                     [z - a for a, z in zip(pages_kept, pages_held)])


def _template(lengths, kept, sinks, heads: int) -> torch.Tensor:
    """int64 [B, H, max kept] on the host: slot j of a sequence that ranks nothing holds j below its
    sink count, n - k + j above (its recent window), -1 from its count k on."""
    j = torch.arange(max(kept))
    n, k, s = (torch.tensor(x)[:, None] for x in (lengths, kept, sinks))
    pos = torch.where(j < k, torch.where(j < s, j, n - k + j), -1)
    return pos[:, None, :].expand(-1, heads, -1).contiguous()


def run_plan(batch: BatchPlan, k_pool, v_pool, queries, seed: int, named) -> torch.Tensor:
    """Launch a planned call: the kept positions int64 [B, H, max kept] (the pages not compacted yet)."""
    positions = batch.template.clone()
    for group in batch.groups:
        run(prepare_paged(group.compiled, k_pool.pages, v_pool.pages, queries, seed, named, group.layout,
                          positions))
    return positions


_PLANS: Dict[tuple, BatchPlan] = {}
_PLANS_LOCK = threading.Lock()
MAX_PLANS = 256


def _meta(x):
    return None if x is None else (tuple(x.shape), x.stride(), x.dtype, x.device)


def signature(policy, budget, k_pool, v_pool, table, lengths, queries, named) -> tuple:
    """What a batch plan depends on (the policy by value: a policy rebuilt equal shares it)."""
    return (policy, type(budget), budget, k_pool.layout, _meta(k_pool.pages), _meta(v_pool.pages), _meta(table),
            tuple(lengths), _meta(queries), tuple(_meta(x) for x in named))


def cached_plan(key: tuple):
    return _PLANS.get(key)


def remember(key: tuple, batch: BatchPlan) -> None:
    with _PLANS_LOCK:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = batch


def clear_plans() -> None:
    """Forget every batch plan (tests of a first call)."""
    with _PLANS_LOCK:
        _PLANS.clear()
