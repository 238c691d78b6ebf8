"""What an evicting cache decides on the host: its options (checked once), how much each layer
keeps, and one planned Evictor per eviction shape, so decoding at a fixed budget replays a plan.

Shared by the growing cache (``cache.EvictingCache``) and the fixed-capacity one
(``static.StaticEvictingCache``); nothing here reads a GPU value, so every decision is known
without synchronizing.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import dsl
from ..budget import allocate, pyramid_budgets, resolve_budget, resolve_count
from ..reference import proxy_window
from ..runtime import Evictor
from .decode_scores import decode_scored

Amount = object   # int tokens, float fraction of the tokens seen, or a sequence of them (one per layer)


def full_attention_layers(model) -> int:
    """The number of layers of a model whose layers are all full attention; refuses others."""
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True) \
            or any(t != "full_attention" for t in layer_types):
        raise ValueError("EvictingCache: the model has sliding-window / non-full attention layers "
                         f"({sorted(set(layer_types))}, sliding_window={getattr(config, 'sliding_window', None)}); "
                         "only full-attention layers can be evicted")
    return len(layer_types)


def window_of(policy: dsl.Policy, n: int, default: int) -> int:
    """How many proxy queries the policy's attention scores need on n keys (0 when none)."""
    need = 0
    for score in policy.scores:
        for node in dsl.walk(score):
            if isinstance(node, dsl.ProxyAttention):
                need = max(need, default if node.window is None else proxy_window(node, n, math.inf))
    return need


def causal_window(policy: dsl.Policy, n: int, available: int) -> int:
    """The longest proxy window of the policy's causal attention scores on n keys, with
    ``available`` proxy queries."""
    return max((proxy_window(node, n, available) for score in policy.scores for node in dsl.walk(score)
                if isinstance(node, dsl.ProxyAttention) and node.causal), default=0)


def row_windows(policy: dsl.Policy, seen: int, prefix: int, suffix: int) -> Tuple[int, ...]:
    """Row counts of the policy's sink / recent(n) clauses in the held cache: positions ``< n``
    are its first rows (at most the ``prefix`` rows known to be positions 0, 1, ...), positions
    ``>= seen - n`` its last rows (at most the ``suffix`` rows known to be the last tokens)."""
    counts = []
    for c in policy.forced:
        if isinstance(c, dsl.Sink):
            counts.append(min(resolve_count(c.n, seen), prefix))
        elif c.n is not None:
            counts.append(min(resolve_count(c.n, seen), suffix))
    return tuple(counts)


def rows_policy(policy: dsl.Policy, counts: Tuple[int, ...]) -> dsl.Policy:
    """The policy with its sink / recent(n) windows as these row counts. Integer counts keep
    the compiled kernels: their code depends only on the scores."""
    counts = iter(counts)
    clauses = []
    for c in policy.clauses:
        if isinstance(c, dsl.Sink):
            c = dsl.Sink(next(counts))
        elif isinstance(c, dsl.Recent) and c.n is not None:
            c = dsl.Recent(next(counts))
        clauses.append(c)
    return replace(policy, clauses=tuple(clauses))


class EvictionPlan:
    """How one eviction runs: the planned Evictor, whether it reads proxy queries, and the
    sink / recent rows it keeps (what the next eviction knows about the kept rows)."""

    __slots__ = ("evictor", "queries", "n_sink", "n_recent", "_indexer", "_signal_forms")

    def __init__(self, evictor: Evictor, queries: bool, n_sink: int, n_recent: int):
        self.evictor, self.queries, self.n_sink, self.n_recent = evictor, queries, n_sink, n_recent
        self._indexer: Optional[Evictor] = None
        self._signal_forms: Dict[Tuple, Optional[Tuple[Evictor, str]]] = {}

    @property
    def indexer(self) -> Evictor:
        """The same eviction returning the kept indices only (for a buffer compacted in place)."""
        if self._indexer is None:   # threads that race make equal Evictors; one is kept
            ev = self.evictor
            self._indexer = Evictor(ev.policy, ev.budget, backend=ev.backend, gather=False)
        return self._indexer

    @property
    def decode_indexer(self) -> Optional[Tuple[Evictor, str]]:
        """(the indexer of the policy scored from a decode step's attention, its group
        reduction), or None when its proxy attention is not the last query's alone
        (decode_scores.decode_scored)."""
        return self.signal_form(decode_scored, gather=False)

    def signal_form(self, form, gather: bool) -> Optional[Tuple[Evictor, str]]:
        """(an Evictor of the policy as ``form`` rewrites it to read a decode-step signal, the
        signal's group reduction), or None where ``form`` gives None (decode_scores.py)."""
        key = (form, gather)
        if key not in self._signal_forms:   # threads that race make equal Evictors; one is kept
            ev = self.evictor
            swapped = form(ev.policy)
            self._signal_forms[key] = None if swapped is None else (
                Evictor(swapped[0], ev.budget, backend=ev.backend, gather=gather), swapped[1])
        return self._signal_forms[key]


class EvictionTimer:
    """CUDA events around every eviction call (``EvictingCache(..., timing=True)``); ``total_ms()``
    synchronizes once and adds them up.

    ``queue_ahead_cycles`` > 0: before each start event the stream first sleeps that many GPU
    cycles (``torch.cuda._sleep``), so the eviction's launches are all queued when the start
    event fires and the events time its kernels back to back, as a CUDA graph runs them, not
    the host's launch gaps (eager decode steps are bound by the host)."""

    def __init__(self, queue_ahead_cycles: int = 0):
        self.events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.calls = 0
        self.queue_ahead_cycles = queue_ahead_cycles

    def start(self):
        if self.queue_ahead_cycles:
            torch.cuda._sleep(self.queue_ahead_cycles)
        self._start = torch.cuda.Event(enable_timing=True)
        self._start.record()

    def stop(self):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.events.append((self._start, end))
        self.calls += 1

    def total_ms(self) -> float:
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.events)

    def reset(self):
        self.events, self.calls = [], 0


def _check_amount(name: str, amount, n_layers: int) -> None:
    if isinstance(amount, (list, tuple)):
        if len(amount) != n_layers:
            raise ValueError(f"{name}: expected {n_layers} per-layer entries (one per layer), got {len(amount)}")
        for a in amount:
            resolve_budget(a, 1 << 62)
    elif amount is not None:
        resolve_budget(amount, 1 << 62)   # type and range, with evict's messages


class EvictionSchedule:
    """The options of an evicting cache, checked before any forward, and the host-side
    decisions they imply (budgets per layer, plans, proxy-query buffer sizes).

    Args as :class:`tritonkv.integrations.cache.EvictingCache`'s (``model`` gives the layer
    count and the device of ``directions``).
    """

    def __init__(self, model, policy=None, budget: Amount = None, *, interval: Optional[int] = None,
                 target: Amount = None, window: int = 64, seed: int = 0, backend: str = "auto",
                 timing: bool = False, directions: Optional[Mapping[str, torch.Tensor]] = None,
                 reuse_layers: int = 1):
        self.n_layers = full_attention_layers(model)
        self.policy = None if policy is None else dsl.as_policy(policy)
        if self.policy is None and (budget is not None or interval is not None):
            raise ValueError("policy: budget / interval need a policy (policy=None keeps everything)")
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"interval: expected an int >= 1 (decoded tokens between evictions) or None, got {interval!r}")
        if target is None:
            target = budget
        if interval is not None and target is None:
            raise ValueError("target: decoding-time eviction (interval) needs a target or a budget to evict back to")
        if interval is not None and self.policy.heads == "adaptive":
            raise ValueError("interval: an adaptive (AdaKV) policy evicts once, after the prompt (its layers are "
                             "packed per head); use interval=None, or a uniform policy for decoding-time eviction")
        _check_amount("budget", budget, self.n_layers)
        _check_amount("target", target, self.n_layers)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected an int >= 1 (proxy queries kept per layer), got {window!r}")
        self.directions = self._check_directions(directions, model)
        if isinstance(reuse_layers, bool) or not isinstance(reuse_layers, int) or reuse_layers < 1:
            raise ValueError(f"reuse_layers: expected an int >= 1 (layers per shared selection), got {reuse_layers!r}")
        if reuse_layers > 1 and self.policy is not None and (
                self.policy.heads == "adaptive" or self.policy.layers == "pyramid"
                or any(isinstance(a, (list, tuple)) for a in (budget, target))):
            raise ValueError("reuse_layers: layers that share a selection need one uniform budget per head "
                             "(no per-layer budgets, PyramidKV or AdaKV)")
        self.reuse_layers = reuse_layers
        self.budget, self.interval, self.target, self.window = budget, interval, target, window
        self.seed, self.backend = seed, backend
        self.query_window = self.policy is not None and self.policy.needs_queries
        self.timer = EvictionTimer() if timing else None
        self._evictors: Dict[Tuple, Evictor] = {}
        self._plans: Dict[Tuple, EvictionPlan] = {}
        self._budgets: Dict[Tuple, List[int]] = {}
        if self.query_window:   # fractional proxy windows need more queries on longer caches
            self._window_grows = any(isinstance(node, dsl.ProxyAttention) and isinstance(node.window, float)
                                     for score in self.policy.scores for node in dsl.walk(score))
            self._query_size = max(window, window_of(self.policy, 1, window))

    def _check_directions(self, directions, model) -> List[Optional[Dict[str, torch.Tensor]]]:
        """Per-layer ``directions=`` dicts for evict, from name -> [n_layers, H_kv, D]."""
        used = () if self.policy is None else self.policy.directions
        if self.policy is not None and self.policy.signals:
            raise ValueError(f"policy: it reads signal(...) {list(self.policy.signals)}, which an EvictingCache has "
                             "no source for; evict the cache's layers with tkv.evict(..., signals=...) instead")
        directions = dict(directions or {})
        if set(directions) != set(used):
            raise ValueError(f"directions: the policy reads key_dot {list(used)}; got {sorted(directions)}")
        device = next(model.parameters()).device
        for name, t in directions.items():
            if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != self.n_layers:
                raise ValueError(f"directions[{name!r}]: expected a tensor [n_layers={self.n_layers}, H_kv, D], "
                                 f"got {getattr(t, 'shape', type(t).__name__)}")
        return [{name: t[i].to(device) for name, t in directions.items()} or None for i in range(self.n_layers)]

    def layer_directions(self, layer: int) -> Optional[Dict[str, torch.Tensor]]:
        return self.directions[layer]

    def layer_seed(self, layer: int, evictions: int) -> int:
        """Every layer and eviction draws from its own stream."""
        return self.seed + layer + self.n_layers * evictions

    def layer_budget(self, amount: Amount, layer: int, seen: int) -> int:
        """Tokens per head that ``layer`` keeps when evicting to ``amount`` after ``seen`` tokens."""
        key = (id(amount), seen)
        budgets = self._budgets.get(key)
        if budgets is None:
            if isinstance(amount, (list, tuple)):
                budgets = [resolve_budget(a, seen) for a in amount]
            elif self.policy.layers == "pyramid":
                budgets = [min(seen, b) for b in
                           pyramid_budgets(resolve_budget(amount, seen), self.n_layers, self.policy.pyramid_beta)]
            else:
                budgets = [resolve_budget(amount, seen)] * self.n_layers
            if len(self._budgets) > 64:
                self._budgets.clear()
            self._budgets[key] = budgets
        return budgets[layer]

    def plan(self, windows: Tuple[int, ...], held: int, k: int, available: int) -> EvictionPlan:
        """How a layer holding ``held`` rows evicts to ``k`` with these row windows; one planned
        Evictor each, so decoding at a fixed target replays one plan."""
        key = (windows, held, k, available)
        plan = self._plans.get(key)
        if plan is None:
            policy = rows_policy(self.policy, windows)
            queries = self.query_window
            if queries and causal_window(policy, held, available) > held:
                # a causal proxy window longer than the rows held cannot be placed on them (a
                # small per-layer budget): keep the sinks and the most recent rows
                policy = dsl.Policy(tuple(c for c in policy.clauses if isinstance(c, dsl.Sink)) + (dsl.recent(),))
                queries = False
            ev = self._evictors.get((policy, k))
            if ev is None:
                ev = self._evictors[(policy, k)] = Evictor(policy, k, backend=self.backend)
            alloc = allocate(policy, held, k)
            if len(self._plans) > 256:
                self._plans.clear()
            plan = self._plans[key] = EvictionPlan(ev, queries, alloc.n_sink, alloc.n_recent)
        return plan

    def query_size(self, held: int) -> int:
        """Proxy queries a layer keeps while it holds ``held`` rows."""
        if not self._window_grows:
            return self._query_size
        return max(self.window, window_of(self.policy, held, self.window))


def per_layer_ints(name: str, amount, schedule: EvictionSchedule) -> Sequence[int]:
    """Tokens per head for each layer from an amount that must not depend on the tokens seen
    (a fixed-capacity cache sizes its buffers with it): an int, or one int per layer; a
    ``.pyramid()`` policy spreads an int over the layers."""
    values = amount if isinstance(amount, (list, tuple)) else [amount]
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in values):
        raise ValueError(f"{name}: a fixed-capacity cache needs tokens per head (an int, or one int per layer), "
                         f"got {amount!r}; fractions of the tokens seen grow with the sequence, use "
                         f"EvictingCache for those")
    if isinstance(amount, (list, tuple)):
        return list(amount)
    if schedule.policy.layers == "pyramid":
        return pyramid_budgets(amount, schedule.n_layers, schedule.policy.pyramid_beta)
    return [amount] * schedule.n_layers
