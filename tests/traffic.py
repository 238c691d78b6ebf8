"""Bytes each launch of a compiled call loads and stores, per tensor, counted in Triton's
interpreter (every masked-in lane of every tl.load / tl.store): what a kernel reads from HBM at
most, L1 / L2 hits included. ``unique`` counts each address once (what a kernel needs at least)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Dict, Tuple

import numpy as np
from triton.runtime import interpreter


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or fn.fn.__name__


class Traffic:
    """``measure(call, regions)`` runs a prepared compiler.Call launch by launch; afterwards
    ``bytes[(kernel, region, "load" | "store")]`` and ``unique[...]`` hold what it moved.
    ``regions``: name -> tensor; addresses outside every region count as "other"."""

    def __init__(self, regions: Dict[str, object]):
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
                 for name, t in regions.items() if t is not None]
        self.spans = sorted(spans, key=lambda s: s[1] - s[0])   # a view (the slots) before its buffer
        self.kernels = []
        self.bytes: Dict[Tuple[str, str, str], int] = defaultdict(int)
        self._seen: Dict[Tuple[str, str, str], set] = defaultdict(set)
        self._kernel = None

    @property
    def unique(self) -> Dict[Tuple[str, str, str], int]:
        return {key: sum(size for _, size in seen) for key, seen in self._seen.items()}

    def _count(self, ptrs, mask, kind: str) -> None:
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        addresses = addresses[np.broadcast_to(mask.data, addresses.shape)].astype(np.int64).ravel()
        for start, end, name in self.spans:
            inside = (addresses >= start) & (addresses < end)
            self._add(name, kind, addresses[inside], size)
            addresses = addresses[~inside]
        self._add("other", kind, addresses, size)

    def _add(self, region: str, kind: str, addresses, size: int) -> None:
        if addresses.size:
            key = (self._kernel, region, kind)
            self.bytes[key] += addresses.size * size
            self._seen[key].update((int(a), size) for a in np.unique(addresses))

    def total(self, region: str, kind: str, kernel=None) -> int:
        return sum(v for (k, r, t), v in self.bytes.items() if r == region and t == kind and kernel in (None, k))

    @contextlib.contextmanager
    def _patched(self):
        builder = interpreter.InterpreterBuilder
        load, store = builder.create_masked_load, builder.create_masked_store

        def counted_load(b, ptrs, mask, *args):
            self._count(ptrs, mask, "load")
            return load(b, ptrs, mask, *args)

        def counted_store(b, ptrs, value, mask, *args):
            self._count(ptrs, mask, "store")
            return store(b, ptrs, value, mask, *args)

        builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
        try:
            yield
        finally:
            builder.create_masked_load, builder.create_masked_store = load, store

    def run(self, call) -> "Traffic":
        with self._patched():
            for step in call.launches:
                self._kernel = _name(step.fn)
                self.kernels.append(self._kernel)
                step()
        return self
