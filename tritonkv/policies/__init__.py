"""Presets: the published eviction policies, each a few lines of the DSL."""

from .attention import h2o, tova, tova_per_group
from .budgets import adakv, pyramidkv
from .chunkkv import chunkkv
from .composites import keydiff_knorm, snapkv_sampled
from .keydiff import keydiff
from .knorm import knorm
from .nacl import nacl
from .qfilters import estimate_filters, qfilters
from .random import random
from .snapkv import snapkv
from .streaming import streaming_llm

PRESETS = {
    "keydiff": keydiff,
    "nacl": nacl,
    "snapkv": snapkv,
    "streaming_llm": streaming_llm,
    "knorm": knorm,
    "random": random,
    "h2o": h2o,
    "tova": tova,
    "adakv": adakv,
    "pyramidkv": pyramidkv,
    "qfilters": qfilters,
    "chunkkv": chunkkv,
}

# composites: policies of our own that mix primitives (benchmarked beside the presets)
COMPOSITES = {
    "keydiff+knorm": keydiff_knorm(),
    "snapkv+sample": snapkv_sampled(),
}

__all__ = ["PRESETS", "COMPOSITES", "keydiff_knorm", "snapkv_sampled", "tova_per_group",
           "estimate_filters"] + list(PRESETS)
