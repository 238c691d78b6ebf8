"""The HBM floor: the bytes no implementation of a policy can avoid moving.

  - the keys, read once, if any score reads them (anchor, proxy attention, key norm);
  - the values, read once, if any score reads them (value norm);
  - the proxy queries, if any score uses them; the signals and directions it reads (a float32
    signal adds 4 bytes per token per head);
  - the kept K and V rows, read and written, and the kept indices (int64), written.
Floor time = those bytes / the device-to-device copy bandwidth measured in the same run
(bytes read + bytes written per second).
"""

from __future__ import annotations

import torch

from tritonkv import dsl

from .timing import DEVICE, event_seconds


def floor_bytes(policy: dsl.Policy, keys: torch.Tensor, values: torch.Tensor, queries, n_kept: int,
                named=()) -> int:
    """``named``: the signal and direction tensors the policy reads, read once each."""
    b, h, n, d = keys.shape
    dv = values.shape[-1]
    item = keys.element_size()
    total = 0
    if policy.needs_keys:
        total += keys.numel() * item
    if policy.needs_values:
        total += values.numel() * item
    if policy.needs_queries and queries is not None:
        total += queries.numel() * item
    total += sum(t.numel() * t.element_size() for t in named)
    total += 2 * b * h * n_kept * (d + dv) * item
    total += b * h * n_kept * 8
    return total


def copy_bandwidth(size_bytes: int = 2 << 30, repeats: int = 20) -> float:
    """Bytes moved (read + write) per second by a device-to-device copy (on the CPU, for toy
    runs, a 16 MB memory copy)."""
    if DEVICE == "cpu":
        size_bytes = min(size_bytes, 16 << 20)
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = sorted(event_seconds(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * size_bytes / times[len(times) // 2]
