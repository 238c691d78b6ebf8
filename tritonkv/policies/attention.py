"""Attention-score policies in the style of H2O (arXiv 2306.14048) and TOVA (arXiv 2401.06104)."""

from .. import dsl


def h2o(recent_share: float = 0.5) -> dsl.Policy:
    """H2O-style heavy hitters: attention accumulated (summed) over all given proxy queries,
    each seeing keys up to its own position; half the budget goes to the most recent tokens
    (``top(position())`` keeps the latest), half to the heaviest hitters."""
    score = dsl.proxy_attention(window=None, causal=True, reduce="sum", group_reduce="mean")
    return dsl.top(dsl.position(), share=recent_share) | dsl.top(score)


def tova() -> dsl.Policy:
    """TOVA: keep the last token and the keys the last query attends to most, its attention
    averaged over ALL query heads of the layer (``head_reduce="mean"`` over the KV heads of
    the group means), so every KV head keeps the same tokens, as published and as kvpress'
    TOVAPress does."""
    score = dsl.proxy_attention(window=1, causal=False, reduce="mean", group_reduce="mean")
    return dsl.recent(1) | dsl.top(score, head_reduce="mean")


def tova_per_group() -> dsl.Policy:
    """TOVA's score per KV head (the last query's attention averaged over the head's GQA
    group only): heads keep different tokens. Not the published method; an ablation."""
    return dsl.as_policy(dsl.top(dsl.proxy_attention(window=1, causal=False, reduce="mean", group_reduce="mean")))
