"""Kernel launches with little host overhead.

``kernel[grid](*args)`` costs tens of microseconds of Python per launch in Triton 3.6
(argument binding, specialization, cache-key hashing), more than a small eviction's GPU
work. ``Launcher`` goes through Triton the first time it sees a specialization (so Triton
compiles, caches and checks as usual) and afterwards calls the compiled kernel directly.

The specialization key mirrors Triton's: each tensor's dtype and whether its address is
16-byte aligned; each int's width and, unless the parameter is in ``do_not_specialize``,
whether it equals 1 or is divisible by 16; every constexpr value; the launch options.
Which arguments are tensors and which are ints is learnt from the first call (the
launchers in tritonkv always pass the same kinds in the same places); a call that breaks
that pattern takes Triton's path. When a launch hook is installed (profilers), every launch
takes Triton's own path; otherwise the hooks are passed as None so the C launcher skips them.

Threads: on the GPU, launches from several threads need no lock (Triton's JIT cache and
its on-disk cache tolerate concurrent compiles of one kernel; the caches here are filled
with single dict operations, so a race costs one extra dispatch through Triton, never a
wrong kernel). Triton's interpreter is not thread-safe, so interpreted launches are
serialized (kernels/interpreted.py).
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from triton import knobs

from .common import interpreting
from .interpreted import interpreted

_I32_MIN, _I32_MAX = -2 ** 31, 2 ** 31 - 1


def _hooks_installed() -> bool:
    """A launch hook (profiler) is set. Triton 3.6 keeps hooks as a HookChain, always present."""
    hook = knobs.runtime.launch_enter_hook
    return bool(getattr(hook, "calls", hook))


def _raw_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


class Launcher:
    def __init__(self, fn):
        self.fn = fn
        params = fn.params
        runtime = [p for p in params if not p.is_constexpr]
        self.n_runtime = len(runtime)
        self.constexpr_names = tuple(p.name for p in params if p.is_constexpr)
        # tritonkv's kernels put every constexpr after the runtime parameters
        self.trailing_constexprs = all(p.is_constexpr for p in params[len(runtime):])
        self.specialized = {i for i, p in enumerate(runtime) if not p.do_not_specialize}
        self.tensors = self.ints = self.spec_ints = None
        self.compiled: Dict[tuple, object] = {}

    def _learn(self, args: Sequence) -> None:
        ints = tuple(i for i, a in enumerate(args) if type(a) is int)
        self.ints, self.spec_ints = ints, tuple(i for i in ints if i in self.specialized)
        # last: another thread takes ``tensors is not None`` to mean that all three are set
        self.tensors = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))

    def _key(self, args: Sequence, constexprs: dict, options: tuple) -> tuple:
        tensors = [args[i] for i in self.tensors]
        ints = [args[i] for i in self.ints]
        spec = [args[i] for i in self.spec_ints]
        return (options,
                tuple([t.dtype for t in tensors]),
                tuple([t.data_ptr() & 15 == 0 for t in tensors]),
                tuple([_I32_MIN <= v <= _I32_MAX for v in ints]),
                tuple([v == 1 for v in spec]),
                tuple([v & 15 == 0 for v in spec]),
                tuple([constexprs[name] for name in self.constexpr_names]))

    def fast_path_ok(self, args: Sequence) -> bool:
        return not _hooks_installed() and self.trailing_constexprs and len(args) == self.n_runtime

    def __call__(self, grid, args: Sequence, constexprs: dict, num_warps: int = 4, num_stages=None, maxnreg=None):
        options = (num_warps, num_stages, maxnreg)
        kw = launch_options(num_warps, num_stages, maxnreg)
        if not self.fast_path_ok(args):
            return self.fn[grid](*args, **constexprs, **kw)
        if self.tensors is None:
            self._learn(args)
        try:
            key = self._key(args, constexprs, options)
        except (AttributeError, TypeError):   # an argument of another kind than at first
            return self.fn[grid](*args, **constexprs, **kw)
        device = torch.cuda.current_device()
        entry = self.compiled.get((device, key))
        if entry is None:
            kernel = self.fn[grid](*args, **constexprs, **kw)
            self.compiled[(device, key)] = (kernel, key[-1])
            return kernel
        kernel, constexpr_values = entry
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        kernel.run(grid[0], g1, g2, _raw_stream(device), kernel.function, kernel.packed_metadata, None,
                   None, None, *args, *constexpr_values)
        return kernel

    def entry(self, args: Sequence, constexprs: dict, num_warps: int = 4, num_stages=None, maxnreg=None):
        """(compiled kernel, constexpr values) that a launch with these arguments used, or None
        where launches take Triton's own path."""
        if self.tensors is None or not self.fast_path_ok(args):
            return None
        try:
            key = self._key(args, constexprs, (num_warps, num_stages, maxnreg))
        except (AttributeError, TypeError):
            return None
        return self.compiled.get((torch.cuda.current_device(), key))


def launch_options(num_warps: int, num_stages=None, maxnreg=None) -> dict:
    """Triton's launch options: ``maxnreg`` caps the registers per thread (ptxas spills beyond)."""
    kw = {"num_warps": num_warps}
    if num_stages is not None:
        kw["num_stages"] = num_stages
    if maxnreg is not None:
        kw["maxnreg"] = maxnreg
    return kw


_LAUNCHERS: Dict[int, Launcher] = {}


def _launcher(fn) -> Launcher:
    launcher = _LAUNCHERS.get(id(fn))
    if launcher is None:   # setdefault: threads that race all get the one that was stored
        launcher = _LAUNCHERS.setdefault(id(fn), Launcher(fn))
    return launcher


def kernel_name(fn) -> str:
    """A kernel's short name for reports: ``_decode_split_kernel`` -> ``decode_split``."""
    fn = getattr(fn, "fn", fn)
    return getattr(fn, "__name__", str(fn)).strip("_").replace("_kernel", "")


def launch(fn, grid, args: Sequence, constexprs: dict, num_warps: int = 4, num_stages=None, maxnreg=None):
    """Launch ``fn`` (a @triton.jit kernel) on ``grid``; returns the compiled kernel. Every
    kernel launch of tritonkv goes through here (planned GPU calls replay kernels this
    launched), so this is where interpreted launches are serialized."""
    if interpreting():
        with interpreted(fn):
            return fn[grid](*args, **constexprs, num_warps=num_warps)
    return _launcher(fn)(grid, args, constexprs, num_warps, num_stages, maxnreg)


def compiled_entry(fn, args: Sequence, constexprs: dict, num_warps: int = 4, num_stages=None, maxnreg=None):
    """(compiled kernel, constexpr values) of an earlier launch of ``fn`` with arguments like
    these (same specialization), for callers that launch it directly; None if unknown."""
    if interpreting():
        return None
    return _launcher(fn).entry(args, constexprs, num_warps, num_stages, maxnreg)


def hooks_installed() -> bool:
    """Launches must go through Triton (a profiler's launch hook is set)."""
    return _hooks_installed()


def raw_stream(device: int) -> int:
    """The current CUDA stream of ``device``, as the handle kernel launchers take."""
    return _raw_stream(device)
