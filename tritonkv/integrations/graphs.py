"""Decode steps of a :class:`~tritonkv.integrations.static.StaticEvictingCache` as CUDA graphs.

    cache = hf.StaticEvictingCache(model, tkv.policies.snapkv(), budget=2048, interval=64)
    with hf.cuda_graphs(model, cache):
        out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=512)

A decode step of that cache launches the same kernels with the same arguments whatever its
fill (the write slot and the attention mask come from device-side counters), except the step
that fills the buffers and evicts. So a few graphs serve a whole generation: one per *kind* of
step (``cache.step_key()``: a plain step; the evicting step, with the host-known facts its
eviction depends on), each captured after ``warmup`` eager steps of that kind and replayed
after. The forward, the cache writes and the eviction (tkv.evict never synchronizes with the
host) are one graph replay; the host only advances the cache's counters (``advance_host``).

Policies with random draws capture one evicting graph per eviction (the seed is a kernel
argument); the prompt forward always runs eagerly.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Dict, Tuple

import torch

from .static import StaticEvictingCache


class DecodeGraphs:
    """One CUDA graph per kind of decode step of ``cache`` (``model(input_ids [B, 1],
    position_ids [B, 1])`` -> logits [B, 1, vocab], a buffer the next replay overwrites)."""

    def __init__(self, model, cache: StaticEvictingCache, *, warmup: int = 1, forward=None):
        if not isinstance(cache, StaticEvictingCache):
            raise TypeError(f"cache: expected a StaticEvictingCache (fixed shapes), got {type(cache).__name__}")
        if cache.timer is not None:
            raise ValueError("cache: timing=True records events on the host at every eviction, which a replayed "
                             "graph skips; time replays with CUDA events around the step instead")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup: expected an int >= 1 (eager steps of a kind before its capture), got {warmup!r}")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.forward = forward   # the forward to run (default: model(...)); cuda_graphs passes the unpatched one
        self.graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.eager = Counter()
        self.replays = 0
        self._inputs = None

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"input_ids: expected one token per row [B, 1], got {tuple(input_ids.shape)}")
        if not input_ids.is_cuda:
            raise ValueError("input_ids: CUDA graphs need CUDA tensors (on the CPU, call the model)")
        position_ids = position_ids.expand(input_ids.shape[0], 1)
        key = self.cache.step_key()
        graph = self.graphs.get(key)
        if graph is None:
            if self.eager[key] < self.warmup:
                self.eager[key] += 1
                return self._warm(input_ids, position_ids)
            graph = self.graphs[key] = self._capture(input_ids, position_ids)
        ids, positions = self._inputs
        ids.copy_(input_ids)
        positions.copy_(position_ids)
        self.cache.advance_host()
        graph[0].replay()
        self.replays += 1
        return graph[1]

    def _warm(self, input_ids, position_ids):
        """An eager step on a side stream (as torch.cuda.graph's warm-up advice: lazy library
        state is created outside the capture)."""
        stream, current = torch.cuda.Stream(), torch.cuda.current_stream()
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            logits = self._forward(input_ids, position_ids)
        current.wait_stream(stream)
        return logits

    def _forward(self, input_ids, position_ids):
        call = self.model if self.forward is None else self.forward
        return call(input_ids=input_ids, position_ids=position_ids, past_key_values=self.cache,
                    use_cache=True, logits_to_keep=1).logits

    def _capture(self, input_ids, position_ids):
        if self._inputs is None or self._inputs[0].shape != input_ids.shape:
            self._inputs = (input_ids.clone(), position_ids.clone())
        ids, positions = self._inputs
        ids.copy_(input_ids)
        positions.copy_(position_ids)
        state = self.cache.host_state()   # capturing runs the host side once; the replay runs it again
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):   # a pool per graph: they replay in any order
                logits = self._forward(ids, positions)
        finally:
            self.cache.restore_host_state(state)
        return graph, logits


@contextlib.contextmanager
def cuda_graphs(model, cache: StaticEvictingCache, *, warmup: int = 1):
    """``model.generate`` (and direct calls) run the decode steps that feed ``cache`` as
    :class:`DecodeGraphs` replays while in the block; prompt forwards run as usual. Yields the
    DecodeGraphs (``.replays``, ``.graphs``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    forward = model.forward
    # the runner calls the model's own forward: through model(...) it would come back into
    # `graphed` and start a capture inside its own warm-up or capture
    runner = DecodeGraphs(model, cache, warmup=warmup, forward=forward)

    def graphed(input_ids=None, *args, past_key_values=None, position_ids=None, **kwargs):
        extra = kwargs.get("inputs_embeds") is not None or bool(kwargs.get("output_attentions")) \
            or bool(kwargs.get("output_hidden_states"))
        if (past_key_values is cache and input_ids is not None and input_ids.shape[1] == 1 and input_ids.is_cuda
                and position_ids is not None and not args and not extra):
            logits = runner(input_ids, position_ids)
            return CausalLMOutputWithPast(logits=logits, past_key_values=cache)
        return forward(input_ids, *args, past_key_values=past_key_values, position_ids=position_ids, **kwargs)

    own = model.__dict__.get("forward")   # an instance-level forward (hooks) to put back
    model.forward = graphed
    try:
        yield runner
    finally:
        if own is None:
            del model.forward   # the class's forward again
        else:
            model.forward = own
