"""Compress the KV cache of a Hugging Face transformers causal LM with a tritonkv policy.

    from tritonkv.integrations import hf
    state = hf.prefill(model, input_ids, tkv.policies.snapkv(), budget=0.25)   # prefill + evict
    tokens = hf.generate(model, state, max_new_tokens=16)                       # decode on it

How it works, for any model whose attention goes through transformers' attention interface
and standard cache classes (Llama, Mistral, Qwen2, ...):
  - ``enable(model)`` switches the model to the "tritonkv_sdpa" attention: PyTorch SDPA, plus
    (while a prefill asks for it) a record of the last W queries of each layer, after RoPE —
    the proxy queries that attention-based scores need;
  - after prefill, every layer's keys and values are evicted with ``tritonkv.evict``; per-layer
    budgets (PyramidKV: ``policy.pyramid()`` or ``layer_budgets=``) give layers different lengths;
  - ``chunk_size=C`` is a real chunked prefill (KeyDiff's block-wise mode): the prompt goes
    through the model C tokens at a time and the cache is evicted back to the budget after
    each chunk, so it never holds more than budget + C tokens per layer;
  - decoding continues at the true positions (RoPE sees position N + t, not the shorter
    cache length): ``generate`` passes position_ids itself;
  - adaptive (AdaKV) policies keep a different number of tokens per head: such a layer is
    stored packed (``VarlenLayer``: no padding, per-head offsets) and decoding attends over it
    with a segment softmax, merged with the new tokens' dense keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

try:
    from transformers import AttentionInterface, DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover
    raise ImportError("tritonkv.integrations.hf needs transformers: pip install 'tritonkv[hf]'") from e

from .. import api, dsl
from ..budget import pyramid_budgets, resolve_budget
from ..reference import proxy_window

ATTENTION = "tritonkv_sdpa"


class _Recorder:
    """Where the attention function stores proxy queries while a prefill asks for them."""

    window: int = 0
    queries: Dict[int, torch.Tensor] = {}


_RECORDER = _Recorder()
_REGISTERED = False


def _attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA that records proxy queries and knows packed (AdaKV) layers."""
    if _RECORDER.window:
        recent = query[:, :, -_RECORDER.window:, :].detach()
        previous = _RECORDER.queries.get(module.layer_idx)
        if previous is not None:   # chunked prefill: keep the last W over chunks
            recent = torch.cat([previous, recent], dim=2)[:, :, -_RECORDER.window:, :]
        _RECORDER.queries[module.layer_idx] = recent
    cache = kwargs.get("tritonkv_cache")
    if cache is not None and isinstance(cache.layers[module.layer_idx], VarlenLayer):
        layer = cache.layers[module.layer_idx]
        return layer.attend(query, key, value, kwargs.get("scaling") or module.scaling), None
    kwargs.pop("tritonkv_cache", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def enable(model) -> None:
    """Route the model's attention through tritonkv's (SDPA + proxy-query capture)."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        _REGISTERED = True
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


# --------------------------------------------------------------------------- packed layers


class VarlenLayer(DynamicLayer):
    """A cache layer whose evicted prefix keeps a different number of tokens per KV head,
    packed head after head (tritonkv.EvictedVarlen), followed by the tokens decoded since,
    which every head keeps (dense [B, H, t, D])."""

    is_compileable = False
    is_croppable = False

    def __init__(self, evicted: api.EvictedVarlen, heads: int):
        super().__init__()
        self.is_initialized = True
        self.packed_keys, self.packed_values = evicted.keys, evicted.values
        self.lengths = evicted.lengths                               # [B, H]
        b = self.lengths.shape[0]
        self.segment = torch.repeat_interleave(torch.arange(b * heads, device=self.lengths.device),
                                               self.lengths.reshape(-1))   # (b * H + h) of each row
        d, dv = self.packed_keys.shape[-1], self.packed_values.shape[-1]
        self.keys = self.packed_keys.new_empty(b, heads, 0, d)
        self.values = self.packed_values.new_empty(b, heads, 0, dv)
        self.dtype, self.device = self.keys.dtype, self.keys.device

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return int(self.lengths.max()) + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def attend(self, query, key, value, scaling: float):
        """Decode attention (one query per head) over the packed prefix and the dense suffix,
        merged by their log-sum-exp. Returns [B, 1, H_q, D_v] like transformers' SDPA."""
        b, hq, q_len, d = query.shape
        if q_len != 1:
            raise NotImplementedError("a packed (adaptive) layer supports decoding one token at a time")
        h = key.shape[1]
        group = hq // h
        q = query.float().reshape(b * h, group, d) * scaling
        # prefix: rows of head (b, h) attend with that head's G query heads
        s = torch.einsum("tgd,td->tg", q[self.segment], self.packed_keys.float())
        m_p = torch.full((b * h, group), float("-inf"), device=q.device).scatter_reduce(
            0, self.segment[:, None].expand(-1, group), s, "amax")
        e = torch.exp(s - m_p[self.segment])
        l_p = torch.zeros(b * h, group, device=q.device).index_add_(0, self.segment, e)
        o_p = torch.zeros(b * h, group, self.packed_values.shape[-1], device=q.device).index_add_(
            0, self.segment, e[..., None] * self.packed_values.float()[:, None, :])
        # suffix: the tokens since eviction, dense
        s2 = torch.einsum("ngd,ntd->ngt", q, key.float().reshape(b * h, -1, d))
        m_s = s2.amax(-1)
        e2 = torch.exp(s2 - m_s[..., None])
        l_s, o_s = e2.sum(-1), torch.einsum("ngt,ntd->ngd", e2, value.float().reshape(b * h, -1, value.shape[-1]))
        m = torch.maximum(m_p, m_s)
        a_p, a_s = torch.exp(m_p - m), torch.exp(m_s - m)
        out = (o_p * a_p[..., None] + o_s * a_s[..., None]) / (l_p * a_p + l_s * a_s)[..., None]
        return out.reshape(b, 1, hq, -1).to(query.dtype)


# --------------------------------------------------------------------------- prefill / decode


@dataclass
class Prefilled:
    """A compressed cache, ready to decode from."""

    cache: object                         # transformers DynamicCache (layers may be VarlenLayer)
    position: int                         # true position of the next token
    logits: torch.Tensor                  # [B, vocab] of the last prompt token
    kept: List = field(default_factory=list)   # per layer: Evicted / EvictedVarlen of the last eviction

    def cache_tokens(self) -> int:
        """Tokens held over all layers and heads (a packed layer counts what it holds)."""
        total = 0
        for layer in self.cache.layers:
            total += math.prod(layer.keys.shape[:3])   # dense tokens (all of a plain layer)
            if isinstance(layer, VarlenLayer):
                total += int(layer.lengths.sum())
        return total


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


def _window_of(policy: dsl.Policy, n: int, default: int) -> int:
    """How many proxy queries the policy's attention scores need (0 when none)."""
    need = 0
    for score in policy.scores:
        for node in dsl.walk(score):
            if isinstance(node, dsl.ProxyAttention):
                need = max(need, default if node.window is None else proxy_window(node, n, math.inf))
    return need


def _evict_layers(cache, policy, budgets, seed, backend, kept):
    """Evict every layer of a DynamicCache in place, with its proxy queries."""
    kept.clear()
    for i, layer in enumerate(cache.layers):
        queries = _RECORDER.queries.get(i) if policy.needs_queries else None
        out = api.evict(layer.keys, layer.values, policy, budgets[i], queries=queries, seed=seed + i,
                        backend=backend)
        if isinstance(out, api.EvictedVarlen):
            cache.layers[i] = VarlenLayer(out, layer.keys.shape[1])
        else:
            layer.keys, layer.values = out.keys, out.values
        kept.append(out)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, policy=None, budget=None, *, window: int = 64,
            chunk_size: Optional[int] = None, layer_budgets_: Optional[Sequence] = None, seed: int = 0,
            backend: str = "auto") -> Prefilled:
    """Run the prompt through the model and compress its KV cache with ``policy``.

    Args:
        input_ids: [B, N] prompt.
        policy, budget: what to keep and how much (tokens per head per layer, or a fraction of
            N). ``policy=None`` keeps the full cache.
        window: proxy queries recorded for policies whose proxy_attention has window=None.
        chunk_size: None — one forward, then one eviction per layer; C — chunked prefill,
            evicting back to the budget after every chunk of C tokens (needs a token budget).
        layer_budgets_: explicit per-layer budgets (overrides ``budget`` and PyramidKV).
    """
    enable(model)
    policy = None if policy is None else dsl.as_policy(policy)
    b, n = input_ids.shape
    n_layers = model.config.num_hidden_layers
    cache = DynamicCache(config=model.config)
    kept: List = []
    _RECORDER.queries = {}
    _RECORDER.window = _window_of(policy, n, window) if policy is not None else 0
    try:
        if chunk_size is None or policy is None:
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            if policy is not None:
                _evict_layers(cache, policy, layer_budgets(policy, budget, n, n_layers, layer_budgets_), seed,
                              backend, kept)
            return Prefilled(cache, n, out.logits[:, -1].float(), kept)
        if policy.heads == "adaptive":
            raise ValueError("chunk_size: chunked prefill keeps a uniform budget per head; adaptive (AdaKV) "
                             "policies evict once, after the whole prompt")
        budgets = layer_budgets(policy, budget, n, n_layers, layer_budgets_)
        logits = None
        for start in range(0, n, chunk_size):
            chunk = input_ids[:, start:start + chunk_size]
            held = cache.get_seq_length()
            slots = torch.arange(held, held + chunk.shape[1], device=input_ids.device)
            positions = torch.arange(start, start + chunk.shape[1], device=input_ids.device)[None].expand(b, -1)
            out = model(input_ids=chunk, past_key_values=cache, use_cache=True, cache_position=slots,
                        position_ids=positions)
            logits = out.logits[:, -1].float()
            if cache.get_seq_length() > min(budgets):
                _evict_layers(cache, policy, budgets, seed + start, backend, kept)
        return Prefilled(cache, n, logits, kept)
    finally:
        _RECORDER.window = 0
        _RECORDER.queries = {}


def _step(model, state: Prefilled, token: torch.Tensor) -> None:
    """Feed one token per row [B] through the compressed cache at its true position."""
    b = token.shape[0]
    position = torch.full((b, 1), state.position, device=token.device)
    slot = torch.tensor([state.cache.get_seq_length()], device=token.device)
    out = model(input_ids=token[:, None], past_key_values=state.cache, use_cache=True,
                position_ids=position, cache_position=slot, tritonkv_cache=state.cache)
    state.position += 1
    state.logits = out.logits[:, -1].float()


@torch.no_grad()
def extend(model, state: Prefilled, input_ids: torch.Tensor) -> Prefilled:
    """Append tokens [B, T] after the compressed cache (e.g. a question asked once the context
    is compressed); nothing is evicted. Returns ``state``, whose logits now follow the last token."""
    if input_ids.ndim != 2 or input_ids.shape[0] != state.logits.shape[0]:
        raise ValueError(f"input_ids: expected [B={state.logits.shape[0]}, T], got {tuple(input_ids.shape)}")
    for t in range(input_ids.shape[1]):
        _step(model, state, input_ids[:, t])
    return state


@torch.no_grad()
def generate(model, state: Prefilled, max_new_tokens: int, eos_token_id: Optional[int] = None) -> torch.Tensor:
    """Greedy decoding from a compressed cache, at the true positions. Returns [B, T] tokens."""
    tokens = []
    for _ in range(max_new_tokens):
        next_token = state.logits.argmax(-1)
        tokens.append(next_token)
        if eos_token_id is not None and bool((next_token == eos_token_id).all()):
            break
        _step(model, state, next_token)
    return torch.stack(tokens, dim=1)
