"""tritonkv: KV-cache eviction policies compiled to fused Triton kernels.

    import tritonkv as tkv
    policy = tkv.sink(4) | tkv.recent(64) | tkv.top(-tkv.anchor_similarity())
    out = tkv.evict(keys, values, policy, budget=0.5)
"""

from . import paged, policies
from .api import Evicted, EvictedVarlen, evict
from .runtime import Evictor
from .budget import pyramid_budgets
from .dsl import (Policy, anchor_similarity, key_dot, key_norm, position, proxy_attention, random, recent,
                  sample, signal, sink, top, value_norm)
from .reuse import gather

__version__ = "0.1.0"

__all__ = [
    "evict", "paged", "gather", "Evictor", "Evicted", "EvictedVarlen", "Policy", "pyramid_budgets", "policies",
    "anchor_similarity", "proxy_attention", "key_norm", "value_norm", "random", "position",
    "signal", "key_dot", "sink", "recent", "top", "sample",
]
