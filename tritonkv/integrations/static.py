"""A fixed-capacity evicting cache for transformers: every layer's keys keep one shape for the
whole decode, so SDPA never replans and a decode step can be captured in one CUDA graph.

    cache = StaticEvictingCache(model, tkv.policies.snapkv(), budget=2048, interval=64)
    out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=512)

Each layer owns ``capacity = budget + interval`` slots per (batch row, KV head)
(``buffer.LayerBuffer``). A forward of several tokens (the prompt, a prompt chunk) attends over
the rows held and the new tokens, then keeps ``budget`` of them per row (evicting with the
policy when a row has more) in the buffer's first slots. A decoded token is written in place at
the device-side fill ``length``; attention reads the occupied slots through a split-KV kernel
that takes the fill from the device (or, ``attention="sdpa"``, SDPA over all ``capacity`` slots
with a mask), so no shape changes from step to step. When the write fills the buffer, the
policy evicts it in place back to ``budget`` (the kept rows are written into the first
``budget`` slots), after the forward's last layer attended: with one budget for all layers and
no per-layer directions, every layer's eviction is ONE ``tkv.evict`` call on the stacked
layers ([L * B, H_kv, capacity, D], storage shared, no copy). Attention does not depend on
the order of the slots, and neither does what an order-free policy keeps (``dsl.order_free``),
so for those the kept rows past the budget fill the dropped slots (kernels/holes.py: at most
``interval`` rows move per row) instead of every kept row shifting into token order
(``keep_order=True``; kernels/compact.py). What happens in a decode step
follows from host counters alone (the fill of every layer is a Python int that grows by one per
step), so the step reads no GPU value: no ``.item()``, no branch on a tensor.

Positions stay true: a token's position is the ``position_ids`` the model gave it (RoPE sees
real positions however much was evicted; ``positions()`` reads them back). ``sink`` / ``recent``
windows are positions in each row's sequence, as in ``EvictingCache``.

Left-padded batches: the padding of a forward of several tokens is read from the attention
mask (one host read per prompt forward, never while decoding); pad tokens are never stored, and
every row keeps its own ``budget`` of real tokens. A row with fewer tokens than the others holds
them in its last occupied slots (the empty ones first, as left padding), which the attention
mask hides.

Against ``EvictingCache(model, policy, budget, interval=interval)`` with an int budget: the
same evictions at the same steps, the same kept tokens for policies without random draws, when
every prompt holds at least ``budget`` tokens. A shorter prompt differs: this cache first evicts
when the buffer is full (after ``capacity - prompt`` decoded tokens), EvictingCache as soon as
it holds more than ``budget`` once ``interval`` tokens were decoded (then every ``interval``). Stacked
evictions draw random numbers per stacked row, so random policies keep other (equally likely)
tokens than per-layer calls.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from transformers.cache_utils import Cache

from .. import dsl
from ..kernels.compact import compact_in_place
from ..kernels.holes import fill_holes
from .attention import check_attention, enable
from .buffer import LayerBuffer, Storage
from .cache import HeldTokens
from .rows import Decision
from .schedule import EvictionPlan, EvictionSchedule, per_layer_ints
from .static_layer import StaticEvictingLayer
from .step_scores import StepScores

__all__ = ["StaticEvictingCache", "StaticEvictingLayer"]


class StaticEvictingCache(HeldTokens, Cache):   # pause / positions / tokens as EvictingCache
    """A transformers ``Cache`` of fixed capacity that evicts in place with a tritonkv policy.

    Args:
        model: the transformers causal LM (its attention is switched to tritonkv's, see
            :func:`enable`; full-attention models: Llama, Mistral without sliding window, Qwen2, ...).
        policy: a tritonkv policy or preset (uniform per head: AdaKV's per-head budgets do not
            fit a fixed layout).
        budget: tokens per KV head kept after every prompt forward and after every eviction while
            decoding (an int, or one int per layer; a ``.pyramid()`` policy spreads it over layers).
        interval: decoded tokens between evictions: each layer holds ``budget + interval`` slots
            and evicts back to ``budget`` when they are full.
        window: proxy queries kept per layer for policies whose proxy_attention has ``window=None``.
        seed: seeds every random draw.
        backend: ``tkv.evict``'s ("auto": compiled kernels on CUDA, the reference elsewhere).
        timing: CUDA events around each eviction call, and each decode step's accumulation with
            ``accumulate_attention`` (``cache.timer``; not under CUDA graphs).
        directions: key_dot directions per layer, name -> [n_layers, H_kv, D].
        stack_layers: evict all layers in one call when they have one budget and no per-layer
            directions (False: one call per layer, with per-layer random streams like EvictingCache).
        keep_order: hold the slots in position order (every decode eviction then shifts the rows
            after the first dropped one: half the buffer per evicted token on average). False (the
            default) lets an order-free policy (``dsl.order_free``: KeyDiff, KNorm, TOVA, Q-Filters)
            whose recent windows fit in ``interval`` fill the evicted slots with the newest rows
            instead, moving at most ``interval`` rows per row; the kept tokens are the same (ties
            between exactly equal scores aside, which go to the lower slot, not the earlier token),
            and ``positions()`` / ``last`` still read them in position order.
        attention: how a decoded token attends over the slots: "triton" (tritonkv's split-KV
            decode kernel, which reads the fill on the device and skips the empty slots), "sdpa"
            (PyTorch SDPA over every slot with a mask: its memory-efficient kernel streams all
            slots in B * H_q programs, ~25x the read time at 13K slots on an H200), "auto"
            (triton on CUDA, sdpa elsewhere).
        decode_scores: a policy whose proxy attention is the last query's alone (TOVA:
            ``proxy_attention(window=1)``) takes it, in a decode step's eviction, from the
            logits the decode kernel computed for that very token (integrations/decode_scores.py)
            instead of two more passes over every layer's keys. With the decode kernel
            (``attention`` "triton" / "auto" on CUDA) and the model's softmax scale
            1 / sqrt(D) (the policy's); otherwise, or with False, the policy reads the keys.
            The kept tokens are the same up to float rounding of the normalizer.
        accumulate_attention: H2O as its paper runs it, for a policy whose proxy attention sums
            every query's (``proxy_attention(window=None, causal=True, reduce="sum")``:
            ``policies.h2o()``): each decode step adds the token's attention (from the decode
            kernel's logits, every step) to a per-slot accumulator that moves with the rows, and
            the decode evictions rank it. A forward of several tokens (the prompt, a chunk)
            evicts as the keys path does and sets every held token's accumulator to the
            attention the last ``window`` queries pay it over the held tokens. Without it
            (the default), every eviction recomputes the last ``window`` queries' attention
            over the keys, a different score. Needs the decode kernel (``attention`` "triton" /
            "auto" on CUDA). Ranked by the accumulators, H2O is order-free (its recency half
            ranks the slots' true positions), so its evictions fill the dropped slots too, and
            its two clauses are ranked as one (step_scores.py; ``TRITONKV_H2O_RANK=0``: apart).

    ``capacity`` (per layer) is ``budget + interval``. Beam search works (one host read per step
    to reorder the rows); strategies that change the batch size, cropping (assisted decoding) and
    right padding are refused. Decode steps run eagerly in ``model.generate``; ``graphs.DecodeGraphs``
    (``hf.cuda_graphs``) replays each as one CUDA graph.
    """

    def __init__(self, model, policy, budget, *, interval: int, window: int = 64, seed: int = 0,
                 backend: str = "auto", timing: bool = False,
                 directions: Optional[Mapping[str, torch.Tensor]] = None, stack_layers: bool = True,
                 attention: str = "auto", keep_order: bool = False, decode_scores: bool = True,
                 accumulate_attention: bool = False):
        if policy is None:
            raise ValueError("policy: a StaticEvictingCache needs a policy (use transformers' StaticCache to keep "
                             "everything)")
        if interval is None:
            raise ValueError("interval: expected an int >= 1 (decoded tokens between evictions; the buffer holds "
                             "budget + interval), got None")
        if budget is None:
            raise ValueError("budget: expected tokens per head (an int, or one int per layer), got None")
        self.schedule = schedule = EvictionSchedule(
            model, policy, budget, interval=interval, window=window, seed=seed, backend=backend, timing=timing,
            directions=directions)
        if schedule.policy.heads == "adaptive":
            raise ValueError("policy: an adaptive (AdaKV) policy keeps a different number of tokens per head, which "
                             "a fixed-capacity buffer cannot hold; use a uniform policy, or EvictingCache")
        self.attention = check_attention(attention)
        if not isinstance(stack_layers, bool):
            raise ValueError(f"stack_layers: expected a bool, got {stack_layers!r}")
        if not isinstance(keep_order, bool):
            raise ValueError(f"keep_order: expected a bool, got {keep_order!r}")
        # where decode evictions take the policy's attention from: keys, the step, the steps summed
        self.scoring = scoring = StepScores(schedule.policy, decode_scores=decode_scores,
                                            accumulate=accumulate_attention, attention=self.attention,
                                            device=next(model.parameters()).device)
        # an order-free policy whose recent windows are all among the last `interval` slots may
        # hold its rows in any order: a decode eviction then moves at most `interval` rows per row
        ranked = scoring.ranked
        self.fills_holes = not keep_order and dsl.order_free(ranked) and all(
            isinstance(c.n, int) and c.n <= interval for c in ranked.clauses if isinstance(c, dsl.Recent))
        scoring.use_layout(self.fills_holes)
        budgets = per_layer_ints("budget", budget, schedule)
        self.n_layers, self.policy, self.timer = schedule.n_layers, schedule.policy, schedule.timer
        self.budgets = list(budgets)
        self.capacities = [k + interval for k in budgets]
        self.interval = interval
        self.stacked = stack_layers and len(set(budgets)) == 1 and not schedule.policy.directions
        self.query_window = schedule.query_size(self.capacities[0]) if schedule.query_window else 0
        if schedule.query_window and len({schedule.query_size(c) for c in self.capacities}) > 1:
            raise ValueError("budget: per-layer budgets with a fractional proxy window would need a query window "
                             "per layer; use one budget, or an int proxy window")
        self.paused = False
        self._random = any(isinstance(c, dsl.Sample) for c in schedule.policy.clauses) or any(
            isinstance(n, dsl.Random) for s in schedule.policy.scores for n in dsl.walk(s))
        self._storage: Optional[Storage] = None
        self._indices: Dict[Tuple, torch.Tensor] = {}
        enable(model)
        super().__init__(layers=[StaticEvictingLayer(self, i, budgets[i], self.capacities[i])
                                 for i in range(self.n_layers)])

    # ------------------------------------------------------------------ storage

    def buffer_for(self, layer: StaticEvictingLayer, keys, values) -> LayerBuffer:
        if not self.stacked:
            return LayerBuffer(Storage(1, keys, values, layer.capacity), 0)
        if self._storage is None:
            self._storage = Storage(self.n_layers, keys, values, layer.capacity)
        elif not self._storage.fits(keys, values):
            raise ValueError(f"stack_layers: layer {layer.index}'s keys {tuple(keys.shape)} differ in shape from "
                             "layer 0's; pass stack_layers=False")
        return LayerBuffer(self._storage, layer.index)

    def device_index(self, values: Tuple, device) -> torch.Tensor:
        """A small int64 tensor of host-known indices, made once per value (so a CUDA graph
        capture finds it made by the warm-up step and copies nothing from the host)."""
        key = (values, str(device))
        t = self._indices.get(key)
        if t is None:
            if len(self._indices) > 512:
                self._indices.clear()
            t = torch.tensor(values, dtype=torch.int64)
            if torch.device(device).type == "cuda":   # a pinned source: the copy does not wait for the host
                t = t.pin_memory().to(device, non_blocking=True)
            self._indices[key] = t = t.to(device)
        return t

    def padding(self, mask, b: int, q: int, kv: int) -> List[int]:
        """Pad tokens at the front of each row of a forward of q tokens, from the model's mask
        (bool [B, 1, q, kv], its last q columns the new tokens); one host read."""
        if mask is None:
            return [0] * b
        if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[-1] != kv:
            raise ValueError(f"attention_mask: expected the boolean [B, 1, q, kv={kv}] mask transformers builds from "
                             f"a 2D padding mask, got {mask.dtype} {tuple(mask.shape)}")
        real = mask[:, 0, -1, kv - q:].expand(b, q)
        pads = (~real).sum(-1)
        left = torch.arange(q, device=mask.device)[None] >= pads[:, None]
        if not torch.equal(real, left):
            raise ValueError("attention_mask: expected left padding (every row's pad tokens before its first real "
                             "token); right or inner padding is not supported")
        return pads.tolist()   # a row may have none yet (a prompt chunk of its padding)

    # ------------------------------------------------------------------ decode-step eviction

    def end_of_decode_step(self, run: bool) -> None:
        """After the last layer of a decode step: evict the layers whose buffers are full (all
        layers in one call when stacked). ``run=False`` does only the host bookkeeping (a
        replayed CUDA graph did the device work)."""
        scored = self.scoring.take_scored()
        due = [] if self.paused else [layer for layer in self.layers if layer.filled == layer.capacity]
        if self.accumulates and run:
            # the one-clause ranking of H2O, for the layers that evict at the end of this step
            recent = {layer.index: self.scoring.recent(layer.capacity, layer.budget) for layer in due
                      if self.scoring.ranks}
            with self._timed():   # stacked, every layer's token went to the same slot
                self.scoring.accumulate([(self._storage, range(self.n_layers), self.layers[0]._index, recent.get(0))]
                                        if self.stacked and len(scored) == self.n_layers else
                                        [(self.layers[i].buffer.storage, [self.layers[i].buffer.layer],
                                          self.layers[i]._index, recent.get(i)) for i in sorted(scored)])
        if not due:
            return
        decisions = [layer._decide(None, 0, evict=True) for layer in due]
        if run:
            if self.stacked and len(due) == self.n_layers and all(d.direct for d in decisions) \
                    and len({d.key() for d in decisions}) == 1:
                self._run_stacked(decisions[0], len(scored) == self.n_layers)
            else:
                for layer, decision in zip(due, decisions):
                    buffer = layer.buffer
                    layer._run(decision, buffer.keys, buffer.values, buffer.positions, buffer.queries,
                               scored=layer.index in scored)
        for layer, decision in zip(due, decisions):
            if self.fills_holes and decision.direct:
                layer.ordered = False
            layer._commit(decision)

    @property
    def decode_scores(self) -> bool:
        """Whether decode evictions score TOVA from the step's attention (``decode_scores``)."""
        return self.scoring.decode

    @property
    def accumulates(self) -> bool:
        """Whether decode evictions rank the attention accumulated over the steps (H2O)."""
        return self.scoring.accumulates

    def decode_step_scores(self, layer: StaticEvictingLayer, module, query, key, kwargs):
        """(logits, lse) views for ``layer``'s decode kernel to write in this step, or None
        (:meth:`StepScores.buffers`)."""
        return self.scoring.buffers(layer, module, query, key, kwargs, self.paused)

    def _run_stacked(self, decision: Decision, scored: bool = False) -> None:
        storage = self._storage
        keys, values, positions, queries = storage.stacked(range(self.n_layers))
        (group,) = decision.groups
        if queries is not None:
            queries = queries[:, :, queries.shape[2] - group.available:]
        self.compact(group.plan, 0, self.layers[0].evictions, keys, values, positions, queries,
                     storage.scores(range(self.n_layers)) if scored else None)
        storage.lengths.fill_(decision.fill)
        if any(row.start for layer in self.layers for row in layer.rows):   # else they are 0 already
            storage.starts.zero_()

    def evict(self, plan: EvictionPlan, layer: int, evictions: int, keys, values, positions, queries,
              accumulated=None):
        """One tkv.evict call: the kept keys, values, their positions and (``accumulated``: the
        rows' accumulated attention, which the eviction then ranks) their accumulators."""
        with self._timed():
            seed = self.schedule.layer_seed(layer, evictions)
            out = self.scoring.indices(plan, seed, keys, values, positions, gather=True, accumulated=accumulated)
            if out is None:
                out = self._select(plan.evictor, plan, layer, evictions, keys, values, queries)
            if accumulated is not None:
                accumulated = accumulated.gather(-1, out.indices)
            return out.keys, out.values, positions.gather(-1, out.indices), accumulated

    def compact(self, plan: EvictionPlan, layer: int, evictions: int, keys, values, positions, queries,
                scores=None) -> None:
        """One eviction of buffer slots in place: the kept rows of ``keys``, ``values`` and
        ``positions`` move to the front of each row of slots. In token order (kernels/compact.py:
        each displaced row moves once, no scratch copy of the kept rows), or, when the cache
        ``fills_holes``, in any order (kernels/holes.py: only the kept rows past the budget move,
        into the dropped slots). ``scores``: (logits, lse, signal, rank) of the rows' decode step
        (``Storage.scores``), which the plan's decode form reads instead of the keys; in a cache
        that accumulates attention, ``signal`` holds the accumulators, ranked and moved with
        the rows."""
        with self._timed():
            if self.accumulates and scores is None:
                raise RuntimeError("StaticEvictingCache: a decode eviction of an accumulating cache was run "
                                   "without the layers' accumulators")
            out = self.scoring.indices(plan, self.schedule.layer_seed(layer, evictions), keys, values, positions,
                                       scores)
            if out is None:
                out = self._select(plan.indexer, plan, layer, evictions, keys, values, queries)
            accumulated = scores[2] if self.accumulates else None   # moves with the rows
            if self.fills_holes:
                fill_holes(out.indices, keys, values, positions, accumulated)
                return
            kept = out.indices.shape[-1]
            for t in (positions, accumulated):
                if t is not None:
                    t[:, :, :kept] = t.gather(-1, out.indices)
            compact_in_place(out.indices, keys, values)

    def _select(self, evictor, plan: EvictionPlan, layer: int, evictions: int, keys, values, queries):
        schedule = self.schedule
        return evictor(keys, values, queries=queries if plan.queries else None,
                       seed=schedule.layer_seed(layer, evictions), directions=schedule.layer_directions(layer))

    @contextlib.contextmanager
    def _timed(self):
        """CUDA events around an eviction when the cache times them (``timing=True``)."""
        timer = self.schedule.timer
        if timer is not None:
            timer.start()
        try:
            yield
        finally:
            if timer is not None:
                timer.stop()

    # ------------------------------------------------------------------ what a graph runner needs

    def step_key(self) -> Tuple:
        """Host-known description of the kernels the next decode step launches: equal keys, equal
        launches (a CUDA graph captured for one replays for the other)."""
        due = []
        for layer in self.layers:
            if layer.filled + 1 == layer.capacity and not self.paused:
                probe = _Probe(layer)
                due.append((layer.index, probe.decision_key(), layer.evictions if self._random else None))
        return ("decode", tuple(due))

    def host_state(self):
        return [(layer.filled, layer.seen, layer.evictions, [row.copy() for row in layer.rows]) for layer in self.layers]

    def restore_host_state(self, state) -> None:
        for layer, (filled, seen, evictions, rows) in zip(self.layers, state):
            layer.filled, layer.seen, layer.evictions, layer.rows = filled, seen, evictions, rows

    def advance_host(self) -> None:
        """The host side of one decode step (every layer's counters, and the evictions' facts),
        for a step whose device work a CUDA graph replays."""
        for layer in self.layers:
            layer.seen += 1
            layer._decode_host()
        self.end_of_decode_step(run=False)


class _Probe:
    """What a layer's eviction would decide after one more decoded token, computed on a copy of
    its host facts (nothing of the layer changes)."""

    def __init__(self, layer: StaticEvictingLayer):
        self.layer = layer

    def decision_key(self) -> Tuple:
        layer = self.layer
        filled, rows = layer.filled, [row.copy() for row in layer.rows]
        try:
            layer._decode_host()
            return layer._decide(None, 0, evict=True).key()
        finally:
            layer.filled, layer.rows = filled, rows
