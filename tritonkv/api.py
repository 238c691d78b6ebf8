"""tritonkv.evict: apply a policy to a KV cache."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from .eager import evict_reference
from .results import Evicted, EvictedVarlen, pack_varlen
from .runtime import evictor_for

__all__ = ["evict", "evict_reference", "Evicted", "EvictedVarlen", "pack_varlen"]


def evict(keys: torch.Tensor, values: torch.Tensor, policy, budget, *,
          queries: Optional[torch.Tensor] = None, seed: int = 0,
          signals: Optional[Mapping[str, torch.Tensor]] = None,
          directions: Optional[Mapping[str, torch.Tensor]] = None, backend: str = "auto"):
    """Keep ``budget`` tokens per KV head of a cache, chosen by ``policy``.

    Args:
        keys, values: [B, H_kv, N, D] and [B, H_kv, N, D_v]; float16, bfloat16 or float32;
            any strides. Keys as stored in the cache (RoPE applied). Never modified.
        policy: clauses joined with ``|``, e.g. ``tkv.sink(4) | tkv.top(-tkv.anchor_similarity())``,
            or a preset from ``tritonkv.policies``.
        budget: tokens kept per head: an int, or a float fraction of N in (0, 1]
            (rounded half up, at least 1). ``budget >= N`` keeps everything.
        queries: [B, H_q, W, D] proxy queries (the last W positions of the prompt, RoPE
            applied), needed only by ``proxy_attention``; H_q a multiple of H_kv.
        seed: seeds every random draw; same inputs and seed give the same result.
        signals: the outside scores that ``tkv.signal(name)`` reads, by name: [B, H_kv, N]
            (a dim of 1 broadcasts), any float dtype; exactly the names the policy uses.
        directions: the per-head directions that ``tkv.key_dot(name)`` reads, by name:
            [H_kv, D] or [B, H_kv, D], any float dtype.
        backend: "auto" (compiled Triton kernels on CUDA, the reference elsewhere),
            "triton" (compiled kernels; CPU tensors need TRITON_INTERPRET=1), or
            "reference" (plain PyTorch, tritonkv.reference).

    Returns:
        :class:`Evicted` (kept rows in ascending token order), or :class:`EvictedVarlen` for
        a policy with ``heads="adaptive"``.

    The first call with a new signature (shapes, strides, dtypes, devices, budget) validates,
    plans and compiles; repeat calls reuse that plan (see :class:`tritonkv.Evictor`).
    """
    return evictor_for(policy, budget, backend)(keys, values, queries=queries, seed=seed, signals=signals,
                                                directions=directions)
