"""The compiled path, planned: a call recorded once, replayed by calling kernel launchers.

``plan_compiled`` runs a first call through compiler.prepare / compiler.run (Triton
dispatch, compilation) and turns its launches into ``Step``s: the compiled kernel, its
grid, and its full argument list with the per-call entries — data pointers of the inputs,
outputs and scratch buffer, and the seed — replaced on each later call. A tensor argument
is recognised as an input by identity, or as a view into one of the call's own buffers by
its address (the buffers are allocated afresh with the same sizes, so views keep their
offsets). Anything it cannot recognise leaves the signature unplanned (correct, slower).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import dsl
from .budget import allocate
from .lowering import lower
from .adaptive import adaptive_programs, prepare_adaptive
from .compiled import evict_compiled
from .compiler import Call, check_backend, compile_policy, prepare, run, score_programs, selection_programs
from .kernels import batch_launch
from .kernels.common import env_flag, interpreting
from .kernels.launch import compiled_entry, hooks_installed, raw_stream
from .results import Evicted, varlen_from

# roles of per-call values, in the order Plan.__call__ lists them; the named inputs (signals,
# directions) follow as NAMED, NAMED + 1, ...
KEYS, VALUES, QUERIES, SCRATCH, INDICES, OUT_KEYS, OUT_VALUES, SEED, NAMED = range(9)


class Step:
    """One recorded launch: ``launcher(*grid, stream, function, metadata, None, None, None, *args)``."""

    __slots__ = ("kernel", "launcher", "grid", "head", "template", "patches")

    def __init__(self, kernel, grid, template: list, patches: Sequence[Tuple[int, int, int]]):
        self.kernel = kernel
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.launcher, self.head = _launcher_of(kernel)
        self.template = template
        self.patches = tuple(patches)   # (argument position, role, byte offset)


def _launcher_of(kernel):
    """(callable, leading arguments after the stream) that launch a compiled kernel. Triton's
    Python launcher only allocates the kernel's global / profile scratch memory before it
    calls the C launcher; kernels that need none are launched by the C launcher directly."""
    run = kernel.run
    c_launch = getattr(run, "launch", None)
    if c_launch is not None and getattr(run, "global_scratch_size", 1) == 0 \
            and getattr(run, "profile_scratch_size", 1) == 0:
        return c_launch, (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                          kernel.packed_metadata, None, None, None)
    return run, (kernel.function, kernel.packed_metadata, None, None, None)


class Plan:
    """Replays a recorded compiled call on new tensors of the same signature, in one call into C
    (kernels/batch_launch.py) where every kernel allows it, else a call of Triton's launcher per
    kernel. Through C the launches are one CUDA graph whose kernel nodes are re-pointed where a
    call's addresses changed (H100: a node update and one graph launch cost less than a launch
    each). A graph's launches run in the order they were made, so calls of one plan on several
    streams no longer overlap on the GPU. Without graphs (``TRITONKV_GRAPH_LAUNCH=0``, or no C
    module), or as two graphs (``split_graphs``), the outputs are allocated after the launches
    that do not write them (statistics, score) are queued, so the GPU starts while the host
    still allocates."""

    def __init__(self, steps: List[Step], device: torch.device, shapes, scratch_numel: int, packed_heads: int = 0):
        self.steps = steps   # what the launchers below were built from (diagnostics: perf/graph_launch_diag.py)
        late = next((i for i, step in enumerate(steps)
                     if any(role in (INDICES, OUT_KEYS, OUT_VALUES) for _, role, _ in step.patches)), len(steps))
        graphed = batch_launch.graphs_enabled()
        split = split_graphs() and graphed and 0 < late < len(steps)
        self.whole = _launcher(steps, device, graphed=True) if graphed and not split else None
        if self.whole is None or self.whole[0] is _launch:   # two groups of launches, split where outputs are written
            self.whole = None
            self.early, self.late = _launcher(steps[:late], device, split), _launcher(steps[late:], device, split)
        self.device = device
        self.device_index = device.index
        self.indices_shape, self.keys_shape, self.values_shape = shapes
        self.scratch_numel = scratch_numel
        self.packed_heads = packed_heads   # AdaKV: KV heads of its packed result (indices hold the lengths too)
        self.fallback = None   # set by plan_compiled: the unplanned call, for launch hooks

    def graph_status(self):
        """(graph state, (CUresult, step)) of this plan's CUDA graph, as kernels/batch_launch.c
        reports them (state 0: not launched yet, 1: on its graph; a CUresult other than 0 says
        why the graph was dropped and at which step), of its late graph where split_graphs
        splits it; None where the plan launches plainly."""
        launch, handle = self.whole if self.whole is not None else self.late
        mod = batch_launch.module()
        if launch is _launch or mod is None:
            return None
        state = mod.graph_state(handle)
        return None if state < 0 else (state, mod.graph_error(handle))

    def __call__(self, keys, values, queries, seed, named=()):
        if hooks_installed():   # a profiler wants to see Triton's launches
            return self.fallback(keys, values, queries, seed, named)
        stream = raw_stream(self.device_index)
        # allocations from keys (its device) with unpacked sizes: ~0.6-1.4 us less each than
        # torch.empty(shape, device=...) on this path's argument parsing (CPU timing)
        scratch = keys.new_empty(self.scratch_numel, dtype=torch.float32) if self.scratch_numel else None
        values_of = [keys.data_ptr(), values.data_ptr(), 0 if queries is None else queries.data_ptr(),
                     0 if scratch is None else scratch.data_ptr(), 0, 0, 0, seed]
        if named:
            values_of += [t.data_ptr() for t in named]
        if self.whole is None:
            launch, steps = self.early
            launch(steps, stream, values_of)
        indices = keys.new_empty(*self.indices_shape, dtype=torch.int64)
        values_of[INDICES] = indices.data_ptr()
        out_k = out_v = None
        if self.keys_shape is not None:   # None: a call without gather, the indices only
            out_k = keys.new_empty(*self.keys_shape)   # keys' dtype and device (the signature's)
            out_v = values.new_empty(*self.values_shape)
            values_of[OUT_KEYS:OUT_VALUES + 1] = out_k.data_ptr(), out_v.data_ptr()
        launch, steps = self.late if self.whole is None else self.whole
        launch(steps, stream, values_of)
        if self.packed_heads:
            return varlen_from(out_k, out_v, indices, self.packed_heads)
        return Evicted(out_k, out_v, indices)


def split_graphs() -> bool:
    """Whether a graphed plan is two CUDA graphs, split where the outputs are first written
    (``TRITONKV_GRAPH_SPLIT=1``): the statistics and score graph is launched before the outputs
    are allocated, so the GPU starts while the host allocates them, for a second graph launch.
    Off by default: at 128K it took 0.90-0.98x the wall time of one call, but 3-5 us more host
    time per call, which back-to-back calls pay (H100, 73f367d)."""
    return env_flag("TRITONKV_GRAPH_SPLIT", False)


def _launcher(steps: List[Step], device: torch.device, graphed: bool = False):
    """(launch, steps) with ``launch(steps, stream, values_of)`` running the steps in order:
    one batched call into C (``graphed``: as a re-pointed CUDA graph), or Triton's launcher
    per step."""
    roles = 1 + max((role for step in steps for _, role, _ in step.patches), default=-1)
    batched = batch_launch.batch([(s.kernel, s.grid, s.template, s.patches) for s in steps], device.index, roles,
                                 graphed)
    return (_launch, steps) if batched is None else batched


def _launch(steps: List[Step], stream: int, values_of) -> None:
    for step in steps:
        args = step.template.copy()
        for position, role, offset in step.patches:
            args[position] = values_of[role] + offset
        step.launcher(*step.grid, stream, *step.head, *args)


def _role(arg: torch.Tensor, inputs, buffers) -> Optional[Tuple[int, int]]:
    for role, tensor in inputs:
        if arg is tensor:
            return role, 0
    ptr = arg.data_ptr()
    for role, tensor in buffers:
        base = tensor.data_ptr()
        if base <= ptr < base + max(1, tensor.numel() * tensor.element_size()):
            return role, ptr - base
    return None


def record(call: Call, keys, values, queries, named=(), packed_heads: int = 0) -> Optional[Plan]:
    """A Plan replaying ``call`` (already run), or None if some launch cannot be replayed."""
    inputs = [(KEYS, keys), (VALUES, values), (QUERIES, queries)] + [(NAMED + i, t) for i, t in enumerate(named)]
    buffers = [(role, t) for role, t in ((SCRATCH, call.scratch), (INDICES, call.indices),
                                         (OUT_KEYS, call.keys), (OUT_VALUES, call.values)) if t is not None]
    steps = []
    for launch in call.launches:
        entry = compiled_entry(launch.fn, launch.args, launch.constexprs, launch.num_warps, launch.num_stages,
                               launch.maxnreg)
        if entry is None:
            return None
        kernel, constexpr_values = entry
        template = list(launch.args) + list(constexpr_values)
        patches = []
        for position, arg in enumerate(launch.args):
            if isinstance(arg, torch.Tensor):
                found = _role(arg, inputs, buffers)
                if found is None:
                    return None
                patches.append((position, *found))
                template[position] = None
        if launch.seed_arg is not None:
            patches.append((launch.seed_arg, SEED, 0))
        steps.append(Step(kernel, launch.grid, template, patches))
    scratch_numel = 0 if call.scratch is None else call.scratch.numel()
    shapes = [None if t is None else tuple(t.shape) for t in (call.indices, call.keys, call.values)]
    return Plan(steps, keys.device, shapes, scratch_numel, packed_heads)


class _Compiled:
    """An unplanned compiled call (interpreter, launch hooks)."""

    def __init__(self, policy: dsl.Policy, k: int, gather: bool = True):
        self.policy, self.k, self.gather = policy, k, gather

    def __call__(self, keys, values, queries, seed, named=()):
        return evict_compiled(keys, values, queries, self.policy, self.k, seed, named, gather=self.gather)


def plan_compiled(policy: dsl.Policy, k: int, keys, values, queries, seed: int, named=(), gather: bool = True):
    """(plan or None, result) of a first compiled call with this signature. None means: plan
    on the next call (the select or score kernel's occupancy, which sets its grid, was learnt
    just now).
    ``gather=False``: the kept indices only (the results' keys and values are None)."""
    check_backend(keys)
    unplanned = _Compiled(policy, k, gather)
    if interpreting() or not keys.is_cuda or hooks_installed():
        return unplanned, unplanned(keys, values, queries, seed, named)
    b, h, n = keys.shape[:3]
    policy, alloc = lower(policy, allocate(policy, n, k))
    compiled = compile_policy(policy)
    adaptive = policy.heads == "adaptive"
    dims = (keys.shape[-1], values.shape[-1]) if gather else (0, 0)

    def grids():   # what the launches' grids depend on, learnt by the first launches
        selects = adaptive_programs(keys) if adaptive \
            else selection_programs(compiled.program, b, h, n, keys.device, dims)
        return selects, score_programs(compiled, keys, values, queries)

    before = grids()
    if adaptive:
        call = prepare_adaptive(compiled, policy, alloc, keys, values, queries, seed, named)
        run(call)
        out = varlen_from(call.keys, call.values, call.indices, h)
    else:
        call = prepare(compiled, alloc, keys, values, queries, seed, named, gather)
        run(call)
        out = Evicted(call.keys, call.values, call.indices)
    if grids() != before:
        return None, out
    plan = record(call, keys, values, queries, named, h if adaptive else 0)
    if plan is None:
        return unplanned, out
    plan.fallback = unplanned
    return plan, out
