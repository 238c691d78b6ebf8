"""One layer of :class:`~tritonkv.integrations.static.StaticEvictingCache`: what transformers
calls on a cache layer (``update``, the mask sizes, beam reordering, the attention hook), over
the layer's fixed buffer (buffer.LayerBuffer), and the device side of its evictions' decisions
(rows.py decides where each row's tokens go; the cache runs the evictions themselves)."""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch

from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..reference import gather_rows
from ..results import Evicted
from .attention import attend_slots, decode_kernel_runs, expect
from .buffer import LayerBuffer, copy_slots
from .rows import Decision, Row, commit, decide, flat

if TYPE_CHECKING:
    from .static import StaticEvictingCache


class StaticEvictingLayer(CacheLayerMixin):
    """One attention layer of a :class:`StaticEvictingCache`: ``capacity`` slots per (row, head)."""

    is_compileable = False   # decode steps run as CUDA graphs through graphs.DecodeGraphs, not torch.compile
    is_sliding = False
    is_croppable = False

    def __init__(self, cache: "StaticEvictingCache", index: int, budget: int, capacity: int):
        super().__init__()
        self.cache, self.index, self.budget, self.capacity = cache, index, budget, capacity
        self.buffer: Optional[LayerBuffer] = None
        self.filled = 0              # slots written (host mirror of buffer.length)
        self.seen = 0                # tokens given, padding included (what positions are counted from)
        self.evictions = 0
        self.rows: List[Row] = []
        self._new = None             # the new keys / values of a forward of several tokens
        self._index = None           # the slots a decoded token was written to
        self.ordered = True          # the held slots are in position order (see StaticEvictingCache.fills_holes)

    # ------------------------------------------------------------------ transformers' layer API

    def lazy_initialization(self, key_states, value_states) -> None:
        self.buffer = self.cache.buffer_for(self, key_states, value_states)
        self.rows = [Row() for _ in range(key_states.shape[0])]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != len(self.rows):
            raise ValueError(f"key_states: the cache holds {len(self.rows)} batch rows, got {key_states.shape[0]}; "
                             "a StaticEvictingCache serves one batch (make a new one per generate call)")
        q = key_states.shape[2]
        if q > 1:
            self._restore_order()
        self.seen += q
        if q == 1:
            self._decode_host()
            self._index = self.buffer.write(key_states, value_states)
            keys, values = self.buffer.keys, self.buffer.values
        else:
            self._new = (key_states, value_states)
            keys, values = key_states, value_states
            if self.filled:
                keys = torch.cat([self.buffer.keys[:, :, :self.filled], key_states], dim=2)
                values = torch.cat([self.buffer.values[:, :, :self.filled], value_states], dim=2)
        expect(self, keys)
        return keys, values

    def _decode_host(self) -> None:
        """The host side of writing one decoded token (what a replayed CUDA graph skips)."""
        if self.filled >= self.capacity:
            raise RuntimeError(f"StaticEvictingCache: layer {self.index} is full ({self.capacity} slots) and "
                               "evictions are paused; a paused forward must leave room for the next token")
        self.filled += 1
        window = self.cache.query_window
        for row in self.rows:
            row.seen += 1
            row.suffix += 1
            row.queries = min(window, row.queries + 1)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1   # positions are not bounded by the capacity

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        # the held slots + the new tokens; the first stands for position seen - filled, so the
        # mask's last query_length columns are the new tokens' padding (read by _attend_many)
        return self.filled + query_length, self.seen - self.filled

    @property
    def held(self) -> int:
        """Slots occupied in the buffer (the same for every row; empty ones of short rows included)."""
        return self.filled

    def _slot_positions(self) -> torch.Tensor:
        """int64 [B, H_kv, held]: the position each held slot holds; -1 for a row's empty slots."""
        buffer = self.buffer
        pos = buffer.positions[:, :, :self.filled]
        empty = buffer.slots[:self.filled] < buffer.start[:, None]
        return pos.masked_fill(empty[:, None, :], -1)

    def _order(self, slot_positions: torch.Tensor) -> Optional[torch.Tensor]:
        """The held slots in position order [B, H_kv, held] (empty ones first); None when they are."""
        return None if self.ordered else slot_positions.argsort(dim=-1, stable=True)

    def positions(self) -> torch.Tensor:
        """int64 [B, H_kv, held]: the true positions of the held rows, ascending; -1 for a row's
        empty slots (first)."""
        pos = self._slot_positions()
        order = self._order(pos)
        return pos if order is None else pos.gather(-1, order)

    @property
    def last(self) -> Optional[Evicted]:
        """The rows kept, as an Evicted whose indices are positions (-1: a short row's empty slots)."""
        if not self.is_initialized:
            return None
        keys, values = self.buffer.keys[:, :, :self.filled], self.buffer.values[:, :, :self.filled]
        pos = self._slot_positions()
        order = self._order(pos)
        if order is not None:
            keys, values, pos = gather_rows(keys, order), gather_rows(values, order), pos.gather(-1, order)
        return Evicted(keys, values, pos)

    def _restore_order(self) -> None:
        """Put the held slots back in position order (before a forward of several tokens, whose
        eviction windows look at the first / last rows)."""
        if not self.ordered:
            order = self._order(self._slot_positions())
            buffer, n = self.buffer, self.filled
            for t in (buffer.keys, buffer.values):
                copy_slots(t[:, :, :n], gather_rows(t[:, :, :n], order))
            for t in (buffer.positions, buffer.accumulated):
                if t is not None:
                    t[:, :, :n].copy_(t[:, :, :n].gather(-1, order))
        self.ordered = True

    @property
    def queries(self) -> Optional[torch.Tensor]:
        return None if self.buffer is None else self.buffer.queries

    def tokens(self) -> int:
        """Tokens held over all batch rows and heads."""
        if not self.is_initialized:
            return 0
        return self.buffer.keys.shape[1] * sum(self.filled - row.start for row in self.rows)

    def reset(self) -> None:
        """Empty the layer (the buffers stay allocated), for another generation of the same batch size."""
        if self.is_initialized:
            self.buffer.length.zero_()
            self.buffer.start.zero_()
            self.rows = [Row() for _ in self.rows]
        self.filled = self.seen = self.evictions = 0
        self.ordered = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        order = beam_idx.tolist()   # beam search: one host read per step, outside any graph
        buffer = self.buffer
        index = beam_idx.to(buffer.keys.device)
        for t in (buffer.keys, buffer.values, buffer.positions, buffer.start, buffer.queries, buffer.accumulated):
            if t is not None:
                t.copy_(t.index_select(0, index))
        self.rows = [self.rows[i].copy() for i in order]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse_resize()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse_resize()

    def _refuse_resize(self) -> None:
        if self.is_initialized:
            raise NotImplementedError("a StaticEvictingCache has a fixed batch size; this decoding strategy "
                                      "changes it (use EvictingCache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a StaticEvictingCache cannot be cropped (evicted tokens cannot be restored): "
                                  "assisted / speculative decoding is not supported")

    # ------------------------------------------------------------------ attention

    def attend(self, module, query, key, value, attention_mask, kwargs):
        if query.shape[2] == 1:
            return self._attend_one(module, query, key, value, kwargs)
        return self._attend_many(module, query, key, value, attention_mask, kwargs)

    def _attend_one(self, module, query, key, value, kwargs):
        """A decode step: every slot, the empty ones masked; nothing here reads a GPU value."""
        cache, buffer = self.cache, self.buffer
        positions = kwargs.get("position_ids")
        if positions is None:   # models that do not pass them: the host count (not graph-safe with padding)
            positions = torch.tensor([[row.seen - 1] for row in self.rows], device=key.device)
        buffer.write_positions(self._index, positions.expand(key.shape[0], -1))
        if cache.query_window:
            buffer.push_queries(query.detach())
        scores = cache.decode_step_scores(self, module, query, key, kwargs)
        out = attend_slots(module, query, key, value, buffer.start, buffer.length, buffer.visible, kwargs,
                           cache.attention, scores)
        if self.index == cache.n_layers - 1:
            cache.end_of_decode_step(run=True)
        return out

    def _attend_many(self, module, query, key, value, attention_mask, kwargs):
        """A prompt (chunk): attention over the held rows and the new tokens, then every row's
        real tokens into the buffer, evicted to the budget where a row has more."""
        cache, buffer = self.cache, self.buffer
        b, q = query.shape[0], query.shape[2]
        new_keys, new_values = self._new
        self._new = None
        pads = cache.padding(attention_mask, b, q, key.shape[2])
        for row, pad in zip(self.rows, pads):
            if pad and row.seen:
                raise ValueError("attention_mask: padding after a row's first real token; a StaticEvictingCache "
                                 "takes left-padded batches (pads before every real token)")
        if self.filled == 0:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        else:
            out, _ = sdpa_attention_forward(module, query, key, value, self._many_mask(pads, q), **kwargs)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(self.seen - q, self.seen, device=key.device)[None]
        positions = positions.expand(b, -1).to(torch.int64)
        h = new_keys.shape[1]
        sources = torch.cat([buffer.positions[:, :, :self.filled], positions[:, None, :].expand(b, h, -1)], dim=2)
        queries = None
        if (cache.decode_scores or cache.accumulates) and decode_kernel_runs(module, key, kwargs, cache.attention):
            buffer.storage.allocate_scores(query, rank=cache.scoring.ranks)   # before any CUDA graph capture
        if cache.query_window:
            buffer.storage.allocate_queries(query, cache.query_window)
            queries = torch.cat([buffer.queries, query.detach()], dim=2)
        for row, pad in zip(self.rows, pads):
            row.seen += q - pad
            row.suffix += q - pad
        decision = self._decide(pads, q, evict=not cache.paused)
        self._run(decision, key, value, sources, queries)
        self._commit(decision, queries_added=[q - pad for pad in pads])
        if cache.accumulates and buffer.accumulated is not None:
            cache.scoring.seed(self, cache.device_index)
        return out

    def _many_mask(self, pads: Sequence[int], q: int) -> torch.Tensor:
        """bool [B, 1, q, held + q]: every held slot of the row, the new real tokens causally
        (a pad query sees itself, so that no row of the softmax is empty)."""
        buffer, device = self.buffer, self.buffer.keys.device
        held = (buffer.slots[:self.filled] >= buffer.start[:, None])[:, None, :].expand(-1, q, -1)
        first = torch.tensor(pads, device=device)[:, None, None]
        ar = torch.arange(q, device=device)
        new = (ar[None, :, None] >= ar[None, None, :]) & (ar[None, None, :] >= first)
        new = new | torch.eye(q, dtype=torch.bool, device=device)[None]
        return torch.cat([held, new], dim=2)[:, None]

    # ------------------------------------------------------------------ eviction: host decisions

    def _decide(self, pads: Optional[Sequence[int]], q: int, evict: bool) -> Decision:
        return decide(self, pads, q, evict)

    def _commit(self, decision: Decision, queries_added: Optional[Sequence[int]] = None) -> None:
        commit(self, decision, queries_added)

    # ------------------------------------------------------------------ eviction: device work

    def _run(self, decision: Decision, keys, values, positions, queries, scored: bool = False) -> None:
        """The device side of a decision: ``keys`` / ``values`` [B, H_kv, n, D], ``positions``
        [B, H_kv, n] and ``queries`` [B, H_q, m, D] are the sources its slots index. ``scored``:
        this decode step's kernel wrote the layer's attention scores (read by an in-place
        eviction of every row, the only one whose slots they cover)."""
        cache, buffer = self.cache, self.buffer
        fill = decision.fill
        # a decode eviction of an accumulating cache ranks the rows' accumulated attention
        accumulated = buffer.accumulated if cache.accumulates and scored else None
        for group in decision.groups:
            a = accumulated
            if decision.direct:
                k, v, p = keys, values, positions
                qs = None if queries is None else queries[:, :, queries.shape[2] - group.available:]
            else:
                rows = cache.device_index(group.rows, keys.device)
                slots = cache.device_index(tuple(flat(decision.sources[b]) for b in group.rows), keys.device)
                k, v, p = (_take(t.index_select(0, rows), slots) for t in (keys, values, positions))
                a = None if a is None else _take(a.index_select(0, rows), slots)
                qs = None
                if queries is not None and group.available:
                    qslots = cache.device_index(tuple(flat(decision.query_sources[b]) for b in group.rows),
                                                keys.device)
                    qs = _take(queries.index_select(0, rows), qslots)
            lo = fill - group.kept
            if group.plan is not None and decision.direct and lo == 0 and keys is buffer.keys:
                scores = buffer.storage.scores([buffer.layer]) if scored else None
                cache.compact(group.plan, self.index, self.evictions, keys, values, positions, qs, scores)
                continue
            if group.plan is not None:
                k, v, p, a = cache.evict(group.plan, self.index, self.evictions, k, v, p, qs, a)
            if decision.direct:
                copy_slots(buffer.keys[:, :, lo:fill], k)
                copy_slots(buffer.values[:, :, lo:fill], v)
                buffer.positions[:, :, lo:fill].copy_(p)
                if a is not None:
                    accumulated[:, :, lo:fill] = a.clone()   # a may be a view of the slots it lands on
            else:
                rows = cache.device_index(group.rows, keys.device)
                buffer.keys[rows, :, lo:fill] = k
                buffer.values[rows, :, lo:fill] = v
                buffer.positions[rows, :, lo:fill] = p
                if a is not None:
                    accumulated[rows, :, lo:fill] = a
        if queries is not None:
            self._store_queries(decision, queries)
        buffer.length.fill_(fill)
        starts = [fill - g.kept for g in decision.groups for _ in g.rows]
        if all(s == 0 for s in starts):
            buffer.start.zero_()
        else:
            order = [b for g in decision.groups for b in g.rows]
            buffer.start.copy_(cache.device_index(tuple(s for _, s in sorted(zip(order, starts))), keys.device))

    def _store_queries(self, decision: Decision, queries: torch.Tensor) -> None:
        """The last W real queries of every row into the query window (right-aligned; a row with
        fewer repeats its first, which no eviction reads)."""
        window = self.cache.query_window
        if queries.shape[2] == window:   # a decode step: the window is already in place
            return
        lasts = []
        for b, row in enumerate(self.rows):
            real = tuple(range(window - row.queries, window)) + tuple(
                s - self.filled + window for s in decision.sources[b][1])
            real = real[-window:] or (window - 1,)
            lasts.append((real[0],) * (window - len(real)) + real)
        index = self.cache.device_index(tuple(lasts), queries.device)
        self.buffer.queries.copy_(_take(queries, index))


def _take(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows ``slots`` [G, n] (one list per batch row) of ``t`` [G, H, N, ...] -> [G, H, n, ...]."""
    g, h = t.shape[:2]
    index = slots[:, None, :].expand(g, h, -1)
    if t.ndim == 4:
        index = index[..., None].expand(-1, -1, -1, t.shape[-1])
    return t.gather(2, index)
