"""Interpreted launches (TRITON_INTERPRET=1: the CPU, tests and CI): serialized, and without
Triton 3.6's per-helper-call re-patching of triton.language.

Triton's interpreter patches triton.language's builtins for the duration of a launch and
keeps the grid and program id in one global builder, so two concurrent launches break each
other ("Did you forget to add @triton.jit ?", "y >= grid_dim[1]"): ``interpreted`` holds one
process-wide lock around each.

Within a launch, every call of a ``@triton.jit`` helper from the kernel (``_logits``,
``_row``, a generated ``merge_0``...) patches the language again: ``inspect.getmembers``
over triton.language, triton.language.math and the tensor class, about 1 ms a call, and a
no-op when the helper's module sees the same language module as the kernel (the launch has
patched it already). Select and the decode kernels call helpers in loops, so that was 9-25%
of an interpreted test's time. While ``interpreted`` runs a launch, a helper whose
language modules the launch has patched is called without patching; any other takes
Triton's own path. Results are unchanged (tests/test_kernels.py compares both ways).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Dict, FrozenSet

import triton
import triton.language as tl

LOCK = threading.Lock()

_LANGS = (tl, tl.core)
_langs_of: Dict[object, FrozenSet[int]] = {}   # function -> ids of the language modules its globals hold


def _langs(fn) -> FrozenSet[int]:
    langs = _langs_of.get(fn)
    if langs is None:
        langs = _langs_of.setdefault(fn, frozenset(
            id(value) for value in fn.__globals__.values() if inspect.ismodule(value) and value in _LANGS))
    return langs


@functools.lru_cache(maxsize=None)
def _fast_helpers_supported() -> bool:
    """The helper fast path replaces InterpretedFunction.__call__, whose body it repeats:
    only on the Triton it was written against (requirements pin it)."""
    if triton.__version__ != "3.6.0":
        return False
    from triton.runtime import interpreter
    return hasattr(interpreter, "InterpretedFunction") and hasattr(interpreter, "_patch_lang")


@contextlib.contextmanager
def interpreted(kernel_fn, fast_helpers: bool = True):
    """Hold the lock for one interpreted launch of ``kernel_fn`` (the @triton.jit function);
    with ``fast_helpers``, its helpers skip the redundant re-patching described above."""
    with LOCK:
        if not (fast_helpers and _fast_helpers_supported()):
            yield
            return
        from triton.runtime import interpreter
        cls = interpreter.InterpretedFunction
        triton_call = cls.__call__
        patched = _langs(getattr(kernel_fn, "fn", kernel_fn))

        def call(self, *args, **kwargs):   # a device-function call, as Triton's minus the patching
            if not _langs(self.fn) <= patched:
                return triton_call(self, *args, **kwargs)
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise interpreter.InterpreterError(repr(e)) from e

        cls.__call__ = call
        try:
            yield
        finally:
            cls.__call__ = triton_call
