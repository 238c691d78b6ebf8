"""SnapKV (Li et al., arXiv 2404.14469)."""

from .. import dsl


def snapkv(window: int = 64, kernel: int = 5, pool_mode: str = "avg") -> dsl.Policy:
    """SnapKV: keep the observation window (the last ``window`` tokens) and the keys its
    queries attend to most: causal attention averaged over the window, the window's own keys
    cut off (SnapKV's code slices them away before pooling, so the pool pads with zeros where
    the window starts), average-pooled with ``kernel`` 5 per query head, then averaged over
    the GQA group (kvpress' defaults: window 64, kernel 5, avg)."""
    score = dsl.proxy_attention(window=window, causal=True, reduce="mean", pool=kernel,
                                pool_mode=pool_mode, group_reduce="mean", exclude_window=True)
    return dsl.recent(window) | dsl.top(score)
