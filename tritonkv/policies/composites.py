"""Two composite policies that no paper ships, used to check that mixtures compile and run
as fast as the presets (benchmarks, AOT compile checks)."""

from .. import dsl


def keydiff_knorm() -> dsl.Policy:
    """Sinks and a recent window, then keys that are both distinctive (KeyDiff) and of low
    norm (KNorm), each score standardized per head so the two weigh alike."""
    score = (-dsl.anchor_similarity()).normalize() - 0.5 * dsl.key_norm().normalize()
    return dsl.sink(4) | dsl.recent(64) | dsl.top(score)


def snapkv_sampled() -> dsl.Policy:
    """SnapKV's pooled window attention for 3/4 of the budget, the rest sampled from it
    (NACL-style robustness) at temperature 0.5 after standardization."""
    attention = dsl.proxy_attention(window=64, causal=True, reduce="mean", pool=5, exclude_window=True)
    return (dsl.recent(64) | dsl.top(attention, share=0.75)
            | dsl.sample(attention.normalize(), temperature=0.5))
