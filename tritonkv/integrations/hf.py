"""Compress the KV cache of a Hugging Face transformers causal LM with a tritonkv policy.

The cache object does the work, inside ``model.generate`` (any decoding strategy):

    from tritonkv.integrations import hf
    cache = hf.EvictingCache(model, tkv.policies.snapkv(), budget=0.25, interval=64, target=0.25)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=256)

See :class:`tritonkv.integrations.cache.EvictingCache`; :class:`~tritonkv.integrations.static.StaticEvictingCache`
is the fixed-capacity layout (constant shapes while decoding, left-padded batches), whose decode
steps ``cuda_graphs(model, cache)`` replays as CUDA graphs. The helpers below are a small greedy
loop on top of it, for evaluations that compress a context and then ask about it:

    state = hf.prefill(model, input_ids, tkv.policies.snapkv(), budget=0.25)   # prefill + evict
    state = hf.extend(model, state, question_ids)                              # no eviction
    tokens = hf.generate(model, state, max_new_tokens=16)                       # greedy decoding
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from .. import dsl
from ..budget import pyramid_budgets, resolve_budget
from .cache import ATTENTION, EvictingCache, EvictingLayer, EvictionTimer, enable
from .graphs import DecodeGraphs, cuda_graphs
from .static import StaticEvictingCache, StaticEvictingLayer

__all__ = ["EvictingCache", "EvictingLayer", "EvictionTimer", "StaticEvictingCache", "StaticEvictingLayer",
           "DecodeGraphs", "cuda_graphs", "Prefilled", "enable", "prefill", "extend", "decode", "generate",
           "layer_budgets", "ATTENTION"]


@dataclass
class Prefilled:
    """A compressed cache, ready to decode from."""

    cache: EvictingCache
    position: int                         # true position of the next token
    logits: torch.Tensor                  # [B, vocab] of the last token fed
    kept: List = field(default_factory=list)   # per layer: Evicted / EvictedVarlen of its last eviction
                                               # (indices = positions in the whole sequence)

    def cache_tokens(self) -> int:
        """Tokens held over all layers, batch rows and heads."""
        return self.cache.tokens()


def layer_budgets(policy: dsl.Policy, budget, n: int, n_layers: int,
                  explicit: Optional[Sequence] = None) -> List[int]:
    """Tokens per head for each layer: explicit, PyramidKV's schedule, or the same for all."""
    if explicit is not None:
        if len(explicit) != n_layers:
            raise ValueError(f"layer_budgets: expected {n_layers} entries (one per layer), got {len(explicit)}")
        return [resolve_budget(b, n) for b in explicit]
    k = resolve_budget(budget, n)
    if policy.layers == "pyramid":
        return [min(n, b) for b in pyramid_budgets(k, n_layers, policy.pyramid_beta)]
    return [k] * n_layers


def _forward(model, state: Prefilled, input_ids: torch.Tensor) -> None:
    out = model(input_ids=input_ids, past_key_values=state.cache, use_cache=True, logits_to_keep=1)
    state.position += input_ids.shape[1]
    state.logits = out.logits[:, -1].float()
    state.kept = [layer.last for layer in state.cache.layers]


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, policy=None, budget=None, *, window: int = 64,
            chunk_size: Optional[int] = None, layer_budgets_: Optional[Sequence] = None, seed: int = 0,
            backend: str = "auto", interval: Optional[int] = None, target=None, directions=None,
            reuse_layers: int = 1) -> Prefilled:
    """Run the prompt through the model and compress its KV cache with ``policy``.

    Args:
        input_ids: [B, N] prompt (no padding).
        policy, budget: what to keep and how much (tokens per head per layer, or a fraction of
            the tokens seen). ``policy=None`` keeps the full cache.
        window: proxy queries recorded for policies whose proxy_attention has window=None.
        chunk_size: None — one forward, then one eviction per layer; C — chunked prefill,
            evicting back to the budget after every chunk of C tokens, so a layer never holds
            more than budget + C tokens.
        layer_budgets_: explicit per-layer budgets (overrides ``budget`` and PyramidKV).
        interval, target: decoding-time eviction in ``generate`` (see EvictingCache).
        directions, reuse_layers: per-layer key_dot directions and ChunkKV's layer-wise
            index reuse (see EvictingCache).
    """
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if layer_budgets_ is not None:
        if len(layer_budgets_) != n_layers:
            raise ValueError(f"layer_budgets: expected {n_layers} entries (one per layer), got {len(layer_budgets_)}")
        budget = list(layer_budgets_)
    policy = None if policy is None else dsl.as_policy(policy)
    if chunk_size is not None and policy is not None and policy.heads == "adaptive":
        raise ValueError("chunk_size: chunked prefill keeps a uniform budget per head; adaptive (AdaKV) "
                         "policies evict once, after the whole prompt")
    cache = EvictingCache(model, policy, budget if policy is not None else None, window=window, seed=seed,
                          backend=backend, interval=interval, target=target, directions=directions,
                          reuse_layers=reuse_layers)
    state = Prefilled(cache, 0, None)
    n = input_ids.shape[1]
    step = n if chunk_size is None or policy is None else chunk_size
    for start in range(0, n, step):
        _forward(model, state, input_ids[:, start:start + step])
    return state


@torch.no_grad()
def extend(model, state: Prefilled, input_ids: torch.Tensor) -> Prefilled:
    """Append tokens [B, T] after the compressed cache in one forward (e.g. a question asked
    once the context is compressed); nothing is evicted. Returns ``state``, whose logits now
    follow the last token."""
    if input_ids.ndim != 2 or input_ids.shape[0] != state.logits.shape[0]:
        raise ValueError(f"input_ids: expected [B={state.logits.shape[0]}, T], got {tuple(input_ids.shape)}")
    with state.cache.pause():
        _forward(model, state, input_ids)
    return state


@torch.no_grad()
def decode(model, state: Prefilled, input_ids: torch.Tensor) -> Prefilled:
    """Feed known tokens [B, T] one forward each, as decoding does, so a cache built with an
    ``interval`` evicts while they go in (a continuation teacher-forced into the cache)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != state.logits.shape[0]:
        raise ValueError(f"input_ids: expected [B={state.logits.shape[0]}, T], got {tuple(input_ids.shape)}")
    for t in range(input_ids.shape[1]):
        _forward(model, state, input_ids[:, t:t + 1])
    return state


@torch.no_grad()
def generate(model, state: Prefilled, max_new_tokens: int, eos_token_id: Optional[int] = None) -> torch.Tensor:
    """Greedy decoding from a compressed cache, at the true positions (the cache evicts while
    decoding if it was built with an ``interval``). Returns [B, T] tokens."""
    tokens = []
    for _ in range(max_new_tokens):
        next_token = state.logits.argmax(-1)
        tokens.append(next_token)
        if eos_token_id is not None and bool((next_token == eos_token_id).all()):
            break
        _forward(model, state, next_token[:, None])
    return torch.stack(tokens, dim=1)
