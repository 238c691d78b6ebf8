"""Uniform random eviction, the baseline every policy should beat."""

from .. import dsl
from ._windows import with_windows


def random(sinks: int = 0, recent: int = 0) -> dsl.Policy:
    """Keep a uniformly random subset: the top-k of i.i.d. uniform draws is a uniform
    k-subset (``sample(random())`` would not be uniform: it weights by softmax)."""
    return with_windows(sinks, recent, dsl.top(dsl.random()))
