"""Plan once, run cheaply: repeat evict calls only allocate outputs and launch kernels.

    ev = tkv.Evictor(tkv.policies.keydiff(), budget=0.25)
    out = ev(keys, values)            # first call with this signature: validates, plans, compiles
    out = ev(other_keys, other_values)  # same shapes/strides/dtypes: allocations + launches only

A call's *signature* is what its launches depend on: shapes, strides, dtypes and devices of
keys, values and queries, whether their addresses are 16-byte aligned (Triton specializes
on it), whether they alias, the width of the seed and the current CUDA device. The first
call of a signature does all host work (validation, budget counts, launch geometry, Triton's
dispatch and compilation) and records, for each launch, the compiled kernel and its argument
list; later calls allocate the outputs and one scratch buffer, patch the data pointers and
the seed into the recorded arguments and call the compiled kernels' launchers directly.

Stream- and graph-safe: every call allocates its own buffers from PyTorch's caching
allocator (stream-ordered; private pools under CUDA-graph capture) and launches on the
current stream. ``tkv.evict`` keeps one Evictor per (policy, budget, backend), so plain
``evict`` calls get the same planned path.

Thread-safe: looking up an Evictor or a plan is a lock-free dict lookup; making an Evictor,
and planning a new signature (the first call, which runs under the Evictor's lock), happen
once however many threads make the same first call at the same time.
"""

from __future__ import annotations

import threading
from typing import Dict, Tuple

import torch

from . import dsl
from .budget import resolve_budget
from .eager import evict_reference
from .results import Evicted
from .validate import BACKENDS, check_evict_args, check_seed, named_inputs

_I32_MAX, _I64_MAX = 2 ** 31 - 1, 2 ** 63 - 1
_MAX_PLANS = 64   # signatures kept per Evictor (a cache that grows with N is cleared, not leaked)


def _signature(keys, values, queries, seed, named) -> Tuple:
    """What a compiled call's launches depend on (raises AttributeError / TypeError for
    arguments that are not tensors: those take the validating path)."""
    q = None if queries is None else (queries.shape, queries.stride(), queries.dtype, queries.device,
                                      queries.data_ptr() & 15, queries is keys, queries is values)
    extra = tuple([(t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15) for t in named]) if named else ()
    return (keys.shape, keys.stride(), keys.dtype, keys.device, keys.data_ptr() & 15,
            values.shape, values.stride(), values.dtype, values.device, values.data_ptr() & 15,
            keys is values, q, seed > _I32_MAX, seed > _I64_MAX,
            torch.cuda.current_device() if keys.is_cuda else -1, extra)


def _ordered(policy: dsl.Policy, signals, directions):
    """The named tensors in the policy's order, or None when the dicts do not hold exactly
    the names the policy reads (the validating path then says what is wrong)."""
    try:   # the names are cached on the (frozen) policy
        if len(signals or ()) != len(policy.signals) or len(directions or ()) != len(policy.directions):
            return None
        return named_inputs(policy, signals, directions)
    except (KeyError, TypeError):
        return None


class Evictor:
    """``evict`` for one policy and budget, planned once per signature.

    Args:
        policy: clauses joined with ``|``, or a preset from ``tritonkv.policies``.
        budget: tokens kept per head (int) or a fraction of N in (0, 1].
        backend: "auto", "triton" or "reference", as for :func:`tritonkv.evict`.
        gather: False returns the kept indices only (``Evicted(None, None, indices)``): for a
            caller that moves the rows itself, e.g. compacting a fixed buffer in place
            (``tritonkv.kernels.compact.compact_in_place``); the compiled path then skips the
            copy of the kept rows.

    Calling it, ``ev(keys, values, queries=None, seed=0, signals=None, directions=None)``, is
    ``tkv.evict(keys, values, policy, budget, queries=queries, seed=seed, signals=signals,
    directions=directions, backend=backend)``: the same checks on the first call of each
    signature, the same result, bit for bit.
    """

    def __init__(self, policy, budget, *, backend: str = "auto", gather: bool = True):
        self.policy = dsl.as_policy(policy)
        resolve_budget(budget, 1 << 62)   # type and range, with evict's messages
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if not isinstance(gather, bool):
            raise TypeError(f"gather: expected a bool, got {type(gather).__name__}")
        if not gather and self.policy.heads == "adaptive":
            raise ValueError("gather: False is for uniform-budget policies; an adaptive (AdaKV) policy returns "
                             "packed rows (EvictedVarlen)")
        self.budget, self.backend, self.gather = budget, backend, gather
        self._reads_named = bool(self.policy.signals or self.policy.directions)
        self._plans: Dict[Tuple, object] = {}
        self._planning = threading.Lock()   # held by a first call of a signature (_plan_and_run)

    def __repr__(self):
        gather = "" if self.gather else ", gather=False"
        return f"Evictor({self.policy!r}, budget={self.budget!r}, backend={self.backend!r}{gather})"

    def __call__(self, keys, values, *, queries=None, seed: int = 0, signals=None, directions=None):
        if type(seed) is not int or not 0 <= seed <= 0xFFFFFFFFFFFFFFFF:
            seed = check_seed(seed)
        named = () if signals is None and directions is None and not self._reads_named \
            else _ordered(self.policy, signals, directions)
        try:
            signature = None if named is None else _signature(keys, values, queries, seed, named)
        except (AttributeError, TypeError):   # not tensors: the validating path says what is wrong
            signature = None
        plan = self._plans.get(signature)
        if plan is None:
            return self._plan_and_run(signature, keys, values, queries, seed, signals, directions)
        return plan(keys, values, queries, seed, named)

    def graph(self, keys, values, *, queries=None, seed: int = 0, signals=None, directions=None):
        """This call over these CUDA tensors captured as a CUDA graph (graphed.EvictionGraph):
        ``g = ev.graph(keys, values, ...)``, then ``g()`` evicts the tensors' current contents
        with one graph launch of host work, into the same outputs every time."""
        from .graphed import EvictionGraph
        return EvictionGraph(self, keys, values, queries=queries, seed=seed, signals=signals, directions=directions)

    def _plan_and_run(self, signature, keys, values, queries, seed, signals, directions):
        """A call with no plan yet. Under the lock, so that threads making the same first call
        plan it once: those that waited find the plan made and run it."""
        with self._planning:
            plan = self._plans.get(signature)
            if plan is not None:
                return plan(keys, values, queries, seed, _ordered(self.policy, signals, directions))
            return self._plan(signature, keys, values, queries, seed, signals, directions)

    def _plan(self, signature, keys, values, queries, seed, signals, directions):
        policy, k, seed = check_evict_args(keys, values, self.policy, self.budget, queries, seed, self.backend,
                                           signals, directions)
        named = named_inputs(policy, signals, directions)
        backend = self.backend
        if backend == "auto":
            backend = "triton" if keys.is_cuda else "reference"
        if backend == "reference":
            plan = _Unplanned(evict_reference, policy, k, self.gather)
            out = plan(keys, values, queries, seed, named)
        else:
            from .planned import plan_compiled   # imports triton only when asked for
            plan, out = plan_compiled(policy, k, keys, values, queries, seed, named, self.gather)
        if signature is not None and plan is not None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[signature] = plan
        return out


class _Unplanned:
    """A validated signature whose calls run the given path as they are (the reference, the
    interpreter, AdaKV's PyTorch selection)."""

    def __init__(self, fn, policy: dsl.Policy, k: int, gather: bool = True):
        self.fn, self.policy, self.k, self.gather = fn, policy, k, gather

    def __call__(self, keys, values, queries, seed, named=()):
        out = self.fn(keys, values, queries, self.policy, self.k, seed, named)
        return out if self.gather else Evicted(None, None, out.indices)


_EVICTORS: Dict[Tuple, Tuple[dsl.Policy, Evictor]] = {}
_MAX_EVICTORS = 256
_EVICTORS_LOCK = threading.Lock()   # making a new Evictor: threads that race share one


def evictor_for(policy, budget, backend: str) -> Evictor:
    """The Evictor that ``tkv.evict`` uses for this policy object, budget and backend."""
    key = (id(policy), budget, type(budget), backend)
    try:
        hit = _EVICTORS.get(key)
    except TypeError:   # an unhashable budget: let Evictor say what is wrong with it
        return Evictor(policy, budget, backend=backend)
    if hit is not None and hit[0] is policy:
        return hit[1]
    return _new_evictor(key, policy, budget, backend)


def _new_evictor(key: Tuple, policy, budget, backend: str) -> Evictor:
    """Make and keep the Evictor of ``key``, or return the one another thread just made."""
    with _EVICTORS_LOCK:
        hit = _EVICTORS.get(key)
        if hit is not None and hit[0] is policy:
            return hit[1]
        ev = Evictor(policy, budget, backend=backend)
        if len(_EVICTORS) >= _MAX_EVICTORS:
            _EVICTORS.clear()
        _EVICTORS[key] = (policy, ev)   # holding the policy keeps its id from being reused
        return ev


def clear_plans() -> None:
    """Forget every cached Evictor (and so every plan) that ``tkv.evict`` made."""
    with _EVICTORS_LOCK:
        _EVICTORS.clear()


__all__ = ["Evictor", "evictor_for", "clear_plans"]
