"""tritonkv.evict: apply a policy to a KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import reference
from .validate import check_evict_args


@dataclass(frozen=True)
class Evicted:
    """What a uniform-budget policy kept: the same count ``n_kept`` in every head.

    keys [B, H_kv, n_kept, D], values [B, H_kv, n_kept, D_v] (the input dtypes),
    indices int64 [B, H_kv, n_kept]: the kept token positions, ascending.
    """

    keys: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor

    @property
    def n_kept(self) -> int:
        return self.indices.shape[-1]


@dataclass(frozen=True)
class EvictedVarlen:
    """What an adaptive (AdaKV) policy kept: a different count per head, packed.

    Head (b, h) owns rows ``offsets[b * H + h] : offsets[b * H + h + 1]`` of
    keys [total, D], values [total, D_v] and indices int64 [total] (ascending within a
    head); lengths int64 [B, H_kv] counts them. No padding: memory is the kept tokens only.
    """

    keys: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    lengths: torch.Tensor

    @property
    def offsets(self) -> torch.Tensor:
        """int64 [B * H_kv + 1], the start of each head's rows (cu_seqlens style)."""
        flat = self.lengths.reshape(-1)
        return torch.cat([flat.new_zeros(1), torch.cumsum(flat, 0)])

    def head(self, b: int, h: int):
        """(keys, values, indices) of one head."""
        heads = self.lengths.shape[1]
        start, end = self.offsets[b * heads + h: b * heads + h + 2].tolist()
        return self.keys[start:end], self.values[start:end], self.indices[start:end]


def evict(keys: torch.Tensor, values: torch.Tensor, policy, budget, *,
          queries: Optional[torch.Tensor] = None, seed: int = 0, backend: str = "auto"):
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
        backend: "auto" (compiled Triton kernels on CUDA, the reference elsewhere),
            "triton" (compiled kernels; CPU tensors need TRITON_INTERPRET=1), or
            "reference" (plain PyTorch, tritonkv.reference).

    Returns:
        :class:`Evicted` (kept rows in ascending token order), or :class:`EvictedVarlen` for
        a policy with ``heads="adaptive"``.
    """
    policy, k, seed = check_evict_args(keys, values, policy, budget, queries, seed, backend)
    if backend == "auto":
        backend = "triton" if keys.is_cuda else "reference"
    if backend == "triton":
        from .compiler import evict_compiled  # imports triton only when asked for
        return evict_compiled(keys, values, queries, policy, k, seed)
    return evict_reference(keys, values, queries, policy, k, seed)


def evict_reference(keys, values, queries, policy, k: int, seed: int):
    """The reference path: scores in float32 PyTorch, selection by stable sort."""
    inputs = reference.Inputs(keys.float(), values.float(),
                              None if queries is None else queries.float(), seed)
    if policy.heads == "adaptive":
        kept = reference.select_adaptive(policy, inputs, k)
        return pack_varlen(keys, values, kept)
    kept = reference.select(policy, inputs, k)
    index = reference.kept_indices(kept)
    return Evicted(reference.gather_rows(keys, index), reference.gather_rows(values, index), index)


def pack_varlen(keys, values, kept: torch.Tensor) -> EvictedVarlen:
    """Pack the kept rows of every head one after another (head-major, ascending tokens)."""
    b, h, n = kept.shape
    lengths = kept.sum(-1).to(torch.int64)
    flat_kept = kept.reshape(-1)
    positions = torch.arange(n, device=kept.device).repeat(b * h)
    return EvictedVarlen(keys.reshape(b * h * n, -1)[flat_kept], values.reshape(b * h * n, -1)[flat_kept],
                         positions[flat_kept], lengths)
