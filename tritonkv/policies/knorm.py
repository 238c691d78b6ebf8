"""KNorm (Devoto et al., arXiv 2406.11430)."""

from .. import dsl
from ._windows import with_windows


def knorm(sinks: int = 0, recent: int = 0) -> dsl.Policy:
    """KNorm: keys with a low L2 norm draw high attention, so keep the lowest key norms."""
    return with_windows(sinks, recent, dsl.top(-dsl.key_norm()))
