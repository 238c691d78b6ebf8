"""Presets: the published eviction policies, each a few lines of the DSL."""

from .attention import h2o, tova
from .budgets import adakv, pyramidkv
from .keydiff import keydiff
from .knorm import knorm
from .nacl import nacl
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
}

__all__ = ["PRESETS"] + list(PRESETS)
