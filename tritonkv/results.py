"""What evict() returns: the kept rows of a cache, dense or packed per head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Evicted:
    """What a uniform-budget policy kept: the same count ``n_kept`` in every head.

    keys [B, H_kv, n_kept, D], values [B, H_kv, n_kept, D_v] (the input dtypes),
    indices int64 [B, H_kv, n_kept]: the kept token positions, ascending. keys and values
    are None from an Evictor made with ``gather=False`` (the indices only).
    """

    keys: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
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


def varlen_from(keys, values, packed: torch.Tensor, heads: int) -> EvictedVarlen:
    """The EvictedVarlen of packed rows ``keys`` [total, D] / ``values`` and ``packed``: int64
    [total + B * heads], the kept indices followed by each head's count (one allocation for
    both: adaptive.prepare_adaptive's layout)."""
    total = keys.shape[0]
    return EvictedVarlen(keys, values, packed[:total], packed[total:].view(-1, heads))


def pack_varlen(keys, values, kept: torch.Tensor) -> EvictedVarlen:
    """Pack the kept rows of every head one after another (head-major, ascending tokens)."""
    b, h, n = kept.shape
    lengths = kept.sum(-1).to(torch.int64)
    flat_kept = kept.reshape(-1)
    positions = torch.arange(n, device=kept.device).repeat(b * h)
    return EvictedVarlen(keys.reshape(b * h * n, -1)[flat_kept], values.reshape(b * h * n, -1)[flat_kept],
                         positions[flat_kept], lengths)
