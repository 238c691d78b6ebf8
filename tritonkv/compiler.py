"""Policy -> plan of passes -> generated Triton source -> launches.

A compiled policy runs, in order:
  1. for each statistics level: ``stats_L`` (partials per program) and ``merge_L`` (per row);
  2. ``score``: one fused kernel writing each slot's float32 score per token;
  3. ``select`` (kernels/select.py): threshold select per clause, on the priority it computes
     from the clause's slot (kernels/keys.py: a sample clause's noise is drawn there), and
     compaction of the kept indices; 4. ``gather`` (kernels/gather.py): the kept K / V rows.
``prepare`` lists a call's launches and buffers (a top clause ranked by ``x.normalize()`` adds
two light passes, kernels/deferred.py, a sample clause of ``x.normalize()`` one; one ranked by
chunks or across heads an in-place transform, kernels/transform.py); ``run`` launches them
through Triton. Launch geometry and the scratch layout come from tritonkv.geometry;
tritonkv.compiled is the unplanned evict on top of this module, tritonkv.runtime plans a call
once per signature and afterwards launches the compiled kernels directly.
No per-primitive score tensor and no [W, N] attention matrix reaches global memory: the
only intermediates are the slots (one float32 per token per slot; top and sample clauses of
one score share one) and row statistics.

Generated modules are cached by policy structure, in memory and on disk (content-hashed
files under ``$TRITONKV_CACHE_DIR``, default ``~/.cache/tritonkv``), so a second call with
the same policy compiles nothing. ``TRITONKV_DEBUG=1`` prints where each source is written.
Threads and processes may compile the same policy at once: files are written through
temporaries unique per process and thread and renamed into place; a process generates and
executes each module once (under _LOCK); cache hits take no lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import dsl
from .codegen import SEED_ARG, Program, generate
from .geometry import Geometry, clear_geometry, geometry, score_waves, stats_per_sm
from .kernels.common import interpreting, learnt_occupancy, multiprocessor_count, record_occupancy
from .kernels.gather import GATHER_WARPS, _gather_kernel, gather_launch
from .kernels.launch import launch
from .kernels.deferred import DEFERRED_WARPS, deferred_launches, moments_launch
from .kernels.keys import _priorities_kernel, priorities_launch
from .kernels.pooling import POOL_WARPS, pool_launch
from .kernels.transform import TRANSFORM_WARPS, _transform_kernel, transform_launch
from .kernels.select import (SELECT_SEED_ARG, select_warps, _select_kernel, select_launch, select_programs,
                             workspace_sizes, zeroed_numel)


def cache_dir() -> Path:
    return Path(os.environ.get("TRITONKV_CACHE_DIR", Path.home() / ".cache" / "tritonkv"))


@dataclass
class CompiledPolicy:
    program: Program
    module: object
    path: Path

    def kernel(self, name: str):
        return getattr(self.module, name)


_CACHE: Dict[Tuple, CompiledPolicy] = {}
GENERATED_PREFIX = "tritonkv_generated_"   # sys.modules names of generated modules


def structure_key(policy: dsl.Policy) -> Tuple:
    """What the generated code and its Program depend on: the selective clauses' kinds,
    scores, temperatures and priority transforms (chunks, head reduce)."""
    return tuple((type(c).__name__, c.score, getattr(c, "temperature", None), getattr(c, "chunk", 1),
                  getattr(c, "chunk_reduce", None), getattr(c, "head_reduce", None)) for c in policy.selective)


# Guards the miss path of the compiled-policy cache and module loading (generation, the file
# write, exec into sys.modules), so threads never load one module twice or use a half-executed
# one. Hits never take it. Re-entrant: _compile holds it around _load_module.
_LOCK = threading.RLock()


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file named for this process and thread
    (threads write too, and a per-process name let one thread rename another's file away),
    renamed over it: readers in any process or thread see the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _load_module(source: str) -> Tuple[object, Path]:
    """The module of generated ``source``: written to the disk cache (content-hashed name) if
    missing, executed once per process."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    directory = cache_dir() / "kernels"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"tkv_{digest}.py"
    if not path.exists() or path.read_text() != source:
        _write_atomically(path, source)
    if os.environ.get("TRITONKV_DEBUG"):
        print(f"[tritonkv] generated kernels: {path}", file=sys.stderr)
    name = f"{GENERATED_PREFIX}{digest}"
    with _LOCK:
        if name in sys.modules:
            return sys.modules[name], path
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]   # a later call retries rather than getting half a module
            raise
    return module, path


_BY_IDENTITY: Dict[int, Tuple[dsl.Policy, CompiledPolicy]] = {}


def compile_policy(policy: dsl.Policy) -> CompiledPolicy:
    """The generated module of a policy (cached by structure; by identity first, which skips
    hashing the expression tree when the same policy object comes back). Hits are lock-free
    dict lookups; only a new structure takes the lock (_compile)."""
    hit = _BY_IDENTITY.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    key = structure_key(policy)
    compiled = _CACHE.get(key)
    if compiled is None:
        compiled = _compile(key, policy)
    if len(_BY_IDENTITY) > 1024:
        _BY_IDENTITY.clear()
    _BY_IDENTITY[id(policy)] = (policy, compiled)   # holding the policy keeps its id from being reused
    return compiled


def _compile(key: Tuple, policy: dsl.Policy) -> CompiledPolicy:
    """Generate and load a policy's module once, however many threads ask at the same time
    (checked again under the lock: another thread may have finished it meanwhile)."""
    with _LOCK:
        compiled = _CACHE.get(key)
        if compiled is None:
            program = generate(policy)
            module, path = _load_module(program.source)
            compiled = _CACHE[key] = CompiledPolicy(program, module, path)
        return compiled


def clear_memory_caches() -> None:
    """Forget, in this process, every compiled policy, its launch geometry and its generated
    module, so that the next call generates and loads again (from the disk cache, which is
    kept): for tests of cold starts. Not for use while other threads evict."""
    with _LOCK:
        _CACHE.clear()
        _BY_IDENTITY.clear()
        clear_geometry()   # keyed by id(program): must not outlive the programs
        for name in [m for m in sys.modules if m.startswith(GENERATED_PREFIX)]:
            del sys.modules[name]


def _broadcast_strides(x: torch.Tensor, dims: int):
    """``dims`` strides of x read as [B, H, n] (signals) or [B, H, D] (directions): a dim of
    size 1 or missing (a direction [H, D]) gets stride 0, so it broadcasts."""
    strides = [0 if size == 1 else stride for size, stride in zip(x.shape, x.stride())]
    return [0] * (dims - len(strides)) + strides


def named_args(named) -> List:
    """Kernel arguments of the named inputs (validate.named_inputs): each tensor and its strides."""
    out: List = []
    for x in named:
        out += [x, *_broadcast_strides(x, 3)]
    return out


@dataclass(frozen=True)
class Layout:
    """How the generated kernels address K and V: the [B, H, N, D] shapes they see and the
    strides of (batch, head, position, dim) — of a paged cache (page, head, slot, dim), with the
    block table (int32 [B, max pages]), tokens per page, and the sequence table of the batch
    (kernels/sequences.py: B sequences, N the longest) with its statistics programs per row."""

    k_shape: Tuple[int, ...]
    v_shape: Tuple[int, ...]
    k_strides: Tuple[int, ...]
    v_strides: Tuple[int, ...]
    block_table: Optional[torch.Tensor] = None
    page: int = 0
    sequences: Optional[torch.Tensor] = None
    splits: Optional[int] = None

    @staticmethod
    def dense(keys: torch.Tensor, values: torch.Tensor) -> "Layout":
        return Layout(tuple(keys.shape), tuple(values.shape), keys.stride(), values.stride())


def launch_args(compiled: CompiledPolicy, keys, values, queries, seed: int, out: torch.Tensor, workspace=None,
                zeroed=None, named=(), layout: Optional[Layout] = None):
    """(geometry, args) of the generated kernels for these inputs. ``workspace``: the float32
    workspace (tritonkv.geometry's layout; default: one of its own, where the statistics
    partials do not share the memory of ``out``); ``zeroed``: an int32 tensor the score kernel
    sets to zero (select's histograms and barriers), or None; ``named``: the policy's signal and
    direction tensors, in its order; ``layout``: how K and V are addressed (default: the dense
    tensors as they are)."""
    layout = Layout.dense(keys, values) if layout is None else layout
    geo = _geometry_of(compiled, keys, layout, queries)
    workspace = out.new_empty(geo.ranking_numel(0)) if workspace is None else workspace
    q = keys if queries is None else queries
    q_strides = (0, 0, 0, 0) if queries is None else queries.stride()
    z = workspace if zeroed is None else zeroed
    bt = keys if layout.block_table is None else layout.block_table
    sq = keys if layout.sequences is None else layout.sequences
    args = [keys, values, q, workspace, out, z, bt, sq, *layout.k_strides, *layout.v_strides, *q_strides,
            layout.k_shape[2], layout.k_shape[1], 0 if queries is None else queries.shape[2], seed, geo.rows,
            geo.splits, geo.tiles_per_prog, 0 if zeroed is None else zeroed.numel(), *geo.per_global,
            *named_args(named)]
    return geo, args


@dataclass
class Launch:
    """One kernel launch of an evict call (what kernels.launch.launch takes); ``seed_arg`` is
    the position of the call's seed among ``args``, if it has one."""

    fn: object
    grid: Tuple[int, ...]
    args: List
    constexprs: Dict
    num_warps: int = 4
    num_stages: Optional[int] = None
    seed_arg: Optional[int] = None
    maxnreg: Optional[int] = None   # registers per thread the build may use (None: as ptxas likes)

    def __call__(self):
        return launch(self.fn, self.grid, self.args, self.constexprs, self.num_warps, self.num_stages, self.maxnreg)


def _score_launches(compiled: CompiledPolicy, geo: Geometry, args, priorities, workspace, shape,
                    head_rows: bool = True) -> List[Launch]:
    """Statistics and merge per level, the score kernel, then per slot its pooling (a proxy
    attention pooled after the score kernel), its deferred normalize, its transform and the moment
    partials a sample clause's key reads. ``head_rows=False``: a
    score kernel that reduces the heads itself writes head 0's row only (a shared selection
    ranks no other; score_heads at B = 4, 128K: 2 MB written instead of 17)."""
    out = []
    for level, nch in enumerate(geo.chunks_per_level):
        out.append(Launch(compiled.kernel(f"stats_{level}"), (geo.splits, geo.rows, nch), args, geo.constexprs,
                          geo.num_warps, geo.num_stages, SEED_ARG))
        out.append(Launch(compiled.kernel(f"merge_{level}"), (geo.rows, nch), args, geo.constexprs, 4, None, SEED_ARG))
    b, h, n = shape
    score, score_args, score_grid = compiled.kernel("score"), args, (geo.splits, geo.rows)
    tiling = geo.score_tiling or score_tiling(compiled, geo, args[0].device)
    if tiling is not None:   # the score kernel's own programs per row
        splits, tiles = tiling
        if geo.score_heads:   # per batch row, the heads reduced in the kernel (codegen.heads_fusable)
            score, score_grid = compiled.kernel("score_heads"), (splits, geo.rows // h)
        else:
            score_grid = (splits, geo.rows)
        score_args = list(args)
        score_args[score.arg_names.index("S")] = splits
        score_args[score.arg_names.index("tiles_per_prog")] = tiles
    out.append(Launch(score, score_grid, score_args, geo.score_constexprs(head_rows), geo.num_warps, geo.num_stages,
                      SEED_ARG, geo.score_maxnreg))
    program = compiled.program
    deferred = iter(geo.deferred)
    moments = dict(zip(program.moment_slots, geo.moments))
    for index, slot in enumerate(program.slots):
        pooled = program.pooled_global(slot) if geo.constexprs["POOL_AFTER"] else None
        passes = [] if pooled is None else [_pool_step(program, pooled, index, score, args, priorities, workspace, geo)]
        passes += [(*step, DEFERRED_WARPS) for step in deferred_launches(
            priorities, workspace, next(deferred), index, geo.rows, n, *geo.deferred_tiling)] if slot.deferred else []
        if slot.transformed and not geo.score_heads:
            passes.append((_transform_kernel, *transform_launch(priorities, index, b, h, n, slot.chunk,
                                                                slot.chunk_reduce, slot.head_reduce), TRANSFORM_WARPS))
        if index in moments:
            passes.append((*moments_launch(priorities, workspace, moments[index], index, geo.rows, n,
                                           *geo.deferred_tiling), DEFERRED_WARPS))
        out += [Launch(fn, grid, pargs, pconst, warps) for fn, grid, pargs, pconst, warps in passes]
    return out


def _pool_step(program: Program, gi: int, index: int, score, args, priorities, workspace, geo: Geometry):
    """(kernel, grid, args, constexprs, warps) of the pass that pools slot ``index``, global ``gi``'s proxy
    attention stored unpooled, after the score kernel (kernels/pooling.py), from the score launch's own
    arguments (its window, lse offset, rows)."""
    node = program.globals[gi]
    arg = lambda name: args[score.arg_names.index(name)]  # noqa: E731
    return (*pool_launch(priorities, workspace, arg("sq_ptr"), index, geo.rows, arg("N"), arg(f"w_{gi}"),
                         arg(f"fo_{gi}"), geo.constexprs[f"QR_{gi}"],
                         arg("H"), node.pool_kernel, geo.constexprs["G"], node.group_reduce == "mean",
                         node.exclude_window, geo.constexprs["PAGE"], geo.constexprs["POOL_SEG"]), POOL_WARPS)


def score_tiling(compiled: CompiledPolicy, geo: Geometry, device: torch.device) -> Optional[Tuple[int, int]]:
    """A cache-reading score kernel's own (programs per row, tiles per program) in whole waves of
    its occupancy, once a launch has taught it (geometry.score_waves), where it fits more
    programs per multiprocessor than the statistics passes' waves count (KeyDiff's cosines: 6
    against 4, 0.960-0.993x KeyDiff's graph time on an H100; the proxy attention's second pass
    fits 1, and its own waves read 0.989-1.019x SnapKV's / H2O's). None: the statistics passes'
    (off the GPU, on a paged layout, before the first launch, or with ``TRITONKV_SCORE_WAVES=0``,
    for A/B timing)."""
    if not geo.n_tiles or device.type != "cuda" or interpreting() or os.environ.get("TRITONKV_SCORE_WAVES") == "0":
        return None
    per_sm = learnt_occupancy(compiled.kernel("score"), geo.num_warps, geo.constexprs)
    if per_sm is None or per_sm <= stats_per_sm():
        return None
    return score_waves(geo.rows, geo.n_tiles, per_sm, multiprocessor_count(device))


def score_programs(compiled: CompiledPolicy, keys, values, queries) -> Optional[Tuple[int, int]]:
    """The score kernel's own tiling that a dense call with these inputs would launch now
    (planned.py plans again when a first call has changed it)."""
    if not compiled.program.slots:
        return None
    geo = _geometry_of(compiled, keys, Layout.dense(keys, values), queries)
    return geo.score_tiling or score_tiling(compiled, geo, keys.device)


def _geometry_of(compiled: CompiledPolicy, keys, layout: Layout, queries) -> Geometry:
    return geometry(compiled.program, layout.k_shape, layout.v_shape,
                    None if queries is None else tuple(queries.shape), keys.dtype, keys.element_size(), keys.device,
                    layout.page, layout.splits)


def score(compiled: CompiledPolicy, keys, values, queries, seed: int, named=(), clauses: bool = False) -> torch.Tensor:
    """Run the statistics passes, the score kernel and the passes on its slots: float32 slots
    [n_slots, B*H, N]; with ``clauses``, what each selective clause ranks, [n_clauses, B*H, N]
    (kernels/keys.py: the values the select kernel computes from the slots)."""
    b, h, n, _ = keys.shape
    program = compiled.program
    slots = len(program.slots)
    if not slots:
        return torch.empty(0, b * h, n, dtype=torch.float32, device=keys.device)
    geo = _geometry_of(compiled, keys, Layout.dense(keys, values), queries)
    workspace = torch.empty(geo.ranking_numel(slots * b * h * n), dtype=torch.float32, device=keys.device)
    out = workspace[geo.workspace: geo.workspace + slots * b * h * n].view(slots, b * h, n)
    geo, args = launch_args(compiled, keys, values, queries, seed, out, workspace, named=named)
    for step in _score_launches(compiled, geo, args, out, workspace, (b, h, n)):
        step()
    if not clauses:
        return out
    ranked = torch.empty(len(program.clause_keys), b * h, n, dtype=torch.float32, device=keys.device)
    grid, pargs, pconst = priorities_launch(out, ranked, workspace, program.clause_keys,
                                            geo.clause_moments(program), geo.deferred_tiling[0], seed, h)
    launch(_priorities_kernel, grid, pargs, pconst)
    return ranked


def _align(n: int) -> int:
    return -(-n // 4) * 4   # 4-byte elements: every region starts 16-byte aligned


@dataclass
class Call:
    """The launches of one evict call and the tensors they write: ``scratch`` holds the
    slots (``priorities``), the statistics and select's workspace (None when there is nothing
    to rank); ``select_inputs``: what _select takes from _ranking."""

    launches: List[Launch]
    scratch: Optional[torch.Tensor]
    priorities: Optional[torch.Tensor]
    indices: torch.Tensor
    keys: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    select_inputs: Optional[tuple] = None


def fused_gather(program) -> bool:
    """Whether select copies the kept K / V rows itself, or writes the indices and a gather
    launch with its own grid copies the rows. Fused unless the heads share one selection
    (TOVA): that select runs one row per batch row, each program copying every head's rows, and
    the gather launch's grid over all heads takes 0.94-0.99x its graph time (H100, 128K-512K,
    B 1 / 4, 10% / 50%), where per-head selections (KeyDiff, KNorm) take 0.97-1.03x, median
    1.007x. ``TRITONKV_FUSED_GATHER=1`` / ``0`` forces either (A/B timing)."""
    forced = os.environ.get("TRITONKV_FUSED_GATHER", "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"TRITONKV_FUSED_GATHER: expected 0 or 1 (unset: by the policy), got {forced!r}")
    return forced == "1" if forced else not shared_selection(program)


def prepare(compiled: CompiledPolicy, alloc, keys, values, queries, seed: int, named=(), gather: bool = True) -> Call:
    """Allocate an evict call's buffers and list its launches: statistics, score (which also
    zeroes select's counters), select (which also gathers the kept rows, unless ``gather`` is
    False: then the call's keys and values are None; or a gather launch after it, see
    fused_gather); for a policy with nothing to rank (only windows, or a budget that keeps
    everything) one gather that writes the indices too."""
    b, h, n, d = keys.shape
    dv = values.shape[-1]
    total, device = alloc.total, keys.device
    out_i = torch.empty(b, h, total, dtype=torch.int64, device=device)
    if len(compiled.program.clause_keys) == 0 or total == n:   # windows only: one launch
        grid, args, constexprs, (out_k, out_v) = gather_launch(out_i, keys, values,
                                                               n_sink=n if total == n else alloc.n_sink, rows=gather)
        return Call([Launch(_gather_kernel, grid, args, constexprs, GATHER_WARPS)], None, None, out_i, out_k, out_v)
    if not gather:
        call = _ranking(compiled, keys, values, queries, seed, named, Layout.dense(keys, values), (0, 0), out_i)
        call.launches.append(_select(compiled, call, alloc.clause_counts, alloc.n_sink, alloc.n_recent, total,
                                     out_i.view(b * h, total), heads=h, seed=seed))
        return call
    if not fused_gather(compiled.program):   # select writes the indices, then a gather launch copies the rows
        call = prepare(compiled, alloc, keys, values, queries, seed, named, gather=False)
        grid, args, constexprs, (call.keys, call.values) = gather_launch(call.indices, keys, values)
        call.launches.append(Launch(_gather_kernel, grid, args, constexprs, GATHER_WARPS))
        return call
    out_k = torch.empty(b, h, total, d, dtype=keys.dtype, device=device)
    out_v = torch.empty(b, h, total, dv, dtype=values.dtype, device=device)
    call = _ranking(compiled, keys, values, queries, seed, named, Layout.dense(keys, values), (d, dv), out_i)
    call.launches.append(_select(compiled, call, alloc.clause_counts, alloc.n_sink, alloc.n_recent, total,
                                 out_i.view(b * h, total), gather=(keys, values, out_k, out_v), heads=h, seed=seed))
    call.keys, call.values = out_k, out_v
    return call


def prepare_paged(compiled: CompiledPolicy, pages, v_pages, queries, seed: int, named, layout: Layout,
                  positions: torch.Tensor) -> Call:
    """The launches of a batched paged call (tritonkv.paged): statistics, score and select for
    every sequence of ``layout.sequences`` at once, select writing each sequence's kept
    positions into its row of ``positions`` (int64 [B, H, max kept]); the call's ``keys`` and
    ``values`` are None (tritonkv.paged compacts the pages in place)."""
    call = _ranking(compiled, pages, v_pages, queries, seed, named, layout, (0, 0), positions, per_seq=True)
    b, h = positions.shape[:2]
    clauses = len(compiled.program.clause_keys)
    call.launches.append(_select(compiled, call, [0] * clauses, 0, 0, positions.shape[2], positions.view(b * h, -1),
                                 heads=h, seed=seed, sequences=layout.sequences))
    return call


def shared_selection(program) -> bool:
    """Whether every KV head of a batch row keeps the same tokens by construction: every
    selective clause is a top of a head-reduced priority (kernels/transform.py writes the same
    values into each head's row; no sample clause draws noise per head), so select ranks one
    row per batch row and writes its indices for all heads (TOVA, ``top(..., head_reduce=)``).
    ``TRITONKV_SHARED_SELECT=0`` turns it off for calls prepared from then on (A/B timing)."""
    if os.environ.get("TRITONKV_SHARED_SELECT") == "0":   # per-head selection (A/B timing)
        return False
    keys = program.clause_keys
    return bool(keys) and all(not k.sampled and program.slots[k.slot].head_reduce is not None for k in keys)


def selection_programs(program, b: int, h: int, n: int, device, gather_dims=(0, 0), per_seq: bool = False,
                       shared: Optional[bool] = None) -> int:
    """Programs per selected row of a call's select launch (rows: b * h, or b batch rows when
    the heads share one selection; ``shared``: None decides as the launch will)."""
    if shared is None:
        shared = not per_seq and shared_selection(program)
    return select_programs(b if shared else b * h, n, program.clause_keys, device, *gather_dims, per_seq=per_seq,
                           shared=shared, own_slots=True)


def scored(compiled: CompiledPolicy, keys, values, queries, seed: int, named, layout: Layout, regions, zeroed: int,
           head_rows: bool = True):
    """The scratch and score launches of a ranking call: one float32 buffer holding the ranking
    workspace (slots, statistics), then ``regions`` (int32 element counts, each starting 16-byte
    aligned), of which the score kernel zeroes the first ``zeroed`` elements. Returns (geometry,
    launches, scratch, workspace, priorities, the regions as int32 views). ``head_rows=False``:
    only head 0's rows of head-reduced slots are written (see _score_launches)."""
    b, h, n, _ = layout.k_shape
    geo = _geometry_of(compiled, keys, layout, queries)
    slots = len(compiled.program.slots) * b * h * n
    sizes = [_align(geo.ranking_numel(slots))] + [_align(size) for size in regions]
    scratch = torch.empty(sum(sizes), dtype=torch.float32, device=keys.device)
    workspace, *views = scratch.split(sizes)
    priorities = workspace[geo.workspace: geo.workspace + slots].view(-1, b * h, n)
    tail = scratch[sizes[0]:].view(torch.int32)
    geo, args = launch_args(compiled, keys, values, queries, seed, priorities, workspace, zeroed=tail[:zeroed],
                            named=named, layout=layout)
    launches = _score_launches(compiled, geo, args, priorities, workspace, (b, h, n), head_rows)
    return geo, launches, scratch, workspace, priorities, [view.view(torch.int32) for view in views]


def _ranking(compiled: CompiledPolicy, keys, values, queries, seed: int, named, layout: Layout, gather_dims,
             out_i, per_seq: bool = False) -> Call:
    """A Call with the scratch (slots, statistics, select's workspace) and the statistics and
    score launches of ``layout``'s rows; ``gather_dims``: head dims select copies, (0, 0) for none."""
    b, h, n, _ = layout.k_shape
    rows, program = b * h, compiled.program
    clauses = len(program.clause_keys)
    shared = not per_seq and shared_selection(program)   # one decision for the programs and the launch
    programs = selection_programs(program, b, h, n, keys.device, gather_dims, per_seq, shared)
    geo, launches, scratch, workspace, priorities, (select_ws,) = scored(
        compiled, keys, values, queries, seed, named, layout, [sum(workspace_sizes(rows, programs, clauses))],
        zeroed_numel(rows, clauses), head_rows=not shared)
    call = Call(launches, scratch, priorities, out_i, None, None)
    call.select_inputs = (programs, shared, select_ws, workspace, geo)
    return call


def _select(compiled: CompiledPolicy, call: Call, counts, n_sink: int, n_recent: int, n_kept: int, out_i,
            **options) -> Launch:
    """The select launch of a call that _ranking prepared."""
    programs, shared, select_ws, workspace, geo = call.select_inputs
    program = compiled.program
    _, rows, n = call.priorities.shape
    grid, sargs, sconst, _ = select_launch(call.priorities, program.clause_keys, counts, n_sink, n_recent, rows, n,
                                           n_kept, call.priorities.device, programs, select_ws, out_i,
                                           moments=(workspace, geo.clause_moments(program), geo.deferred_tiling[0]),
                                           shared=shared, own_slots=True, **options)
    return Launch(_select_kernel, grid, sargs, sconst, select_warps(), None, SELECT_SEED_ARG)


def run(call: Call) -> None:
    """Launch a call's kernels through Triton (compiling what is new), recording the select
    kernel's occupancy for later calls."""
    for step in call.launches:
        compiled = step()
        if step.args[0].is_cuda and (step.fn is _select_kernel or getattr(step.fn, "__name__", "") == "score"):
            record_occupancy(step.fn, compiled, step.num_warps, step.constexprs)


def check_backend(keys) -> None:
    if not keys.is_cuda and not interpreting():
        raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is "
                           "imported; use backend='reference' (or 'auto') on CPU")
