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


def env_flag(name: str, default: bool) -> bool:
    """A ``0`` / ``1`` switch read from the environment (``default`` where unset); any other
    value is refused, naming the variable."""
    value = os.environ.get(name)
    if value is None:
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name}: expected 0 or 1, got {value!r}")
    return value == "1"


def ieee_products(dtype: torch.dtype) -> bool:
    """The IEEE constexpr of kernels with tl.dot: full-precision float32 products for float32
    caches (not TF32), and for bfloat16 in the interpreter, whose bfloat16 tl.dot returns
    garbage in Triton 3.6 (operands are then upcast, which is exact)."""
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# Programs of one kernel that fit on a multiprocessor at once, learnt from its first launch.
# Until then 2 is assumed: true for any 4-warp kernel with under 100 KB of shared memory
# (2 x 128 threads x 255 registers fit in the 64K registers of an SM).
_BLOCKS_PER_SM = {}


def _occupancy_key(kernel, num_warps, constexprs):
    # the module too: every policy's generated module has a kernel named "score"
    name = f"{kernel.fn.__module__}.{kernel.fn.__qualname__}" if hasattr(kernel, "fn") else repr(kernel)
    return name, num_warps, tuple(sorted(constexprs.items()))


def resident_programs(kernel, device: torch.device, num_warps: int, constexprs) -> int:
    """How many programs of ``kernel`` the whole GPU holds at once (1 off the GPU)."""
    if interpreting() or device.type != "cuda":
        return 1
    per_sm = _BLOCKS_PER_SM.get(_occupancy_key(kernel, num_warps, constexprs), 2)
    return per_sm * multiprocessor_count(device)


def learnt_occupancy(kernel, num_warps: int, constexprs):
    """Programs of ``kernel`` per multiprocessor as learnt from a launch (record_occupancy), or None."""
    return _BLOCKS_PER_SM.get(_occupancy_key(kernel, num_warps, constexprs))


def record_occupancy(kernel, compiled, num_warps: int, constexprs) -> None:
    """Remember the occupancy of a launched kernel (``compiled`` is what the launch returned)."""
    key = _occupancy_key(kernel, num_warps, constexprs)
    if key in _BLOCKS_PER_SM:
        return
    try:
        regs, shared = int(compiled.n_regs), int(compiled.metadata.shared)
    except (AttributeError, TypeError):
        return
    _BLOCKS_PER_SM[key] = blocks_per_sm(regs, shared, num_warps)


def blocks_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """Programs of a kernel that fit on one Hopper multiprocessor at once: registers are given
    out per warp in units of 256 (64K per SM), shared memory per program plus 1 KB the driver
    reserves (228 KB per SM), at most 64 warps and 32 programs."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    per_sm = min(32, 64 // num_warps, 65536 // (regs_per_warp * num_warps), 233472 // (shared + 1024))
    return max(1, per_sm)


def check_float32(name: str, t, shape, device) -> None:
    """A clear ValueError unless ``t`` is a float32 tensor of ``shape`` on ``device`` (the
    float32 outputs and scratch tensors a caller passes to a kernel)."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != torch.float32 \
            or t.device != torch.device(device):
        raise ValueError(f"{name}: expected a float32 tensor {list(shape)} on {device}, got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv is a JIT function, slow to call from Python)."""
    return -(-a // b)


def even_tiling(n_tiles: int, programs: int):
    """(programs, tiles per program) that cover ``n_tiles`` tiles with at most ``programs``
    programs of equal tile counts: the programs that really run, none of them empty."""
    tiles = cdiv(n_tiles, programs)
    return cdiv(n_tiles, tiles), tiles


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
