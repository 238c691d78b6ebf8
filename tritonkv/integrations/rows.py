"""Where each batch row's tokens go in a fixed-capacity layer (``static_layer.StaticEvictingLayer``):
host-only decisions, made from counters the host keeps (no GPU value is read).

After a forward of several tokens, or when a decode step fills the buffer, every row's tokens
(its occupied slots, then the new real tokens) are kept whole or evicted to the budget; rows
that evict alike form one group (one ``tkv.evict`` call), and the rows are placed right-aligned
at the new fill (a row with fewer tokens starts later: its first slots stay empty). A
``Decision`` says all of it; its ``key()`` is equal for decisions that launch the same kernels
with the same arguments (what a captured CUDA graph depends on).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from .. import dsl
from .schedule import EvictionPlan, row_windows


class Row:
    """Host-side facts about one batch row of one layer (all known without reading the GPU)."""

    __slots__ = ("seen", "prefix", "suffix", "whole", "start", "queries")

    def __init__(self):
        self.seen = 0          # real (non-pad) tokens this row was given
        self.prefix = 0        # leading held rows known to be positions 0, 1, ... in every head
        self.suffix = 0        # trailing held rows known to be the row's last tokens
        self.whole = True      # nothing evicted yet: the held rows are all the row's tokens
        self.start = 0         # first occupied slot
        self.queries = 0       # real queries in the layer's query window

    def copy(self) -> "Row":
        row = Row()
        for name in self.__slots__:
            setattr(row, name, getattr(self, name))
        return row

    def windows(self, policy: dsl.Policy, count: int) -> Tuple[int, ...]:
        prefix = count if self.whole else self.prefix
        suffix = count if self.whole else min(self.suffix, count)
        return row_windows(policy, self.seen, prefix, suffix)


class Group:
    """Rows of one layer that evict alike: one ``tkv.evict`` call (or, without a plan, a copy)."""

    __slots__ = ("rows", "count", "available", "plan", "kept")

    def __init__(self, rows, count, available, plan: Optional[EvictionPlan], kept):
        self.rows, self.count, self.available, self.plan, self.kept = rows, count, available, plan, kept

    def key(self):
        return (self.rows, self.count, self.available, None if self.plan is None else id(self.plan.evictor))


class Decision:
    """Where one layer's rows go after a forward: per-row token slots of the source (the held
    slots, then the new tokens), the groups, and the new fill."""

    __slots__ = ("sources", "query_sources", "groups", "fill", "direct")

    def __init__(self, sources, query_sources, groups: List[Group], fill: int, direct: bool):
        self.sources, self.query_sources, self.groups, self.fill, self.direct = \
            sources, query_sources, groups, fill, direct

    def key(self):
        return (self.fill, self.direct, tuple(g.key() for g in self.groups),
                None if self.direct else (self.sources, self.query_sources))


def decide(layer, pads: Optional[Sequence[int]], q: int, evict: bool) -> Decision:
    """Host only: which source slots each row of ``layer`` (a StaticEvictingLayer: its rows,
    filled, budget, capacity, cache) keeps, in which groups, with which plans. ``pads`` None: the
    full buffer (a decode step's eviction); else a forward of q tokens (pads[b] of them padding)
    after the ``filled`` held slots."""
    cache, schedule = layer.cache, layer.cache.schedule
    window = cache.query_window
    direct = True
    n_new = 0 if pads is None else q
    sources, query_sources, by_key = [], [], {}
    for b, row in enumerate(layer.rows):
        # (held slots, new slots): ranges, so that deciding costs no work per slot
        pad = 0 if pads is None else pads[b]
        slots = (range(row.start, layer.filled), range(layer.filled + pad, layer.filled + n_new))
        qslots = (range(window - row.queries, window), range(window + pad, window + n_new))
        count = len(slots[0]) + len(slots[1])
        available = 0
        if window:
            available = min(schedule.query_size(count), len(qslots[0]) + len(qslots[1]))
            qslots = last(qslots, available)
        plan = None
        if count > layer.budget:
            if not evict:
                if count > layer.capacity - 1:
                    raise ValueError(f"StaticEvictingCache: a forward without eviction (pause) would hold {count} "
                                     f"tokens in row {b} of layer {layer.index}, more than capacity - 1 = "
                                     f"{layer.capacity - 1}")
            else:
                plan = schedule.plan(row.windows(schedule.policy, count), count, layer.budget, available)
        kept = count if plan is None else layer.budget
        # direct: the row takes every source slot (and so the newest queries): no gather needed
        direct &= row.start == 0 and pad == 0
        sources.append(slots)
        query_sources.append(qslots)
        key = (count, available, None if plan is None else id(plan))
        by_key.setdefault(key, (plan, kept, []))[2].append(b)
    groups = [Group(tuple(rows), key[0], key[1], plan, kept) for key, (plan, kept, rows) in by_key.items()]
    direct &= len(groups) == 1
    fill = max(g.kept for g in groups)
    return Decision(tuple(sources), tuple(query_sources), groups, fill, direct)


def commit(layer, decision: Decision, queries_added: Optional[Sequence[int]] = None) -> None:
    """Host only: the rows' facts after the decision ran."""
    window = layer.cache.query_window
    for group in decision.groups:
        for b in group.rows:
            row = layer.rows[b]
            if group.plan is not None:
                row.prefix, row.suffix, row.whole = group.plan.n_sink, group.plan.n_recent, False
            row.start = decision.fill - group.kept
            if queries_added is not None:
                row.queries = min(window, row.queries + queries_added[b])
    if any(g.plan is not None for g in decision.groups):
        layer.evictions += 1
    layer.filled = decision.fill


def last(ranges: Tuple[range, range], n: int) -> Tuple[range, range]:
    """The last n items of two consecutive ranges, as two ranges."""
    first, second = ranges
    drop = len(first) + len(second) - n
    if drop <= len(first):
        return first[drop:], second
    return range(0), second[drop - len(first):]


def flat(ranges: Tuple[range, range]) -> Tuple[int, ...]:
    return tuple(ranges[0]) + tuple(ranges[1])
