"""Small helpers shared by the kernels' launchers."""

from __future__ import annotations

import functools
import os

import torch


# triton.jit reads TRITON_INTERPRET when a kernel is decorated, i.e. when this package's
# kernels are imported; what matters is the value at that moment.
_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when tritonkv's kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRET_AT_IMPORT


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
