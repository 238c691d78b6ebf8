"""NACL (Chen et al., ACL 2024, arXiv 2408.03675)."""

from .. import dsl


def nacl(sinks: int = 256, recent: float = 0.01, proxy_window: float = 0.01,
         random_share: float = 7 / 19, temperature: float = 1.0) -> dsl.Policy:
    """NACL: PROXY TOKENS EVICTION + RANDOM EVICTION, one shot at the end of prefill.

    Defaults follow the released code: keep the first 256 tokens and a recent window of
    1% of N; split the rest 12 : 7 between the top of the proxy score and tokens sampled
    without replacement with P = softmax(score) at temperature 1 among those not kept yet.
    The proxy queries are the last 1% of the prompt; the score is the SUM over them of a
    non-causal softmax over all keys, without pooling.

    GQA: the query heads of a group are averaged into their KV head. The released code
    skips this reduction (it assumes one query head per KV head); here it is explicit.
    """
    score = dsl.proxy_attention(window=proxy_window, causal=False, reduce="sum", group_reduce="mean")
    return (dsl.sink(sinks) | dsl.recent(recent)
            | dsl.top(score, share=1.0 - random_share) | dsl.sample(score, temperature=temperature))
