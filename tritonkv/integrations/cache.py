"""A transformers cache that evicts with a tritonkv policy: after the prefill, after every prefill
chunk, and every ``interval`` decoded tokens, inside ``model.generate``.

    cache = EvictingCache(model, tkv.policies.snapkv(), budget=0.25, interval=64)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=512, do_sample=True)

It follows transformers' ``DynamicSlidingWindowLayer``: a layer holds fewer tokens than it has
seen, ``get_seq_length()`` is the number SEEN (so generate and the model compute true
positions: RoPE sees a token's real position however much was evicted) and
``get_mask_sizes()`` describes the shorter key range. Every attention layer is an
``EvictingLayer``; the model's attention goes through tritonkv's attention function
(``enable``), which records each layer's last W queries after RoPE (the proxy queries of
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
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from typing import Dict, List, Mapping, Optional, Tuple

import torch

try:
    from transformers import AttentionInterface, DynamicCache
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover
    raise ImportError("tritonkv.integrations needs transformers: pip install 'tritonkv[hf]'") from e

from .. import dsl
from ..budget import allocate, pyramid_budgets, resolve_budget, resolve_count
from ..reference import proxy_window
from ..results import Evicted, EvictedVarlen
from ..reuse import gather
from ..runtime import Evictor

ATTENTION = "tritonkv_sdpa"
_REGISTERED = False
# The layer whose update() ran last in this thread: the model calls attention right after it.
_CURRENT = threading.local()


def enable(model) -> None:
    """Route the model's attention through tritonkv's (SDPA + proxy queries + eviction)."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        _REGISTERED = True
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


def _attention(module, query, key, value, attention_mask, **kwargs):
    layer = getattr(_CURRENT, "layer", None)
    _CURRENT.layer = None
    if layer is None or key is not layer.keys:   # not an EvictingCache's layer: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return layer.attend(module, query, key, value, attention_mask, kwargs), None


def _window_of(policy: dsl.Policy, n: int, default: int) -> int:
    """How many proxy queries the policy's attention scores need on n keys (0 when none)."""
    need = 0
    for score in policy.scores:
        for node in dsl.walk(score):
            if isinstance(node, dsl.ProxyAttention):
                need = max(need, default if node.window is None else proxy_window(node, n, math.inf))
    return need


def _causal_window(policy: dsl.Policy, n: int, available: int) -> int:
    """The longest proxy window of the policy's causal attention scores on n keys, with
    ``available`` proxy queries."""
    return max((proxy_window(node, n, available) for score in policy.scores for node in dsl.walk(score)
                if isinstance(node, dsl.ProxyAttention) and node.causal), default=0)


def _row_windows(policy: dsl.Policy, seen: int, prefix: int, suffix: int) -> Tuple[int, ...]:
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


def _rows_policy(policy: dsl.Policy, counts: Tuple[int, ...]) -> dsl.Policy:
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
        _CURRENT.layer = self
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
        settings = self.cache
        q_len = query.shape[2]
        if settings.query_window:
            size = settings.query_size(self.held)
            recent = query[:, :, -size:].detach()
            if self.queries is not None and recent.shape[2] < size:   # decoding: a rolling buffer
                recent = torch.cat([self.queries, recent], dim=2)[:, :, -size:]
            self.queries = recent
        if attention_mask is not None:
            settings.check_mask(attention_mask)
        scaling = kwargs.get("scaling") or module.scaling
        if self.packed is not None:
            out = _attend_packed(self.packed, self.segment, query, key, value, scaling)
        else:
            kv = key.shape[2]
            mask = None   # one query sees every row; q_len == kv is plain causal
            if 1 < q_len < kv:   # the new tokens see every held row, and each other causally
                mask = torch.ones(q_len, kv, dtype=torch.bool, device=query.device).tril(kv - q_len)[None, None]
            out, _ = sdpa_attention_forward(module, query, key, value, mask, **kwargs)
        if not settings.paused:
            self._evict_if_due(q_len)
        return out

    def _evict_if_due(self, q_len: int) -> None:
        settings = self.cache
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
        settings = self.cache
        held = self.held
        prefix = held if self.whole else self.prefix
        suffix = held if self.whole else min(self.suffix, held)
        available = 0 if self.queries is None else self.queries.shape[2]
        plan = settings.plan(_row_windows(settings.policy, self.seen, prefix, suffix), held, k, available)
        queries = self.queries if plan.queries else None
        seed = settings.seed + self.index + settings.n_layers * self.evictions
        timer = settings.timer
        if timer is not None:
            timer.start()
        source = settings.reuse_source(self.index)
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


def _attend_packed(packed: EvictedVarlen, segment, query, key, value, scaling: float):
    """Attention over a packed (per-head lengths) prefix and the dense rows added since,
    merged by their log-sum-exp; the T new queries see the whole prefix and the dense rows
    causally. Returns [B, T, H_q, D_v] like transformers' SDPA."""
    b, hq, t, d = query.shape
    h = key.shape[1]
    group = hq // h
    q = query.float().reshape(b * h, group, t, d) * scaling
    # prefix: the rows of head (b, h) attend with that head's G query heads
    s = torch.einsum("rgtd,rd->rgt", q[segment], packed.keys.float())
    rows = segment[:, None, None].expand(-1, group, t)
    m_p = torch.full((b * h, group, t), float("-inf"), device=q.device).scatter_reduce(0, rows, s, "amax")
    e = torch.exp(s - m_p[segment])
    l_p = torch.zeros(b * h, group, t, device=q.device).index_add_(0, segment, e)
    o_p = torch.zeros(b * h, group, t, packed.values.shape[-1], device=q.device).index_add_(
        0, segment, e[..., None] * packed.values.float()[:, None, None, :])
    # suffix: the rows added since the eviction, dense and causal for the new queries
    n = key.shape[2]
    s2 = torch.einsum("rgtd,rnd->rgtn", q, key.float().reshape(b * h, n, d))
    hidden = torch.ones(t, n, dtype=torch.bool, device=q.device).triu(n - t + 1)
    s2 = s2.masked_fill(hidden, float("-inf"))
    m_s = s2.amax(-1)
    e2 = torch.exp(s2 - m_s[..., None])
    l_s = e2.sum(-1)
    o_s = torch.einsum("rgtn,rnd->rgtd", e2, value.float().reshape(b * h, n, -1))
    m = torch.maximum(m_p, m_s)
    a_p, a_s = torch.exp(m_p - m), torch.exp(m_s - m)
    out = (o_p * a_p[..., None] + o_s * a_s[..., None]) / (l_p * a_p + l_s * a_s)[..., None]
    return out.reshape(b, hq, t, -1).transpose(1, 2).to(query.dtype)


class _EvictionPlan:
    __slots__ = ("evictor", "queries", "n_sink", "n_recent")

    def __init__(self, evictor: Evictor, queries: bool, n_sink: int, n_recent: int):
        self.evictor, self.queries, self.n_sink, self.n_recent = evictor, queries, n_sink, n_recent


class EvictionTimer:
    """CUDA events around every eviction call (``EvictingCache(..., timing=True)``); ``total_ms()``
    synchronizes once and adds them up."""

    def __init__(self):
        self.events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.calls = 0

    def start(self):
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


Amount = object   # int tokens, float fraction of the tokens seen, or a sequence of them (one per layer)


class EvictingCache(DynamicCache):
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

    Padded batches are refused (a token kept by eviction cannot be told from padding): batch
    prompts of equal length, or generate them one at a time. Beam search works for uniform
    policies; adaptive (AdaKV) layers evict once, after the prompt, and refuse beam search.
    """

    def __init__(self, model, policy=None, budget: Amount = None, *, interval: Optional[int] = None,
                 target: Amount = None, window: int = 64, seed: int = 0, backend: str = "auto",
                 timing: bool = False, directions: Optional[Mapping[str, torch.Tensor]] = None,
                 reuse_layers: int = 1):
        config = model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True) \
                or any(t != "full_attention" for t in layer_types):
            raise ValueError("EvictingCache: the model has sliding-window / non-full attention layers "
                             f"({sorted(set(layer_types))}, sliding_window={getattr(config, 'sliding_window', None)}); "
                             "only full-attention layers can be evicted")
        self.n_layers = len(layer_types)
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
        for name, amount in (("budget", budget), ("target", target)):
            if isinstance(amount, (list, tuple)):
                if len(amount) != self.n_layers:
                    raise ValueError(f"{name}: expected {self.n_layers} per-layer entries (one per layer), "
                                     f"got {len(amount)}")
                for a in amount:
                    resolve_budget(a, 1 << 62)
            elif amount is not None:
                resolve_budget(amount, 1 << 62)   # type and range, with evict's messages
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: expected an int >= 1 (proxy queries kept per layer), got {window!r}")
        self._directions = self._check_directions(directions, model)
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
        self.paused = False
        self.timer = EvictionTimer() if timing else None
        self._evictors: Dict[Tuple, Evictor] = {}
        self._plans: Dict[Tuple, _EvictionPlan] = {}
        if self.query_window:   # fractional proxy windows need more queries on longer caches
            self._window_grows = any(isinstance(node, dsl.ProxyAttention) and isinstance(node.window, float)
                                     for score in self.policy.scores for node in dsl.walk(score))
            self._query_size = max(window, _window_of(self.policy, 1, window))
        self._budgets: Dict[Tuple, List[int]] = {}
        self._checked_mask = None
        enable(model)
        Cache.__init__(self, layers=[EvictingLayer(self, i) for i in range(self.n_layers)])

    def _check_directions(self, directions, model) -> List[Dict[str, torch.Tensor]]:
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
        return self._directions[layer]

    def reuse_source(self, layer: int) -> Optional[EvictingLayer]:
        """The layer whose selection ``layer`` reuses (reuse_layers), or None."""
        first = layer - layer % self.reuse_layers
        return None if first == layer else self.layers[first]

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

    def plan(self, windows: Tuple[int, ...], held: int, k: int, available: int) -> "_EvictionPlan":
        """How a layer holding ``held`` rows evicts to ``k`` with these row windows; one planned
        Evictor each, so decoding at a fixed target replays one plan."""
        key = (windows, held, k, available)
        plan = self._plans.get(key)
        if plan is None:
            policy = _rows_policy(self.policy, windows)
            queries = self.query_window
            if queries and _causal_window(policy, held, available) > held:
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
            plan = self._plans[key] = _EvictionPlan(ev, queries, alloc.n_sink, alloc.n_recent)
        return plan

    def query_size(self, held: int) -> int:
        """Proxy queries a layer keeps while it holds ``held`` rows."""
        if not self._window_grows:
            return self._query_size
        return max(self.window, _window_of(self.policy, held, self.window))

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
                             "or generate one prompt at a time")
        self._checked_mask = mask

    def pause(self) -> "_Paused":
        """``with cache.pause(): model(...)`` runs forwards without evicting (e.g. a question
        appended to a compressed context)."""
        return _Paused(self)

    def positions(self, layer: int) -> torch.Tensor:
        """[B, H_kv, held]: positions in the whole sequence of a (dense) layer's held rows."""
        return self.layers[layer].positions()

    def tokens(self) -> int:
        """Tokens held over all layers, batch rows and heads."""
        return sum(layer.tokens() for layer in self.layers)


class _Paused:
    def __init__(self, cache):
        self.cache = cache

    def __enter__(self):
        self.previous, self.cache.paused = self.cache.paused, True
        return self.cache

    def __exit__(self, *exc):
        self.cache.paused = self.previous
