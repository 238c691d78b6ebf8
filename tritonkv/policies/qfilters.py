"""Q-Filters (Godey et al., arXiv 2503.02812): a per-head key direction estimated offline."""

from __future__ import annotations

import torch

from .. import dsl
from ._windows import with_windows

DIRECTION = "qfilter"   # the directions= name the preset reads


def qfilters(sinks: int = 0, recent: int = 0, name: str = DIRECTION) -> dsl.Policy:
    """Q-Filters: keep the keys with the LOWEST projection on the head's filter f, which is
    minus the dominant direction of its queries (so: the keys the typical query attends to
    most), as the paper's released filters and kvpress' QFilterPress score them:
    ``top(-key_dot("qfilter"))``. Pass the filters as ``directions={"qfilter": f}``, f
    [H_kv, D] per layer (``estimate_filters``). Defaults: no windows, as kvpress compresses
    the context; the paper's streaming cache adds ``recent=64``."""
    return with_windows(sinks, recent, dsl.top(-dsl.key_dot(name)))


def estimate_filters(queries: torch.Tensor, kv_heads: int, samples: int = 3000, generator=None) -> torch.Tensor:
    """Q-Filters' estimation for one layer: float32 filters [H_kv, D] from its queries.

    queries: [..., H_q, T, D] post-RoPE query vectors (e.g. a few calibration sequences'
    [B, H_q, T, D]). Per query head: ``samples`` vectors drawn at random (all if fewer), the
    first right singular vector v of that matrix (not mean-centred), its sign set by a
    majority vote of sign(q . v), and the filter f = -v (the paper's convention). The filters
    of a GQA group are averaged into its KV head (not renormalized), as the released code does.
    """
    if queries.ndim < 3:
        raise ValueError(f"queries: expected [..., H_q, T, D], got shape {tuple(queries.shape)}")
    h_q, d = queries.shape[-3], queries.shape[-1]
    if h_q % kv_heads:
        raise ValueError(f"kv_heads: H_q = {h_q} must be a multiple of kv_heads = {kv_heads}")
    per_head = queries.float().movedim(-3, 0).reshape(h_q, -1, d)
    filters = []
    for q in per_head:
        if q.shape[0] > samples:
            q = q[torch.randperm(q.shape[0], generator=generator, device="cpu")[:samples].to(q.device)]
        v = torch.linalg.svd(q, full_matrices=False).Vh[0]
        majority = torch.sign((q @ v).sign().sum())
        filters.append(-(v * (majority if majority != 0 else 1.0)))
    return torch.stack(filters).view(kv_heads, h_q // kv_heads, d).mean(1)
