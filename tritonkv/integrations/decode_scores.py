"""Policies scored by the attention of the token just decoded (TOVA), fed by the decode step
itself instead of another pass over the keys.

``proxy_attention(window=1)`` is the attention of the last query to every key: in a decode
step of ``StaticEvictingCache`` that query is the token the step decodes, and the decode
kernel (kernels/decode.py) has just computed its logits over the very slots the eviction
ranks. Asked for ``scores``, the kernel also writes those logits and their log-sum-exp
(4 bytes per query head and slot), kernels/attention_signal.py turns them into the score,
and the policy runs with the node replaced by ``signal(SIGNAL)``: no pass over the keys at
all, where the proxy-attention passes read every key twice (the statistics, then the
probabilities). The kept tokens are the same up to float rounding (the normalizer is summed
in another order), so a near-tie may go the other way.

``proxy_attention(window=None, causal=True, reduce="sum")`` (H2O's score: the attention of
every query so far, summed) has a decode form too, which the cache takes when asked
(``accumulate_attention=True``): every decode step adds the token's attention to a per-slot
accumulator (``attention_signal(..., accumulate=True)``), which moves with the slots' rows,
and the evictions rank it. That is H2O as its paper runs it (each token's attention from every
later token, each query normalized over the tokens held when it was decoded), where the keys
path recomputes the last ``window`` queries' attention over the tokens held at each eviction:
a different score, so it is not the default.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

from .. import dsl
from ..budget import allocate
from ..lowering import is_recency

SIGNAL = "decode_attention"   # the signal's name in the rewritten policy
POSITIONS = "positions"       # the slots' true positions, for recency clauses in a cache out of order


def scored_by_last_query(node: dsl.Score) -> bool:
    """A proxy attention that is the last query's attention alone, as its decode computes it:
    window 1 (causal is then moot), no pooling, the window's own key not excluded."""
    return (isinstance(node, dsl.ProxyAttention) and type(node.window) is int and node.window == 1
            and node.pool_kernel == 1 and not node.exclude_window)


def summed_over_all_queries(node: dsl.Score) -> bool:
    """A proxy attention that sums every query's attention (H2O's): no window (all queries
    given), causal, summed over the queries, no pooling, the window's keys not excluded."""
    return (isinstance(node, dsl.ProxyAttention) and node.window is None and node.causal and node.reduce == "sum"
            and node.pool_kernel == 1 and not node.exclude_window)


def _swapped(policy: dsl.Policy, fits) -> Optional[Tuple[dsl.Policy, str]]:
    nodes = [n for score in policy.scores for n in dsl.walk(score) if isinstance(n, dsl.ProxyAttention)]
    if not nodes or not all(fits(n) for n in nodes) or len({n.group_reduce for n in nodes}) > 1:
        return None
    swapped = dsl.substitute(policy, lambda n: dsl.signal(SIGNAL) if isinstance(n, dsl.ProxyAttention) else n)
    return swapped, nodes[0].group_reduce


def decode_scored(policy: dsl.Policy) -> Optional[Tuple[dsl.Policy, str]]:
    """(the policy with its proxy attention read from the signal ``SIGNAL``, the reduction over
    a KV head's query heads), when every proxy attention of the policy is the last query's
    with one group reduction; else None (nothing to take from the decode step, or a proxy
    window it does not compute)."""
    return _swapped(policy, scored_by_last_query)


def accumulation_scored(policy: dsl.Policy) -> Optional[Tuple[dsl.Policy, str]]:
    """(the policy with its proxy attention read from the accumulated attention ``SIGNAL``, the
    reduction over a KV head's query heads), when every proxy attention of the policy sums all
    queries' attention (``summed_over_all_queries``: H2O) with one group reduction; else None."""
    return _swapped(policy, summed_over_all_queries)


def accumulation_scored_by_position(policy: dsl.Policy) -> Optional[Tuple[dsl.Policy, str]]:
    """``accumulation_scored``, with every ``top(position())`` clause (H2O's recency half) ranking
    the slots' true positions, ``signal(POSITIONS)``, rather than where they sit: the same kept
    tokens in a cache whose slots are in position order, and the right ones in a cache whose
    slots are not (``dsl.order_free`` holds for the result when nothing else reads order)."""
    scored = accumulation_scored(policy)
    if scored is None:
        return None
    swapped, how = scored
    clauses = tuple(replace(c, score=dsl.signal(POSITIONS)) if is_recency(c) else c for c in swapped.clauses)
    return replace(swapped, clauses=clauses), how


def accumulation_ranked(policy: dsl.Policy) -> Optional[Tuple[dsl.Policy, str]]:
    """``accumulation_scored_by_position`` as one clause, ``top(signal(SIGNAL))``, when that form
    is exactly H2O's ``top(signal(POSITIONS), share=s) | top(signal(SIGNAL))`` (no windows, no
    transforms): the signal is then ``reference.recency_ranked`` of the accumulators, +inf on the
    recency half's ``recency_count`` newest positions (kernels/attention_signal.py writes it). It
    keeps the same tokens where a row holds its newest positions consecutively, as a cache that
    evicts every step by this policy does; else None."""
    by_position = accumulation_scored_by_position(policy)
    if by_position is None:
        return None
    swapped, how = by_position
    clauses = swapped.clauses
    if len(clauses) != 2 or not all(isinstance(c, dsl.Top) and not c.transformed for c in clauses) \
            or clauses[0].score != dsl.signal(POSITIONS) or clauses[1].score != dsl.signal(SIGNAL) \
            or clauses[1].share is not None:
        return None
    return dsl.as_policy(dsl.top(dsl.signal(SIGNAL))), how


def recency_count(policy: dsl.Policy, n: int, budget: int) -> int:
    """The tokens H2O's recency clause (the first) keeps when ``policy`` evicts n tokens to ``budget``."""
    return allocate(policy, n, budget).clause_counts[0]


def proxy_node(policy: dsl.Policy) -> dsl.ProxyAttention:
    """The policy's proxy attention (the one node ``decode_scored`` / ``accumulation_scored`` swap)."""
    return next(n for score in policy.scores for n in dsl.walk(score) if isinstance(n, dsl.ProxyAttention))
