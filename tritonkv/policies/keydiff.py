"""KeyDiff (Park et al., arXiv 2504.15364)."""

from .. import dsl
from ._windows import with_windows


def keydiff(sinks: int = 0, recent: int = 0) -> dsl.Policy:
    """KeyDiff: keep the keys least similar to their head's anchor (the mean of the
    L2-normalized keys). Needs no attention scores, so it runs beside FlashAttention.

    Defaults: no forced tokens, as in the paper; ``sinks`` / ``recent`` add StreamingLLM-style
    windows in front of the score.
    """
    return with_windows(sinks, recent, dsl.top(-dsl.anchor_similarity()))
