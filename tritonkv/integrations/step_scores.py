"""Where a :class:`~tritonkv.integrations.static.StaticEvictingCache`'s decode evictions take the
attention scores of their policy from (integrations/decode_scores.py rewrites the policies):

  keys         the policy as written: its proxy attention reads the keys at every eviction;
  decode       TOVA (``decode_scores``): the attention of the token the step just decoded, from
               the logits the decode kernel wrote in that step (kernels/attention_signal.py);
  accumulated  H2O (``accumulate_attention``): the attention every decoded token paid each slot,
               summed step by step into a float32 accumulator per slot that moves with the rows.

The cache asks, per decode step and layer, which buffers the decode kernel writes
(``buffers``); after the step's last layer, the accumulation (``accumulate``); per eviction,
the kept indices (``indices``: None where the keys path serves); and after a forward of
several tokens, the accumulators' starting values (``seed``).
"""

from __future__ import annotations

import os
from typing import Set

import torch

from .. import dsl
from ..kernels.attention_signal import attention_signal
from ..kernels.common import interpreting
from ..reference import proxy_attention
from .attention import attention_scale, decode_kernel_runs
from .decode_scores import (POSITIONS, SIGNAL, accumulation_ranked, accumulation_scored,
                            accumulation_scored_by_position, decode_scored, proxy_node, recency_count)
from .schedule import EvictionPlan


class StepScores:
    """The scoring of one cache's decode evictions (see the module's doc)."""

    def __init__(self, policy: dsl.Policy, *, decode_scores: bool, accumulate: bool, attention: str,
                 device: torch.device):
        if not isinstance(decode_scores, bool):
            raise ValueError(f"decode_scores: expected a bool, got {decode_scores!r}")
        if not isinstance(accumulate, bool):
            raise ValueError(f"accumulate_attention: expected a bool, got {accumulate!r}")
        summed = accumulation_scored(policy)
        if accumulate and summed is None:
            raise ValueError(f"accumulate_attention: the policy's proxy attention must sum every query's "
                             f"(proxy_attention(window=None, causal=True, reduce='sum'), one group reduction, no "
                             f"pooling: policies.h2o()); got {policy!r}")
        if accumulate and attention == "sdpa":
            raise ValueError("accumulate_attention: the attention is summed from tritonkv's decode kernel; "
                             "attention='sdpa' does not run it (use 'triton' or 'auto')")
        if accumulate and not (device.type == "cuda" or interpreting()):
            raise ValueError(f"accumulate_attention: the attention is summed from tritonkv's decode kernel, which "
                             f"runs on CUDA (or under TRITON_INTERPRET=1); the model is on {device}")
        self.policy = policy
        self.accumulates = accumulate
        self.decode = decode_scores and not accumulate and decode_scored(policy) is not None
        self.attention = attention
        self.group_reduce = summed[1] if summed is not None else None   # how the accumulators sum query heads
        # what the decode evictions rank: accumulated H2O ranks its recency half by true positions
        self.ranked = accumulation_scored_by_position(policy)[0] if accumulate else policy
        self._form = accumulation_scored
        self.ranks = False   # whether decode evictions rank H2O in one clause (accumulation_ranked)
        self.scored: Set[int] = set()   # layers whose decode kernel wrote this step's scores

    def use_layout(self, fills_holes: bool) -> None:
        """The cache's slot layout: out of position order, H2O's recency clause reads positions,
        and (``TRITONKV_H2O_RANK=0``: not) the two clauses are ranked as one: the step's
        accumulation writes +inf over the newest positions beside the accumulators, so a decode
        eviction runs one selection, not one per clause. In position order the recency clause is
        a window already, which costs no selection."""
        self._form = accumulation_scored_by_position if fills_holes and self.accumulates else accumulation_scored
        self.ranks = (fills_holes and self.accumulates and accumulation_ranked(self.policy) is not None
                      and os.environ.get("TRITONKV_H2O_RANK") != "0")

    def recent(self, capacity: int, budget: int) -> int:
        """The newest positions the one-clause ranking puts first when ``capacity`` slots are
        evicted to ``budget``: the recency clause's count."""
        return recency_count(self.ranked, capacity, budget)

    def buffers(self, layer, module, query, key, kwargs, paused: bool):
        """(logits, lse) views for ``layer``'s decode kernel to write in this step: where the step
        ends with an eviction scored from them (decode), or in every step (accumulated); else None."""
        if self.accumulates:
            if not decode_kernel_runs(module, key, kwargs, self.attention):
                raise RuntimeError(
                    "accumulate_attention: this decode step's attention is not tritonkv's decode kernel (it runs "
                    "on CUDA, or under TRITON_INTERPRET=1, for models without dropout, soft-capping, sliding "
                    "windows or attention sinks), so there is no attention to accumulate")
        elif not self.decode or paused or layer.filled != layer.capacity \
                or not decode_kernel_runs(module, key, kwargs, self.attention) \
                or attention_scale(query, kwargs) != query.shape[-1] ** -0.5:
            return None
        storage, index = layer.buffer.storage, layer.buffer.layer
        storage.allocate_scores(query, rank=self.ranks)
        self.scored.add(layer.index)
        return storage.logits[index], storage.lse[index]

    def take_scored(self) -> Set[int]:
        """The layers scored in this step (and a fresh set for the next)."""
        scored, self.scored = self.scored, set()
        return scored

    def accumulate(self, units) -> None:
        """Add this step's attention to the accumulators: ``units`` are (storage, layers, slot,
        recent), the slot the step's token was written to in those layers (a device index, the
        same in every layer of stacked storage), which starts from 0, and (None: not in this
        step) the ``recent`` count of the one-clause ranking, written for the eviction that ends
        the step; one launch each (all layers of stacked storage in one unit)."""
        for storage, layers, slot, recent in units:
            logits, lse, signal, rank = storage.scores(layers)
            ranked = dict(rank=rank, positions=storage.stacked(layers)[2], recent=recent) if recent is not None else {}
            attention_signal(logits, lse, logits.shape[1] // signal.shape[1], self.group_reduce, out=signal,
                             accumulate=True, fresh=slot, **ranked)

    def seed(self, layer, device_index) -> None:
        """After a forward of several tokens, each held token's accumulator is the attention the
        row's last real queries (at most the query window) pay it over the row's held tokens:
        the policy's proxy attention, as the keys path scores it. Rows that hold their tokens
        from the same slot with as many queries go in one call (``device_index``: the cache's
        host-known index tensors)."""
        buffer, fill = layer.buffer, layer.filled
        acc = buffer.accumulated
        acc.zero_()
        node = proxy_node(self.policy)
        groups = {}
        for b, row in enumerate(layer.rows):
            count = min(row.queries, fill - row.start)
            if count:
                groups.setdefault((row.start, count), []).append(b)
        window = buffer.queries.shape[2]
        for (start, count), rows in groups.items():
            index = device_index(tuple(rows), acc.device)
            keys, values = (t.index_select(0, index)[:, :, start:fill] for t in (buffer.keys, buffer.values))
            queries = buffer.queries.index_select(0, index)[:, :, window - count:]
            acc[index, :, start:fill] = proxy_scores(node, keys, values, queries)

    def indices(self, plan: EvictionPlan, seed: int, keys, values, positions, scores=None, gather: bool = False,
                accumulated=None):
        """The eviction of ``keys`` / ``values`` scored from this step (``scores``: (logits, lse,
        signal) of ``Storage.scores``; ``accumulated``: the rows' accumulators, for rows gathered
        out of the buffer), as the Evictor's result; None where the plan's keys path serves (no
        scores; a plan without the proxy attention, as for too few rows for its window)."""
        if self.accumulates:
            if self.ranks and accumulated is None and scores is not None and scores[3] is not None:   # written
                form = plan.signal_form(accumulation_ranked, gather=gather)
                if form is not None:
                    return form[0](keys, values, seed=seed, signals={SIGNAL: scores[3]})
            signal = accumulated if accumulated is not None else (None if scores is None else scores[2])
            form = None if signal is None else plan.signal_form(self._form, gather=gather)
            if form is None:
                return None
            signals = {SIGNAL: signal}
            if POSITIONS in form[0].policy.signals:
                signals[POSITIONS] = positions
            return form[0](keys, values, seed=seed, signals=signals)
        decode = plan.decode_indexer if self.decode and scores is not None and not gather else None
        if decode is None:
            return None
        indexer, how = decode
        logits, lse, signal, _ = scores
        attention_signal(logits, lse, logits.shape[1] // signal.shape[1], how, out=signal)
        return indexer(keys, values, seed=seed, signals={SIGNAL: signal})


def proxy_scores(node: dsl.ProxyAttention, keys, values, queries) -> torch.Tensor:
    """float32 [B, H_kv, N]: ``node``'s score of ``keys`` [B, H_kv, N, D] for the proxy
    ``queries`` [B, H_q, W, D] (``reference.proxy_attention``), by the compiled kernels where
    they run (CUDA, Triton's interpreter), else by the reference."""
    from ..compiler import compile_policy, score   # imports triton only when asked for

    b, h, n, _ = keys.shape
    if keys.is_cuda or interpreting():
        return score(compile_policy(dsl.as_policy(dsl.top(node))), keys, values, queries, 0)[0].view(b, h, n)
    return proxy_attention(node, keys.float(), queries.float())
