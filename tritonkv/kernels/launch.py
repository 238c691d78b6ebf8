"""Kernel launches with little host overhead.

``kernel[grid](*args)`` costs tens of microseconds of Python per launch in Triton 3.6
(argument binding, specialization, cache-key hashing), more than a small eviction's GPU
work. ``Launcher`` goes through Triton the first time it sees a specialization (so Triton
compiles, caches and checks as usual) and afterwards calls the compiled kernel directly.

The specialization key mirrors Triton's: each tensor's dtype and whether its address is
16-byte aligned; each int's width and, unless the parameter is in ``do_not_specialize``,
whether it equals 1 or is divisible by 16; every constexpr value; the launch options.
When a launch hook is installed (profilers), every launch takes Triton's own path; otherwise
the hooks are passed as None so the C launcher skips them.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from triton import knobs

from .common import interpreting


def _hooks_installed() -> bool:
    """A launch hook (profiler) is set. Triton 3.6 keeps hooks as a HookChain, always present."""
    hook = knobs.runtime.launch_enter_hook
    return bool(getattr(hook, "calls", hook))


def _int_kind(value: int, specialize: bool):
    wide = not (-2 ** 31 <= value < 2 ** 31)
    if not specialize:
        return ("i64" if wide else "i32",)
    return ("i64" if wide else "i32", value == 1, value % 16 == 0)


class Launcher:
    def __init__(self, fn):
        self.fn = fn
        params = fn.params
        self.runtime = [p for p in params if not p.is_constexpr]
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        self.order = [(p.is_constexpr, p.name) for p in params]
        self.compiled: Dict[tuple, object] = {}

    def _key(self, args: Sequence, constexprs: dict, options: tuple, device_index: int) -> tuple:
        key = [device_index, options]
        for p, a in zip(self.runtime, args):
            if isinstance(a, torch.Tensor):
                key.append((a.dtype, a.data_ptr() % 16 == 0))
            elif isinstance(a, bool):
                key.append(("i1", a))
            elif isinstance(a, int):
                key.append(_int_kind(a, not p.do_not_specialize))
            else:
                key.append(type(a))
        key.extend(constexprs[name] for name in self.constexpr_names)
        return tuple(key)

    def __call__(self, grid, args: Sequence, constexprs: dict, num_warps: int = 4, num_stages=None):
        options = {"num_warps": num_warps}
        if num_stages is not None:
            options["num_stages"] = num_stages
        if _hooks_installed():
            return self.fn[grid](*args, **constexprs, **options)
        device = torch.cuda.current_device()
        key = self._key(args, constexprs, tuple(sorted(options.items())), device)
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **constexprs, **options)
            self.compiled[key] = kernel
            return kernel
        values = iter(args)
        full = [constexprs[name] if is_constexpr else next(values) for is_constexpr, name in self.order]
        grid = tuple(grid) + (1,) * (3 - len(grid))
        stream = torch.cuda.current_stream(device).cuda_stream
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None,
                   None, None, *full)
        return kernel


_LAUNCHERS: Dict[int, Launcher] = {}


def launch(fn, grid, args: Sequence, constexprs: dict, num_warps: int = 4, num_stages=None):
    """Launch ``fn`` (a @triton.jit kernel) on ``grid``; returns the compiled kernel."""
    if interpreting():
        return fn[grid](*args, **constexprs, num_warps=num_warps)
    launcher = _LAUNCHERS.get(id(fn))
    if launcher is None:
        launcher = _LAUNCHERS[id(fn)] = Launcher(fn)
    return launcher(grid, args, constexprs, num_warps, num_stages)
