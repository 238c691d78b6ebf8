"""The baselines tritonkv is measured against.

- eager ("same policy"): each score computed with PyTorch operations in float32
  (reference.py's formulas), forced windows masked out, ``torch.topk`` per clause, then a
  sort of the kept positions and a gather of K and V. Keeps the same tokens as tritonkv.
- peer: the formulation of the most used eviction library (NVIDIA kvpress, whose
  ``ScorerPress`` scores every token, takes ``torch.topk`` of the scores and gathers K and V
  at the returned indices): scores by PyTorch operations in the cache's own dtype (no float32
  copy of K; attention probabilities from a float32 softmax cast back, as kvpress does),
  forced tokens given a score above every other, one ``topk`` and a ``gather``. Its indices
  come out in topk's order, not sorted: we time what its users run. It exists for the presets
  kvpress has a press for (PEER_SCORES); where its semantics differ from the preset (SnapKV
  pools only the keys before the observation window, TOVA averages over all query heads so
  every head keeps the same tokens, random draws other numbers), the kept sets differ and
  the suite records by how much instead of asserting.
- compiled: ``torch.compile`` of the eager function (one compilation per policy, dynamic
  shapes, so a new N does not recompile) and of the peer (static shapes: what compiling for
  one cache shape and budget gives, recompiled per N and budget; on the H100 at N=32k it ran
  10-30% faster than dynamic shapes: knorm 0.46 vs 0.65 ms, snapkv 0.81 vs 0.91 ms), each
  within a time budget (``compile_within``): a compilation that runs past it is abandoned
  and recorded as skipped. All policies compile one Python function each (``_evict_core``,
  ``_peer``), so perf/conftest.py raises dynamo's recompile limit: at the default 8 the
  later policies would silently run eager.

Two choices make the peer faster than kvpress itself, so that speedups over it are not
inflated: GQA attention multiplies each KV head by its group of queries in one batched
matmul (kvpress's ``repeat_kv`` copies K once per query head), and forced tokens get +inf
(kvpress computes ``scores.max().item() + 1``: a host sync per call).
"""

from __future__ import annotations

import functools
import math
import signal
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tritonkv import dsl, reference
from tritonkv.budget import allocate


def eager_evict(keys, values, queries, policy: dsl.Policy, k: int, seed: int = 0, core=None, signals=None,
                directions=None):
    """Evict with the eager formulas; ``core`` swaps in a compiled _evict_core."""
    alloc = allocate(policy, keys.shape[2], k)
    return (core or _evict_core)(keys, values, queries, alloc.n_sink, alloc.n_recent, alloc.total,
                                 list(alloc.clause_counts), seed, policy=policy, signals=signals,
                                 directions=directions)


def _evict_core(keys, values, queries, n_sink, n_recent, total, counts, seed, policy, signals=None,
                directions=None):
    b, h, n, _ = keys.shape
    inputs = reference.Inputs(keys.float(), values.float(), None if queries is None else queries.float(), seed,
                              signals, directions)
    positions = torch.arange(n, device=keys.device)
    kept = ((positions < n_sink) | (positions >= n - n_recent)).expand(b, h, n)
    memo = {}
    for index, (clause, count) in enumerate(zip(policy.selective, counts)):
        p = reference.priority(clause, reference.score(clause.score, inputs, memo), index, seed)
        top = torch.topk(p.masked_fill(kept, float("-inf")), count, dim=-1).indices
        kept = kept.scatter(-1, top, True)
    index = torch.sort(torch.where(kept, positions, n), dim=-1).values[..., :total]
    gather = lambda x: torch.gather(x, 2, index.unsqueeze(-1).expand(b, h, total, x.shape[-1]))  # noqa: E731
    return gather(keys), gather(values), index


@functools.lru_cache(maxsize=None)
def compiled_evict(policy: dsl.Policy):
    """torch.compile of the same function for one policy (dynamic shapes; the budget split is
    computed outside, so a new budget does not recompile; PyTorch still specializes batch 1
    and N below 32767)."""
    core = torch.compile(_evict_core, dynamic=True)
    return functools.partial(eager_evict, policy=policy, core=core)


# --------------------------------------------------------------------------- the peer
# Each score function maps (keys [B, H, N, D], queries [B, H_q, W, D] or None, k) to scores
# [B, H, N] in the cache's dtype, higher = keep; forced tokens score +inf.

SNAPKV_WINDOW, SNAPKV_KERNEL = 64, 5     # the snapkv preset's (and kvpress's) defaults
STREAMING_SINKS = 4


def _attention(keys, queries, window: int, causal: bool):
    """Softmax attention of the last ``window`` queries to every key, [B, H, G, window, N],
    in the cache's dtype: a bf16 matmul, softmax in float32 cast back (as kvpress)."""
    b, h, n, d = keys.shape
    q = queries[:, :, -window:]
    group = q.shape[1] // h
    logits = (q.reshape(b, h, group * window, d) @ keys.transpose(2, 3)) / math.sqrt(d)
    logits = logits.view(b, h, group, window, n)
    if causal:   # query r sits at position n - window + r
        future = torch.arange(n, device=keys.device) > torch.arange(n - window, n, device=keys.device)[:, None]
        logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(keys.dtype)


def _force_last(scores, count: int):
    """Scores with ``count`` more tokens at the end that always win (kvpress pads with
    max + 1)."""
    return F.pad(scores, (0, count), value=float("inf"))


def knorm_scores(keys, queries, k):
    return -keys.norm(dim=-1)


def keydiff_scores(keys, queries, k):
    anchor = F.normalize(keys, dim=-1).mean(dim=2, keepdim=True)
    return -F.cosine_similarity(keys, anchor, dim=-1)


def random_scores(keys, queries, k):
    return torch.rand(keys.shape[:-1], device=keys.device, dtype=keys.dtype)


def streaming_llm_scores(keys, queries, k):
    n = keys.shape[2]
    scores = torch.ones_like(keys[..., 0])
    scores[:, :, STREAMING_SINKS:STREAMING_SINKS + n - k] = 0
    return scores


def snapkv_scores(keys, queries, k):
    """Attention of the window's queries to the keys before the window, averaged over the
    window, average-pooled (kernel 5, zero padding at both ends of the pre-window keys),
    averaged over the GQA group; the window itself is forced."""
    b, h, n, _ = keys.shape
    w = SNAPKV_WINDOW
    probs = _attention(keys, queries, w, causal=True)[..., : n - w].mean(dim=-2)    # [B, H, G, N - w]
    pooled = F.avg_pool1d(probs.reshape(b * h, -1, n - w), SNAPKV_KERNEL, stride=1, padding=SNAPKV_KERNEL // 2)
    return _force_last(pooled.view(b, h, -1, n - w).mean(dim=2), w)


def tova_scores(keys, queries, k):
    """The last query's attention to the keys before it, averaged over ALL query heads (so
    every KV head keeps the same tokens); the last token is forced."""
    b, h, n, _ = keys.shape
    probs = _attention(keys, queries, 1, causal=False)[..., 0, : n - 1]     # [B, H, G, N - 1]
    scores = probs.mean(dim=(1, 2)).unsqueeze(1).expand(b, h, n - 1)
    return _force_last(scores, 1)


def h2o_scores(keys, queries, k):
    """Causal attention summed over the proxy queries (heavy hitters), averaged over the GQA
    group; the most recent half of the budget forced, as the h2o preset splits it
    (round half up: budget.allocate's share 0.5 of k)."""
    n = keys.shape[2]
    scores = _attention(keys, queries, queries.shape[2], causal=True).sum(dim=-2).mean(dim=2)
    recent = torch.arange(n, device=keys.device) >= n - (k + 1) // 2
    return scores.masked_fill(recent, float("inf"))


def qfilters_scores(keys, queries, k, named):
    """kvpress' QFilterPress: -(f . k) per key in the cache's dtype, f the head's filter."""
    f = named["qfilter"].to(keys.dtype)
    return -(keys * f[None, :, None, :]).sum(dim=-1)


def h2o_signal_scores(keys, queries, k, named):
    """H2O with its attention sum kept by the attention kernel (a signal): the signal, the
    most recent half of the budget forced."""
    n = keys.shape[2]
    recent = torch.arange(n, device=keys.device) >= n - (k + 1) // 2
    return named["acc"].masked_fill(recent, float("inf"))


PEER_SCORES = {
    "qfilters": qfilters_scores,
    "h2o_signal": h2o_signal_scores,
    "knorm": knorm_scores,
    "keydiff": keydiff_scores,
    "random": random_scores,
    "streaming_llm": streaming_llm_scores,
    "snapkv": snapkv_scores,
    "tova": tova_scores,
    "h2o": h2o_scores,
}


def topk_gather(scores, keys, values, k: int):
    """kvpress's selection: the k highest scores per head (unsorted), K and V gathered there."""
    indices = scores.topk(k, dim=-1).indices
    expand = lambda x: indices.unsqueeze(-1).expand(*indices.shape, x.shape[-1])  # noqa: E731
    return keys.gather(2, expand(keys)), values.gather(2, expand(values)), indices


def _peer(keys, values, queries, k, named=None, *, score):
    scores = score(keys, queries, k) if named is None else score(keys, queries, k, named)
    return topk_gather(scores, keys, values, k)


def peer_evict(name: str, compiled: bool = False):
    """The peer of preset ``name`` as ``f(keys, values, queries, k, named=None) -> (keys,
    values, indices)`` (``named``: the signals and directions, for the policies that read
    them), or None where kvpress has no such press; ``compiled``: its torch.compile."""
    if name not in PEER_SCORES:
        return None
    return _compiled_peer(name) if compiled else functools.partial(_peer, score=PEER_SCORES[name])


@functools.lru_cache(maxsize=None)
def _compiled_peer(name: str):
    return torch.compile(functools.partial(_peer, score=PEER_SCORES[name]), dynamic=False)


# --------------------------------------------------------------------------- compile budget


class CompileBudgetExceeded(BaseException):
    """Raised inside torch.compile when it runs past its budget. A BaseException, so that
    no ``except Exception`` in the compiler stack swallows it into an eager fallback."""


@contextmanager
def compile_within(seconds: float):
    """Abandon what the block does (a first call that compiles) after ``seconds`` of wall
    time, raising CompileBudgetExceeded (SIGALRM: main thread only; pytest runs there)."""
    def expire(signum, frame):
        raise CompileBudgetExceeded(f"torch.compile ran past its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    try:
        yield lambda: time.perf_counter() - start
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
