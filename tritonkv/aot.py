"""Compile every kernel of a policy for a GPU target without a GPU (Triton's AOT path).

    python -m tritonkv.aot            # every preset and composite, for Hopper (sm_90)

The arguments are the ones evict() would launch with, built on meta tensors and specialized
by Triton's own binder (``specialized``), so what is compiled is exactly what runs: the same
vectorized, software-pipelined loads and the same shared memory. CI uses this to prove every
generated kernel still builds for sm_90. Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Dict, List

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import cubin, dsl, policies
from .adaptive import prepare_adaptive
from .budget import allocate
from .compiler import Layout, compile_policy, launch_args, shared_selection
from .kernels.pages import compact_launch
from .kernels.sequences import FIELDS
from .reference import proxy_window
from .kernels.compact import compact_launches
from .kernels.holes import fill_holes_launch
from .integrations.decode_scores import (POSITIONS, accumulation_ranked, accumulation_scored_by_position,
                                         decode_scored)
from .kernels.attention_signal import attention_signal_launch
from .kernels.decode import decode_launches
from .kernels.common import blocks_per_sm
from .kernels.launch import kernel_name, launch_options
from .kernels.gather import GATHER_WARPS, _gather_kernel, gather_launch
from .kernels.pack import PACK_KERNELS
from .kernels.select import select_warps, _select_kernel, select_launch
from .kernels.deferred import DEFERRED_WARPS, deferred_launches, moments_launch
from .kernels.pooling import POOL_WARPS, pool_launch, pool_segment
from .kernels.transform import TRANSFORM_WARPS, _transform_kernel, transform_launch

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_LIMIT = 232448   # bytes of shared memory one block may use on sm_90
PAGE = 16                      # tokens per page of the paged variants (vLLM's default block size)


def specialized(fn, args, constexprs, num_warps: int, target=HOPPER, maxnreg=None):
    """(ASTSource, options) of ``fn`` as Triton's JIT would build it for these arguments on
    ``target``: its own binder specializes them (pointers 16-byte aligned, ints divisible by 16
    or equal to 1, unless the kernel says otherwise) and those attributes decide, among other
    things, whether loads are vectorized and software-pipelined through shared memory (a
    plain signature compiles neither, so its shared memory and instructions are not the
    ones that run). Meta tensors count as aligned, as fresh CUDA allocations are."""
    runtime = [p.name for p in fn.params if not p.is_constexpr]
    if len(runtime) != len(args):
        raise ValueError(f"{fn.__name__}: {len(args)} arguments for {len(runtime)} parameters")
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = launch_options(num_warps, maxnreg=maxnreg)
    bound, specialization, options = binder(*args, **constexprs, **kwargs)
    options, sig, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, sig, consts, attrs), options.__dict__


@dataclass
class Built:
    policy: str
    kernel: str
    config: str
    seconds: float
    shared_bytes: int
    ptx_lines: int
    wgmma: int = 0   # Hopper tensor-core instructions (wgmma.mma_async) in the PTX
    async_copies: int = 0   # cp.async instructions: loads software-pipelined through shared memory
    registers: int = 0      # per thread (the cubin's EIATTR_REGCOUNT)
    per_sm: int = 0         # programs that fit on one multiprocessor (kernels.common.blocks_per_sm)


def build(fn, args, constexprs, num_warps: int, target=HOPPER, maxnreg=None):
    source, options = specialized(fn, args, constexprs, num_warps, target, maxnreg)
    return triton.compile(source, target=target, options=options)


def build_checked(policy: str, kernel: str, config: str, fn, args, constexprs, num_warps: int,
                  target=HOPPER, maxnreg=None) -> Built:
    """``build``, refusing a kernel that needs more shared memory than one sm_90 block has."""
    start = time.perf_counter()
    c = build(fn, args, constexprs, num_warps, target, maxnreg)
    if c.metadata.shared > HOPPER_SHARED_LIMIT:
        raise ValueError(f"{kernel} ({config}) needs {c.metadata.shared} B of shared memory, "
                         f"more than sm_90's {HOPPER_SHARED_LIMIT}")
    ptx = c.asm["ptx"]
    regs = max(cubin.registers(c.asm["cubin"]).values(), default=0)
    return Built(policy, kernel, config, time.perf_counter() - start, c.metadata.shared, ptx.count("\n"),
                 ptx.count("wgmma.mma_async"), ptx.count("cp.async."), regs,
                 blocks_per_sm(regs, c.metadata.shared, num_warps) if regs else 0)


def build_policy(name: str, policy: dsl.Policy, *, batch=1, heads=8, n=4096, d=128, dv=None, group=4,
                 window=64, dtype=torch.bfloat16, target=HOPPER, paged: bool = True) -> List[Built]:
    """Compile the stats, merge, score and select kernels of one policy for ``target``; with
    ``paged`` also the kernels that read a paged cache (tritonkv.paged)."""
    dv = dv or d
    meta = dict(device="meta", dtype=dtype)
    keys = torch.empty(batch, heads, n, d, **meta)
    values = torch.empty(batch, heads, n, dv, **meta)
    window = max([window] + [required_window(node, n) for score in policy.scores for node in dsl.walk(score)
                             if isinstance(node, dsl.ProxyAttention)])
    queries = torch.empty(batch, heads * group, window, d, **meta) if policy.needs_queries else None
    compiled = compile_policy(policy)
    program = compiled.program
    config = f"{str(dtype).split('.')[-1]} D={d} Dv={dv} G={group} W={window}"
    out: List[Built] = []

    def record(kernel_name, fn, args, constexprs, warps, maxnreg=None):
        out.append(build_checked(name, kernel_name, config, fn, args, constexprs, warps, target, maxnreg))

    priorities = torch.empty(max(1, len(program.slots)), batch * heads, n, device="meta", dtype=torch.float32)
    table = torch.empty(batch, -(-n // PAGE), device="meta", dtype=torch.int32)
    sequences = torch.empty(batch, FIELDS.value, device="meta", dtype=torch.int32)
    named = tuple(torch.empty(batch, heads, n, device="meta", dtype=torch.int64) if s == POSITIONS  # true positions
                  else torch.empty(batch, heads, n, **meta) for s in policy.signals) \
        + tuple(torch.empty(heads, d, device="meta", dtype=torch.float32) for _ in policy.directions)
    if program.slots:
        geo, largs = launch_args(compiled, keys, values, queries, 0, priorities, named=named)
        for level in range(len(program.levels)):
            record(f"stats_{level}", compiled.kernel(f"stats_{level}"), largs, geo.constexprs, geo.num_warps)
            record(f"merge_{level}", compiled.kernel(f"merge_{level}"), largs, geo.constexprs, 4)
        score_constexprs = geo.score_constexprs()
        record("score", compiled.kernel("score"), largs, score_constexprs, geo.num_warps, geo.score_maxnreg)
        if program.pooled:   # TRITONKV_POOL_AFTER=1: the score kernel that leaves its pooling to kernels/pooling.py
            record("score unpooled", compiled.kernel("score"), largs,
                   {**score_constexprs, "POOL_AFTER": True, "HALO": program.halo_pooled_after}, geo.num_warps,
                   geo.score_maxnreg)
        if geo.score_heads:   # what evict launches instead of score + transform here
            record("score_heads", compiled.kernel("score_heads"), largs, score_constexprs, geo.num_warps)
        if paged and program.reads_cache:   # the same kernels reading a paged cache (tritonkv.paged)
            layout = Layout(tuple(keys.shape), tuple(values.shape), keys.stride(), values.stride(), table, PAGE,
                            sequences)
            geo, pargs = launch_args(compiled, keys, values, queries, 0, priorities, named=named, layout=layout)
            for level in range(len(program.levels)):
                record(f"stats_{level} paged", compiled.kernel(f"stats_{level}"), pargs, geo.constexprs,
                       geo.num_warps)
                record(f"merge_{level} paged", compiled.kernel(f"merge_{level}"), pargs, geo.constexprs, 4)
            record("score paged", compiled.kernel("score"), pargs, geo.constexprs, geo.num_warps)
    workspace = torch.empty(1 << 20, device="meta", dtype=torch.float32)
    for index, slot in enumerate(program.slots):
        gi = program.pooled_global(slot)
        if gi is not None:   # the pooling after the score kernel, dense and paged (kernels/pooling.py)
            node = program.globals[gi]
            for page in ((0, PAGE) if paged else (0,)):
                fn, _, pargs, pconst = pool_launch(priorities, workspace, sequences, index, batch * heads, n, window,
                                                   0, 1, heads, node.pool_kernel, group, node.group_reduce == "mean",
                                                   node.exclude_window, page,
                                                   pool_segment(n, page > 0))
                record("pool" + (" paged" if page else ""), fn, pargs, pconst, POOL_WARPS)
        passes = deferred_launches(priorities, workspace, 0, index, batch * heads, n, 8, 4) if slot.deferred else []
        if index in program.moment_slots:
            passes.append(moments_launch(priorities, workspace, 0, index, batch * heads, n, 8, 4))
        for fn, _, dargs, dconst in passes:
            record(kernel_name(fn), fn, dargs, dconst, DEFERRED_WARPS)
        if slot.transformed:
            _, targs, tconst = transform_launch(priorities, index, batch, heads, n, slot.chunk, slot.chunk_reduce,
                                                slot.head_reduce)
            record("transform", _transform_kernel, targs, tconst, TRANSFORM_WARPS)
    alloc = allocate(policy, n, n // 4)
    _, args, constexprs, indices = select_launch(priorities, program.clause_keys, alloc.clause_counts,
                                                 alloc.n_sink, alloc.n_recent, batch * heads, n, alloc.total,
                                                 torch.device("meta"), programs=16, heads=heads,
                                                 moments=(workspace, [0] * len(program.clause_keys), 8),
                                                 shared=shared_selection(program), own_slots=True)
    record("select", _select_kernel, args, constexprs, select_warps())
    if paged and program.clause_keys:   # the select of a batched paged call (tritonkv.paged_plan)
        _, args, constexprs, _ = select_launch(priorities, program.clause_keys, [0] * len(program.clause_keys), 0,
                                               0, batch * heads, n, alloc.total, torch.device("meta"), programs=16,
                                               heads=heads, moments=(workspace, [0] * len(program.clause_keys), 8),
                                               sequences=sequences, own_slots=True)
        record("select paged", _select_kernel, args, constexprs, select_warps())
    if policy.heads == "adaptive":   # AdaKV's two selects (marking the kept tokens) and its pack
        call = prepare_adaptive(compiled, policy, alloc, keys, values, queries, 0, named)
        stages = iter(["select stage 1", "select stage 2"])
        for step in call.launches:
            if step.fn is _select_kernel:
                record(next(stages), step.fn, step.args, step.constexprs, step.num_warps)
            elif step.fn in PACK_KERNELS:
                record(kernel_name(step.fn), step.fn, step.args, step.constexprs, step.num_warps)
    _, args, constexprs, _ = gather_launch(indices.view(batch, heads, -1), keys, values)
    record("gather", _gather_kernel, args, constexprs, GATHER_WARPS)
    if not paged:
        return out
    pages = torch.empty(-(-n // PAGE), PAGE, heads, d, **meta)
    fn, _, args, constexprs, warps = compact_launch(indices.view(batch, heads, -1), pages, table, PAGE,
                                                    (pages.stride(0), pages.stride(2), pages.stride(1),
                                                     pages.stride(3)))
    record("compact pages", fn, args, constexprs, warps)
    return out


def build_decode(*, batch=2, heads=8, n=4096, d=128, dv=None, group=4, dtype=torch.bfloat16, target=HOPPER,
                 **_) -> List[Built]:
    """Compile the kernels of StaticEvictingCache's own: decode attention (tritonkv.kernels.decode),
    the indices of a windows-only eviction without its rows, and the in-place compaction of its
    slots (tritonkv.kernels.compact: the stash and move launches; tritonkv.kernels.holes)."""
    dv = dv or d
    meta = dict(device="meta", dtype=dtype)
    query = torch.empty(batch, heads * group, 1, d, **meta)
    keys, values = torch.empty(batch, heads, n, d, **meta), torch.empty(batch, heads, n, dv, **meta)
    start = torch.empty(batch, device="meta", dtype=torch.int64)
    length = torch.empty((), device="meta", dtype=torch.int64)
    config = f"{str(dtype).split('.')[-1]} D={d} Dv={dv} G={group}"
    logits = torch.empty(batch, heads * group, n, device="meta", dtype=torch.float32)
    lse = torch.empty(batch, heads * group, device="meta", dtype=torch.float32)
    built = []
    # plain, and writing the scores of decode_scores.py; one split (the split kernel writes the
    # output) and several (split partials, then the merge): off the GPU, 8 programs' worth
    for rows, kv in ((batch, heads), (1, 1)):
        q, k, v, hq = query[:rows, :kv * group], keys[:rows, :kv], values[:rows, :kv], kv * group
        for scores in (None, (logits[:rows, :hq], lse[:rows, :hq])):
            launches, _ = decode_launches(q, k, v, start[:rows], length, d ** -0.5, scores)
            built += [build_checked("(decode)", kernel_name(fn)
                                    + ("+scores" if scores else "") + (" 1 split" if len(launches) == 1 else ""),
                                    config, fn, args, constexprs, warps, target)
                      for fn, _, args, constexprs, warps in launches]
    signal = torch.empty(batch, heads, n, device="meta", dtype=torch.float32)
    fresh = torch.empty(1, device="meta", dtype=torch.int64)
    positions = torch.empty(batch, heads, n, device="meta", dtype=torch.int64)
    # TOVA's signal, H2O's accumulated attention, and with its one-clause ranking
    for name, accumulate, rank in (("", False, None), (" +=", True, None), (" += rank", True, signal)):
        ranked = dict(rank=rank, positions=positions, recent=n // 2) if rank is not None else {}
        fn, _, args, constexprs, warps = attention_signal_launch(logits, lse, group, "mean", signal, accumulate,
                                                                 fresh if accumulate else None, **ranked)
        built.append(build_checked("(decode)", "attn signal" + name, config, fn, args, constexprs, warps, target))
    indices = torch.empty(batch, heads, n - 64, device="meta", dtype=torch.int64)
    # a windows-only policy's indices without the rows (an Evictor with gather=False)
    _, args, constexprs, _ = gather_launch(indices, keys, values, n_sink=4, rows=False)
    built.append(build_checked("(static)", "windows indices", config, _gather_kernel, args, constexprs,
                               GATHER_WARPS, target))
    for fn, _, args, constexprs, warps in compact_launches(indices, keys, values, programs=4):
        name = "compact stash" if constexprs["STASH"] else "compact move"
        built.append(build_checked("(static)", name, config, fn, args, constexprs, warps, target))
    accumulated = torch.empty(batch, heads, n, device="meta", dtype=torch.float32)
    for acc in (None, accumulated):   # the accumulators of accumulate_attention move too
        fn, _, args, constexprs, warps = fill_holes_launch(indices, keys, values, positions, acc)
        built.append(build_checked("(static)", "fill holes" + (" +acc" if acc is not None else ""), config, fn,
                                   args, constexprs, warps, target))
    return built


def required_window(node: dsl.ProxyAttention, n: int) -> int:
    if node.window is None:
        return 1
    return proxy_window(node, n, n)


def all_policies() -> Dict[str, dsl.Policy]:
    """Every preset and composite, and one policy per primitive the presets do not use."""
    named = {name: make() for name, make in policies.PRESETS.items()}
    named.update(policies.COMPOSITES)
    named["signal"] = dsl.sink(4) | dsl.top(dsl.signal("prior").normalize() - dsl.key_norm().normalize())
    named["tova (decode scores)"] = decode_scored(named["tova"])[0]   # StaticEvictingCache's decode form
    named["h2o (accumulated)"] = accumulation_scored_by_position(named["h2o"])[0]   # its accumulated H2O
    named["h2o (ranked)"] = accumulation_ranked(named["h2o"])[0]   # ... as one clause (step_scores.py)
    named["chunk-max"] = dsl.as_policy(dsl.top(dsl.value_norm(), chunk=16, chunk_reduce="max", head_reduce="max"))
    return named


# dtype / head dims / GQA / window configurations; the paged variants differ from the dense ones
# only in how they address K / V, so two configurations (the default and the largest tiles) check them
CONFIGS = [dict(), dict(dtype=torch.float16, d=80, dv=64, group=1, window=7, paged=False),
           dict(dtype=torch.float32, d=256, group=8, window=200), dict(dtype=torch.bfloat16, d=64, group=3, window=1,
                                                                       paged=False)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one configuration per policy")
    parser.add_argument("--config", type=int, help=f"only configuration i of the {len(CONFIGS)}")
    args = parser.parse_args(argv)
    configs = CONFIGS[:1] if args.quick else CONFIGS if args.config is None else [CONFIGS[args.config]]
    built: List[Built] = []
    failures = []
    for cfg in configs:
        try:
            built += build_decode(**cfg)
        except Exception as e:
            failures.append(("(decode)", cfg, e))
    for name, policy in all_policies().items():
        for cfg in configs:
            try:
                built += build_policy(name, policy, **cfg)
            except Exception as e:  # report every failure, then fail
                failures.append((name, cfg, e))
    print(f"{'policy':<16}{'kernel':<15}{'config':<34}{'s':>6}{'smem B':>8}{'ptx lines':>10}{'wgmma':>7}"
          f"{'cp.async':>9}{'regs':>6}{'per SM':>7}")
    for b in built:
        print(f"{b.policy:<16}{b.kernel:<15}{b.config:<34}{b.seconds:>6.2f}{b.shared_bytes:>8}{b.ptx_lines:>10}"
              f"{b.wgmma:>7}{b.async_copies:>9}{b.registers:>6}{b.per_sm:>7}")
    for name, cfg, e in failures:
        print(f"FAILED {name} {cfg}: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"{len(built)} kernels compiled for sm_{HOPPER.arch}, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
