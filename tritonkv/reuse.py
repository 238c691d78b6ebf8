"""tritonkv.gather: apply a kept set to other tensors (tritonkv/reuse.py).

    out = tkv.evict(k0, v0, policy, budget)            # layer 0 chooses
    for k, v in later_layers:                          # ChunkKV's layer-wise index reuse
        reused = tkv.gather(k, v, out.indices)
    scales = tkv.gather(k_scales, v_scales, out)       # a quantized cache's scales

Rows are copied as they are stored (any dtype, int8 / fp8 codes included), by the kernel
that evict's windows use (kernels/gather.py) on CUDA, by torch.gather elsewhere.
"""

from __future__ import annotations

from typing import Union

import torch

from .results import Evicted
from .validate import BACKENDS

__all__ = ["gather"]


def _check_rows(name: str, x, indices: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [B, H, N, D], got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected 4 dims [B, H, N, D], got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name}: dtype {x.dtype} is not supported; expected a real or integer dtype")
    if tuple(x.shape[:2]) != tuple(indices.shape[:2]):
        raise ValueError(f"{name}: [B, H] = {tuple(x.shape[:2])} differs from indices' {tuple(indices.shape[:2])}")
    if x.device != indices.device:
        raise ValueError(f"{name}: on {x.device}, indices on {indices.device}; expected one device")


def _check_indices(indices) -> torch.Tensor:
    if isinstance(indices, Evicted):
        indices = indices.indices
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected an int tensor [B, H, n_kept] or an Evicted, got {type(indices).__name__}")
    if indices.ndim != 3:
        raise ValueError(f"indices: expected 3 dims [B, H, n_kept], got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices: expected int64 or int32, got {indices.dtype}")
    return indices


def _check_range(indices: torch.Tensor, n: int) -> None:
    """0 <= indices < N (one synchronization with the device)."""
    if indices.numel() == 0:
        return
    low, high = torch.aminmax(indices)
    low, high = int(low), int(high)
    if low < 0 or high >= n:
        raise ValueError(f"indices: expected positions in [0, N) = [0, {n}), got values in [{low}, {high}]")


def gather(keys: torch.Tensor, values: torch.Tensor, indices: Union[torch.Tensor, Evicted], *,
           check: bool = True, backend: str = "auto") -> Evicted:
    """The rows of ``keys`` and ``values`` at ``indices``, per (batch, head).

    Args:
        keys, values: [B, H, N, D] and [B, H, N, D_v], any real or integer dtype, any strides
            (e.g. another layer's cache, or a quantized cache's codes or scales). Never modified.
        indices: int64 / int32 [B, H, n_kept] token positions (e.g. ``evict(...).indices``), or
            the Evicted itself. Any order; the outputs follow it.
        check: verify 0 <= indices < N first (one host synchronization). Pass False inside a
            CUDA graph capture or a hot loop whose indices come from evict (always in range).
        backend: "auto" (the Triton kernel on CUDA, torch.gather elsewhere), "triton" or
            "reference".

    Returns:
        Evicted(keys [B, H, n_kept, D], values [B, H, n_kept, D_v], indices), contiguous.
    """
    indices = _check_indices(indices)
    _check_rows("keys", keys, indices)
    _check_rows("values", values, indices)
    if values.shape[2] != keys.shape[2]:
        raise ValueError(f"values: N = {values.shape[2]} differs from keys' {keys.shape[2]}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if check:
        _check_range(indices, keys.shape[2])
    if backend == "reference" or (backend == "auto" and not keys.is_cuda):
        from .reference import gather_rows
        index = indices.to(torch.int64)
        return Evicted(gather_rows(keys, index), gather_rows(values, index), indices)
    from .compiler import check_backend
    from .kernels.gather import gather_rows as gather_kernel
    check_backend(keys)
    index = indices if indices.dtype == torch.int64 and indices.is_contiguous() \
        else indices.to(torch.int64).contiguous()
    out_k, out_v = gather_kernel(index, keys, values)
    return Evicted(out_k, out_v, indices)
