"""A planned call's launches in one call into C (batch_launch.c).

Triton's per-kernel C launcher parses every argument from Python on every launch (25-35 of
them for tritonkv's kernels) before it calls the driver; a planned call (planned.py) made one
such call per kernel, and patched each argument list in Python first. ``Batch`` packs the
recorded launches once, each parameter in an 8-byte slot, and launches them all from one
Python call that takes only the values that change per call (data pointers, the seed).

The parameters mirror Triton 3.6's launcher (backends/nvidia/driver.py, ``make_launcher``):
the kernel's non-constexpr arguments in signature order, floats in their storage type, then
the global and profile scratch pointers (null: kernels that need scratch memory are not
batched). ``TRITONKV_BATCH_LAUNCH=0`` turns it off (Triton's launchers, one call each).

A graphed batch launches its kernels as one CUDA graph whose kernel nodes each call re-points
(batch_launch.c says how, and when it falls back to plain launches); ``TRITONKV_GRAPH_LAUNCH=0``
turns graphs off (plain launches from C).
"""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path
from typing import Optional, Sequence, Tuple

_SOURCE = Path(__file__).with_name("batch_launch.c")
_MASK = (1 << 64) - 1


def enabled() -> bool:
    return os.environ.get("TRITONKV_BATCH_LAUNCH", "1") != "0"


def graphs_enabled() -> bool:
    """Whether batches built from now on may launch as re-pointed CUDA graphs."""
    return enabled() and os.environ.get("TRITONKV_GRAPH_LAUNCH", "1") != "0"


@functools.lru_cache(maxsize=None)
def module():
    """The compiled C module (built once per machine into Triton's cache), or None where it
    cannot be built (no C compiler): planned calls then use Triton's launchers."""
    try:
        from triton.backends.nvidia.driver import include_dirs
        from triton.runtime.build import compile_module_from_src
        return compile_module_from_src(src=_SOURCE.read_text(), name="tritonkv_batch_launch",
                                       include_dirs=list(include_dirs))
    except Exception:   # noqa: BLE001 - any build failure means: launch the slower way
        return None


def slot(ty: str, value) -> int:
    """A parameter of Triton type ``ty`` as the 64-bit word whose low bytes the driver reads."""
    if value is None:
        return 0
    if ty in ("fp32", "f32"):
        return struct.unpack("<I", struct.pack("<f", value))[0]
    if ty == "fp16":
        return struct.unpack("<H", struct.pack("<e", value))[0]
    if ty == "bf16":   # Triton's pack_bf16: the float32's upper half, truncated
        return struct.unpack("<I", struct.pack("<f", value))[0] >> 16
    if ty == "fp64":
        return struct.unpack("<Q", struct.pack("<d", value))[0]
    if ty[0] == "*" or ty[0] in "iu":
        return int(value) & _MASK
    raise TypeError(f"batch_launch: no parameter packing for Triton type {ty!r}")


def pack(signature: Sequence[str], template: Sequence, patches: Sequence[Tuple[int, int, int]]):
    """(slots as bytes, patches by slot) of one launch: ``signature`` the kernel's argument
    types in order ("constexpr" for those that are not parameters), ``template`` its argument
    values (None where patched), ``patches`` (argument position, role, byte offset)."""
    if len(signature) != len(template):
        raise ValueError(f"batch_launch: {len(template)} arguments for a signature of {len(signature)}")
    slot_of, words = {}, []
    for position, (ty, value) in enumerate(zip(signature, template)):
        if ty == "constexpr":
            continue
        slot_of[position] = len(words)
        words.append(slot(ty, value))
    words += [0, 0]   # global and profile scratch
    return struct.pack(f"<{len(words)}Q", *words), tuple((slot_of[p], role, offset) for p, role, offset in patches)


def signature_of(kernel) -> Optional[Tuple[str, ...]]:
    """The compiled kernel's argument types in order, or None where it cannot be batched
    (scratch memory, clusters, tensor descriptors)."""
    run = kernel.run
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1) \
            or getattr(run, "num_ctas", 1) != 1:
        return None
    signature = getattr(getattr(kernel, "src", None), "signature", None)
    if not isinstance(signature, dict):
        return None
    types = tuple(signature.values())
    if not all(isinstance(ty, str) and not ty.startswith("tensordesc") for ty in types):
        return None
    return types


def batch(launches, device_index: int, n_roles: int, graphed: bool = False):
    """(launch, handle) for ``launch(handle, stream, values)`` to run ``launches`` ((compiled
    kernel, grid, template, patches) each) in order, ``values[role]`` patched in where a patch
    names ``role``; None where batching is off, the module cannot be built or some kernel
    cannot be batched. ``graphed``: as one re-pointed CUDA graph per launch."""
    if not enabled() or not launches:
        return None
    mod = module()
    if mod is None:
        return None
    steps = []
    for kernel, grid, template, patches in launches:
        signature = signature_of(kernel)
        if signature is None:
            return None
        try:
            slots, by_slot = pack(signature, template, patches)
        except (TypeError, ValueError, struct.error):
            return None
        num_warps, num_ctas, shared = kernel.packed_metadata
        run = kernel.run
        grid = tuple(grid) + (1,) * (3 - len(grid))
        steps.append((kernel.function, *grid, 32 * num_warps, shared, bool(run.launch_pdl),
                      bool(run.launch_cooperative_grid), slots, by_slot))
    return mod.launch, mod.build(device_index, n_roles, steps, graphed)
