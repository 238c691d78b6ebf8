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
"""

from __future__ import annotations

from typing import Optional, Tuple

from .. import dsl

SIGNAL = "decode_attention"   # the signal's name in the rewritten policy


def scored_by_last_query(node: dsl.Score) -> bool:
    """A proxy attention that is the last query's attention alone, as its decode computes it:
    window 1 (causal is then moot), no pooling, the window's own key not excluded."""
    return (isinstance(node, dsl.ProxyAttention) and type(node.window) is int and node.window == 1
            and node.pool_kernel == 1 and not node.exclude_window)


def decode_scored(policy: dsl.Policy) -> Optional[Tuple[dsl.Policy, str]]:
    """(the policy with its proxy attention read from the signal ``SIGNAL``, the reduction over
    a KV head's query heads), when every proxy attention of the policy is the last query's
    with one group reduction; else None (nothing to take from the decode step, or a proxy
    window it does not compute)."""
    nodes = [n for score in policy.scores for n in dsl.walk(score) if isinstance(n, dsl.ProxyAttention)]
    if not nodes or not all(scored_by_last_query(n) for n in nodes) or len({n.group_reduce for n in nodes}) > 1:
        return None
    swapped = dsl.substitute(policy, lambda n: dsl.signal(SIGNAL) if isinstance(n, dsl.ProxyAttention) else n)
    return swapped, nodes[0].group_reduce
