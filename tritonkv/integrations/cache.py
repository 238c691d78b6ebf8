"""A transformers cache that evicts with a tritonkv policy: after the prefill, after every prefill
chunk, and every ``interval`` decoded tokens, inside ``model.generate``.

    cache = EvictingCache(model, tkv.policies.snapkv(), budget=0.25, interval=64)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=512, do_sample=True)

It follows transformers' ``DynamicSlidingWindowLayer``: a layer holds fewer tokens than it has
seen, ``get_seq_length()`` is the number SEEN (so generate and the model compute true
positions: RoPE sees a token's real position however much was evicted) and
``get_mask_sizes()`` describes the shorter key range. Every attention layer is an
``EvictingLayer``; the model's attention goes through tritonkv's attention function
(``attention.enable``), which records each layer's last W queries after RoPE (the proxy queries of
attention scores), attends, and then lets the layer evict:

  - a forward of several tokens (a prompt, a prompt chunk — e.g. ``generate(...,
    prefill_chunk_size=C)``): back to ``budget``, after the attention of that forward saw every
    token of it;
  - every ``interval`` forwards of one token (decoding): back to ``target``.

Budgets are tokens per KV head, or fractions of the tokens SEEN so far (the whole sequence, not
the shrunken cache); a list gives one per layer, a ``.pyramid()`` policy PyramidKV's schedule.
``sink(n)`` and ``recent(n)`` windows mean positions in the whole sequence: sinks are positions
``< n``, the recent window positions ``>= seen - n`` (a fraction n is of the tokens seen). A
re-eviction forces the rows holding those positions; a position that an earlier eviction
dropped in some head is not brought back (only a fractional sink window can grow past what was
forced before). Kept rows stay in ascending position order, so the selective clauses see the
cache as a shorter sequence (``position()`` ranks by order, a causal proxy attention masks by
row order: exact when the last W rows are the last W tokens, as with a recent window >= W).

The keys change length every step; ``static.StaticEvictingCache`` is the fixed-capacity layout
(one shape for the whole decode, CUDA-graph capturable, left-padded batches).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import torch

from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..results import Evicted, EvictedVarlen
from ..reuse import gather
from .attention import ATTENTION, attend_packed, enable, expect
from .schedule import Amount, EvictionSchedule, EvictionTimer, row_windows

_attend_packed = attend_packed   # its name before the split (tests/test_hf.py)

__all__ = ["ATTENTION", "EvictingCache", "EvictingLayer", "EvictionTimer", "enable"]


class EvictingLayer(DynamicLayer):
    """One attention layer of an :class:`EvictingCache`.

    ``keys`` / ``values`` [B, H_kv, held, D] are the rows kept, in ascending position order;
    ``seen`` counts every token the layer was given. An adaptive (AdaKV) eviction leaves the
    evicted rows packed per head (``packed``, an EvictedVarlen) and ``keys`` / ``values`` hold
    only the tokens added after it; attention then runs over both with a segment softmax.
    """

    is_croppable = False

    def __init__(self, cache: "EvictingCache", index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.seen = 0                 # tokens given to this layer
        self.evictions = 0
        self.decoded = 0              # one-token forwards since the last eviction
        self.whole = True             # nothing evicted yet: row i is position i
        self.prefix = 0               # leading rows known to be positions 0, 1, ... in every head
        self.suffix = 0               # trailing rows known to be the last tokens in every head
        self.tail = 0                 # rows appended since the last eviction
        self.kept_positions: Optional[torch.Tensor] = None   # [B, H, n] positions of the rows kept then
        self.queries: Optional[torch.Tensor] = None          # [B, H_q, W, D] last queries, after RoPE
        self.packed: Optional[EvictedVarlen] = None
        self.last: Optional[Evicted] = None                  # the last eviction, indices = positions
        self.last_rows: Optional[torch.Tensor] = None        # ... its kept rows of the cache held before it
        self.held_before = 0                                 # ... and how many rows that cache held

    # ------------------------------------------------------------------ transformers' layer API

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        n = key_states.shape[-2]
        self.seen += n
        self.tail += n
        self.suffix += n
        expect(self, keys)
        return keys, values

    @property
    def held(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        # keys are held + q rows; the first stands for position seen - held (as in
        # DynamicSlidingWindowLayer), so the new queries come right after the held rows
        return self.held + query_length, self.seen - self.held

    def positions(self) -> torch.Tensor:
        """int64 [B, H_kv, held]: the position in the whole sequence of every held row."""
        b, h = self.keys.shape[:2]
        recent = torch.arange(self.seen - self.tail, self.seen, device=self.keys.device)
        if self.whole or self.packed is not None:
            return recent.expand(b, h, -1)
        return torch.cat([self.kept_positions, recent.expand(b, h, -1)], dim=-1)

    def tokens(self) -> int:
        """Tokens held over all batch rows and heads."""
        total = 0 if not self.is_initialized else math.prod(self.keys.shape[:3])
        return total + (0 if self.packed is None else int(self.packed.lengths.sum()))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices])

    def _select_batch(self, fn) -> None:
        if self.packed is not None:
            raise NotImplementedError("an adaptive (AdaKV) layer is packed per head and cannot be reordered or "
                                      "repeated along the batch (beam search): use a uniform policy, or num_beams=1")
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
        if self.kept_positions is not None:
            self.kept_positions = fn(self.kept_positions)
        if self.queries is not None:
            self.queries = fn(self.queries)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an EvictingCache cannot be cropped (evicted tokens cannot be restored): "
                                  "assisted / speculative decoding is not supported")

    # ------------------------------------------------------------------ attention and eviction

    def attend(self, module, query, key, value, attention_mask, kwargs):
        """Attention of this forward's queries over the held rows, then eviction if due."""
        cache, settings = self.cache, self.cache.schedule
        q_len = query.shape[2]
        if settings.query_window:
            size = settings.query_size(self.held)
            recent = query[:, :, -size:].detach()
            if self.queries is not None and recent.shape[2] < size:   # decoding: a rolling buffer
                recent = torch.cat([self.queries, recent], dim=2)[:, :, -size:]
            self.queries = recent
        if attention_mask is not None:
            cache.check_mask(attention_mask)
        scaling = kwargs.get("scaling") or module.scaling
        if self.packed is not None:
            out = attend_packed(self.packed, self.segment, query, key, value, scaling)
        else:
            kv = key.shape[2]
            mask = None   # one query sees every row; q_len == kv is plain causal
            if 1 < q_len < kv:   # the new tokens see every held row, and each other causally
                mask = torch.ones(q_len, kv, dtype=torch.bool, device=query.device).tril(kv - q_len)[None, None]
            out, _ = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
        if not cache.paused:
            self._evict_if_due(q_len)
        return out

    def _evict_if_due(self, q_len: int) -> None:
        settings = self.cache.schedule
        if self.packed is not None:
            return   # adaptive layers evict once (settings refuse an interval for them)
        if q_len > 1:
            if settings.budget is None:
                return
            k = settings.layer_budget(settings.budget, self.index, self.seen)
        else:
            self.decoded += 1
            if settings.interval is None or self.decoded < settings.interval:
                return
            k = settings.layer_budget(settings.target, self.index, self.seen)
        if self.held > k:
            self.evict(k)

    def evict(self, k: int) -> None:
        """Keep ``k`` rows per head, chosen by the cache's policy (what the options do by themselves)."""
        settings = self.cache.schedule
        held = self.held
        prefix = held if self.whole else self.prefix
        suffix = held if self.whole else min(self.suffix, held)
        available = 0 if self.queries is None else self.queries.shape[2]
        plan = settings.plan(row_windows(settings.policy, self.seen, prefix, suffix), held, k, available)
        queries = self.queries if plan.queries else None
        seed = settings.layer_seed(self.index, self.evictions)
        timer = settings.timer
        if timer is not None:
            timer.start()
        source = self.cache.reuse_source(self.index)
        if source is not None:   # ChunkKV's layer-wise reuse: the kept rows of the group's first layer
            if source.evictions != self.evictions + 1 or source.held_before != held:
                raise RuntimeError(f"reuse_layers: layer {self.index} holds {held} rows but layer {source.index} "
                                   f"chose from {source.held_before}; layers that share a selection must evict "
                                   f"in step (one uniform budget for all layers)")
            out = gather(self.keys, self.values, source.last_rows, check=False)
        else:
            out = plan.evictor(self.keys, self.values, queries=queries, seed=seed,
                               directions=settings.layer_directions(self.index))
        if not isinstance(out, EvictedVarlen):
            self.last_rows, self.held_before = out.indices, held
        positions = self.positions()
        if isinstance(out, EvictedVarlen):
            # first eviction only (adaptive layers are not evicted again): row index == position
            self.packed = out
            b, h = self.keys.shape[:2]
            self.segment = torch.repeat_interleave(torch.arange(b * h, device=out.lengths.device),
                                                   out.lengths.reshape(-1))
            self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]
            self.last = out
        else:
            self.kept_positions = positions.gather(-1, out.indices)
            self.keys, self.values = out.keys, out.values
            self.last = Evicted(out.keys, out.values, self.kept_positions)
        self.prefix, self.suffix = plan.n_sink, plan.n_recent
        self.whole, self.tail, self.decoded = False, 0, 0
        self.evictions += 1
        if timer is not None:   # the whole eviction: kernels and the cache's own bookkeeping
            timer.stop()



class HeldTokens:
    """What both evicting caches answer about the tokens they hold (their layers implement
    ``positions()`` and ``tokens()``)."""

    def pause(self) -> "Paused":
        """``with cache.pause(): model(...)`` runs forwards without evicting (e.g. a question
        appended to a compressed context)."""
        return Paused(self)

    def positions(self, layer: int) -> torch.Tensor:
        """[B, H_kv, held]: positions in the whole sequence of a layer's held rows (-1 for the empty
        slots of a StaticEvictingCache row)."""
        return self.layers[layer].positions()

    def tokens(self) -> int:
        """Tokens held over all layers, batch rows and heads."""
        return sum(layer.tokens() for layer in self.layers)


class EvictingCache(HeldTokens, DynamicCache):
    """A ``DynamicCache`` whose layers are evicted with a tritonkv policy while the model runs.

    Args:
        model: the transformers causal LM it is for (its attention is switched to tritonkv's,
            see :func:`enable`; standard attention and cache paths: Llama, Mistral, Qwen2, ...).
        policy: a tritonkv policy or preset; ``None`` keeps everything (a plain DynamicCache).
        budget: what each forward of several tokens (prompt or prompt chunk) evicts back to:
            tokens per KV head (int), a fraction of the tokens seen so far (float), or one such
            value per layer (a list); ``None``: no eviction after multi-token forwards.
            A ``.pyramid()`` policy spreads it over layers (PyramidKV).
        interval: evict every ``interval`` decoded tokens (one-token forwards); None: never.
        target: what decoding-time eviction evicts back to (as ``budget``; default ``budget``).
        window: proxy queries kept per layer (a rolling buffer of the last ``window`` queries
            after RoPE) for policies whose proxy_attention has ``window=None``; a policy that
            asks for more gets what it asks for.
        seed: seeds every random draw (each layer and eviction gets its own stream).
        backend: ``tkv.evict``'s ("auto": compiled kernels on CUDA, the reference elsewhere).
        timing: record CUDA events around each eviction call (see :class:`EvictionTimer`).
        directions: what the policy's ``key_dot(name)`` reads, per layer: name -> [n_layers,
            H_kv, D] (e.g. Q-Filters' filters from ``policies.estimate_filters``).
        reuse_layers: R > 1 lets the first layer of every group of R consecutive layers choose
            and the others keep the same rows (ChunkKV's layer-wise index reuse, applied with
            ``tkv.gather``); needs one uniform budget for all layers.

    Padded batches are refused (a token kept by eviction cannot be told from padding in a
    layout whose rows all have one length): batch prompts of equal length, generate them one
    at a time, or use ``StaticEvictingCache``, which keeps every row's own real tokens. Beam
    search works for uniform policies; adaptive (AdaKV) layers evict once, after the prompt,
    and refuse beam search.
    """

    def __init__(self, model, policy=None, budget: Amount = None, *, interval: Optional[int] = None,
                 target: Amount = None, window: int = 64, seed: int = 0, backend: str = "auto",
                 timing: bool = False, directions: Optional[Mapping[str, torch.Tensor]] = None,
                 reuse_layers: int = 1):
        self.schedule = schedule = EvictionSchedule(
            model, policy, budget, interval=interval, target=target, window=window, seed=seed, backend=backend,
            timing=timing, directions=directions, reuse_layers=reuse_layers)
        self.n_layers, self.policy, self.timer = schedule.n_layers, schedule.policy, schedule.timer
        self.paused = False
        self._checked_mask = None
        enable(model)
        Cache.__init__(self, layers=[EvictingLayer(self, i) for i in range(self.n_layers)])

    def reuse_source(self, layer: int) -> Optional[EvictingLayer]:
        """The layer whose selection ``layer`` reuses (reuse_layers), or None."""
        reuse = self.schedule.reuse_layers
        first = layer - layer % reuse
        return None if first == layer else self.layers[first]

    def check_mask(self, mask) -> None:
        """Refuse a mask that hides more than causality does (padding, or a custom mask): the
        held rows are not the positions such a mask is indexed by."""
        if mask is self._checked_mask:
            return
        q, kv = mask.shape[-2:]
        causal = torch.ones(q, kv, dtype=torch.bool, device=mask.device).tril(kv - q)
        if mask.dtype != torch.bool or not torch.equal(mask, causal.expand_as(mask)):
            raise ValueError("EvictingCache: the attention mask hides tokens (a left-padded batch, or a custom mask); "
                             "evicted caches keep different positions per row and head, so padding cannot be masked "
                             "consistently. Batch prompts of equal length without padding (attention_mask all ones), "
                             "generate one prompt at a time, or use hf.StaticEvictingCache (left padding)")
        self._checked_mask = mask



class Paused:
    """Evictions off while in the block (``cache.pause()``)."""

    def __init__(self, cache):
        self.cache = cache

    def __enter__(self):
        self.previous, self.cache.paused = self.cache.paused, True
        return self.cache

    def __exit__(self, *exc):
        self.cache.paused = self.previous
