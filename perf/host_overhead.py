"""Host (CPU) cost of evict() on the GPU machine, per preset, before and after planning.

    python perf/host_overhead.py [--json OUT.json] [--n 512,8192,32768,131072]
    python perf/host_overhead.py --markdown OUT.json      # its tables, as in docs/performance.md
    python perf/host_overhead.py --toy --json /tmp/host.json   # CPU, tiny sizes: checks the script

For each policy (every preset and composite; B=1, H_kv=8, D=128, bf16) and N, three times:
  host_us   back-to-back calls without synchronizing: CPU time per call (what bounds a loop
            of per-layer or per-step evictions once the GPU keeps up);
  wall_us   one call from an idle GPU until its work is done (CUDA events around the call,
            host launch included): what a caller waits;
  graph_us  the same kernels replayed from a CUDA graph: GPU time alone.
for the ways to call: ``unplanned`` (validation + compiler.evict_compiled: the path every
call took before plans), ``evict`` (tkv.evict, planned by signature), ``evictor`` (a
tkv.Evictor held by the caller) and, on CUDA, ``graphed`` (``Evictor.graph`` over the same
tensors: one CUDA-graph launch per call). Also: the per-layer host cost of evicting 32 layers'
caches back to back, and a cProfile of the planned call.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.test_evict import POLICIES as BENCHMARKED, make_cache, make_named  # noqa: E402
from perf.settings import switches  # noqa: E402
from perf.timing import CUDA, event_seconds, graph_seconds, host_times, sync  # noqa: E402
from tritonkv.compiled import evict_compiled  # noqa: E402
from tritonkv.eager import evict_reference  # noqa: E402
from tritonkv.validate import check_evict_args, named_inputs  # noqa: E402

# every preset and composite: the benchmarked ones, plus the budget-spreading presets
POLICIES = dict(BENCHMARKED, adakv=tkv.policies.adakv(), pyramidkv=tkv.policies.pyramidkv())
# calls per host measurement, rounds per wall measurement, graph replays; --toy makes them small
REPEATS = dict(host=200, wall=20, replays=10)


def host_us(fn, calls=None) -> float:
    """CPU time per call of back-to-back calls (the GPU queue absorbs the work)."""
    calls = calls or REPEATS["host"]
    return statistics.mean(host_times(fn, calls=calls, block=min(50, calls))) * 1e6


def wall_us(fn) -> float:
    """Median time of one call from an idle GPU to the end of its work (CUDA events)."""
    return statistics.median(event_seconds(fn) for _ in range(REPEATS["wall"])) * 1e6


def inputs(policy, keys, values, queries):
    """evict's keyword arguments for the policy: its queries, signals and directions."""
    signals, directions = make_named(policy, keys.shape[0], keys.shape[2])
    return dict(queries=queries if policy.needs_queries else None, signals=signals or None,
                directions=directions or None)


def held_call(policy, budget, keys, values, queries):
    """(Evictor, call): a held tkv.Evictor and a call of it on these tensors with the policy's inputs."""
    evictor = tkv.Evictor(policy, budget)
    kw = inputs(policy, keys, values, queries)
    return evictor, lambda: evictor(keys, values, **kw)


def callers(policy, keys, values, queries, budget):
    kw = inputs(policy, keys, values, queries)
    path = evict_compiled if keys.is_cuda else evict_reference   # what backend="auto" runs there

    def unplanned():
        p, k, seed = check_evict_args(keys, values, policy, budget, kw["queries"], 0, "auto", kw["signals"],
                                      kw["directions"])
        named = named_inputs(p, kw["signals"] or {}, kw["directions"] or {})
        return path(keys, values, kw["queries"], p, k, seed, named)

    evictor = tkv.Evictor(policy, budget)
    ways = {"unplanned": unplanned,
            "evict": lambda: tkv.evict(keys, values, policy, budget, **kw),
            "evictor": lambda: evictor(keys, values, **kw)}
    if keys.is_cuda:
        ways["graphed"] = evictor.graph(keys, values, **kw)
    return ways


def measure(names, ns, budgets):
    rows = []
    for n in ns:
        keys, values, queries = make_cache(1, n)
        for name in names:
            for budget in budgets:
                row = dict(policy=name, N=n, B=1, budget=budget)
                for how, fn in callers(POLICIES[name], keys, values, queries, budget).items():
                    fn()   # compile, plan
                    fn()   # a plan made after the select kernel's occupancy is known
                    row[f"{how}_host_us"] = host_us(fn)
                    row[f"{how}_wall_us"] = wall_us(fn)
                    if how == "evict":
                        row["graph_us"] = graph_seconds(fn, REPEATS["replays"]) * 1e6
                rows.append(row)
                print(f"{name:<14} N={n:<7} b={budget:<4} host us: unplanned {row['unplanned_host_us']:7.1f} "
                      f"evict {row['evict_host_us']:6.1f} evictor {row['evictor_host_us']:6.1f} graphed "
                      f"{row.get('graphed_host_us') or float('nan'):5.1f} | wall us: "
                      f"unplanned {row['unplanned_wall_us']:7.1f} evict {row['evict_wall_us']:7.1f} graphed "
                      f"{row.get('graphed_wall_us') or float('nan'):7.1f} | graph "
                      f"{row['graph_us'] or float('nan'):7.1f} | wall/graph "
                      f"{row['evict_wall_us'] / (row['graph_us'] or float('nan')):.2f}",
                      flush=True)
    return rows


def layers(names, n=8192, n_layers=32, budget=0.25):
    """Per-layer host cost of evicting a 32-layer model's caches (distinct tensors) in a loop."""
    caches = [make_cache(1, n, seed=i) for i in range(n_layers)]
    # the same layers stacked in one tensor [L * B, H, N, D]: one call evicts them all
    stacked = [torch.cat(parts) for parts in zip(*caches)]
    out = []
    for name in names:
        policy = POLICIES[name]
        layer_kw = [inputs(policy, *cache) for cache in caches]

        def all_layers():
            for (keys, values, _), kw in zip(caches, layer_kw):
                tkv.evict(keys, values, policy, budget, **kw)
        all_layers()
        all_layers()
        per_layer = host_us(all_layers, calls=max(1, REPEATS["host"] // 10)) / n_layers
        gpu = graph_seconds(all_layers, REPEATS["replays"]) * 1e6 / n_layers
        stacked_kw = inputs(policy, *stacked)
        one_call = lambda: tkv.evict(stacked[0], stacked[1], policy, budget, **stacked_kw)  # noqa: E731
        one_call()
        one_call()
        stacked_host = host_us(one_call, calls=max(1, REPEATS["host"] // 4)) / n_layers
        stacked_gpu = graph_seconds(one_call, REPEATS["replays"]) * 1e6 / n_layers
        out.append(dict(policy=name, N=n, layers=n_layers, budget=budget, host_us_per_layer=per_layer,
                        graph_us_per_layer=gpu, stacked_host_us_per_layer=stacked_host,
                        stacked_graph_us_per_layer=stacked_gpu))
        print(f"{name:<14} {n_layers} layers of N={n}: a call per layer: host {per_layer:.1f} us/layer, GPU "
              f"{gpu or float('nan'):.1f} us/layer; one call on the stacked layers: host {stacked_host:.1f} "
              f"us/layer, GPU {stacked_gpu or float('nan'):.1f} us/layer", flush=True)
    return out


def primitives():
    """Host cost of the pieces a planned call is made of (us per call)."""
    from tritonkv.kernels.launch import raw_stream
    from tritonkv.results import Evicted
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    keys, values, _ = make_cache(1, 8192)
    windows = tkv.sink(4) | tkv.recent()

    def planned(batched: str, graphs: str = "0"):
        """(planned Evictor, its Plan) with TRITONKV_BATCH_LAUNCH=batched, TRITONKV_GRAPH_LAUNCH=graphs"""
        with switches({"TRITONKV_BATCH_LAUNCH": batched, "TRITONKV_GRAPH_LAUNCH": graphs}):
            ev = tkv.Evictor(windows, 0.25)
            ev(keys, values)
            ev(keys, values)
        return ev, next(iter(ev._plans.values()))

    ev, plan = planned("0")
    _, steps = plan.late
    step = steps[0]
    args = [0 if a is None else a for a in step.template]
    out = ev(keys, values)   # buffers for the launch to write into
    roles = [keys.data_ptr(), values.data_ptr(), 0, 0, out.indices.data_ptr(), out.keys.data_ptr(),
             out.values.data_ptr(), 0]
    for position, role, offset in step.patches:
        args[position] = roles[role] + offset
    batched_ev, plan = planned("1")
    batch_launch, handle = plan.late
    graphed_ev, plan = planned("1", "1")
    graph_launch, graph = plan.whole
    stream = raw_stream(0)
    pieces = {
        "torch.empty": lambda: torch.empty(1 << 16, device=dev),
        "torch.empty, 4 shaped (outputs + scratch)": lambda: (
            torch.empty((1, 8, 2048), dtype=torch.int64, device=dev),
            torch.empty((1, 8, 2048, 128), dtype=bf16, device=dev),
            torch.empty((1, 8, 2048, 128), dtype=bf16, device=dev), torch.empty(90000, device=dev)),
        "caching_allocator_alloc + delete": lambda: torch.cuda.caching_allocator_delete(
            torch.cuda.caching_allocator_alloc(1 << 20, 0, stream)),
        "3 x data_ptr()": lambda: (keys.data_ptr(), values.data_ptr(), keys.data_ptr()),
        "raw_stream": lambda: raw_stream(0),
        "current_device": torch.cuda.current_device,
        "Evicted(...)": lambda: Evicted(keys, values, keys),
        "signature tuple": lambda: (keys.shape, keys.stride(), keys.dtype, keys.device, keys.data_ptr() & 15,
                                    values.shape, values.stride(), values.dtype, values.device),
        "one launch (C launcher, args ready)": lambda: step.launcher(*step.grid, stream, *step.head, *args),
        "one launch (batched, values ready)": lambda: batch_launch(handle, stream, roles),
        "planned streaming_llm call (1 launch, Triton's launcher)": lambda: ev(keys, values),
        "one graph launch (1 node re-pointed, values ready)": lambda: graph_launch(graph, stream, roles),
        "planned streaming_llm call (1 launch, batched)": lambda: batched_ev(keys, values),
        "planned streaming_llm call (1 node, re-pointed graph)": lambda: graphed_ev(keys, values),
    }
    out = {}
    for name, fn in pieces.items():
        out[name] = host_us(fn, calls=2000)
        print(f"{name:<45} {out[name]:7.2f} us", flush=True)
    return out


def profile(name="knorm", n=8192, calls=500):
    keys, values, _ = make_cache(1, n)
    policy = POLICIES[name]
    tkv.evict(keys, values, policy, 0.5)
    tkv.evict(keys, values, policy, 0.5)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        tkv.evict(keys, values, policy, 0.5)
    prof.disable()
    sync()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


def markdown(result) -> str:
    """The host-cost tables of docs/performance.md from one run's JSON."""
    f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    lines = [f"{result['gpu']}, torch {result['torch']}. Times in us; host = back-to-back calls, no sync; "
             "wall = one call from an idle GPU to its end; graph = CUDA-graph replay (kernels alone).", "",
             "| policy | N | budget | host unplanned | host evict | host Evictor | host graphed | wall unplanned "
             "| wall evict | wall graphed | graph | wall / graph |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["cases"]:
        ratio = r["evict_wall_us"] / r["graph_us"] if r["graph_us"] else None
        lines.append(f"| {r['policy']} | {r['N']} | {r['budget']} | {f(r['unplanned_host_us'])} | "
                     f"{f(r['evict_host_us'])} | {f(r['evictor_host_us'])} | {f(r.get('graphed_host_us'))} | "
                     f"{f(r['unplanned_wall_us'])} | {f(r['evict_wall_us'])} | {f(r.get('graphed_wall_us'))} | "
                     f"{f(r['graph_us'])} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    lines += ["", f"{result['layers'][0]['layers']} layers of N = {result['layers'][0]['N']}, budget "
              f"{result['layers'][0]['budget']}: a call per layer vs one call on the layers stacked as batch rows",
              "", "| policy | host us/layer, a call each | GPU us/layer | host us/layer, one call | GPU us/layer |",
              "|---|---|---|---|---|"]
    for r in result["layers"]:
        lines.append(f"| {r['policy']} | {f(r['host_us_per_layer'])} | {f(r['graph_us_per_layer'])} | "
                     f"{r['stacked_host_us_per_layer']:.1f} | {f(r['stacked_graph_us_per_layer'])} |")
    lines += ["", "Pieces of a planned call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in result["primitives"].items())]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--n", default="512,8192,32768,131072")
    parser.add_argument("--budgets", default="0.1,0.5")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--markdown", help="render a run's JSON as the tables of docs/performance.md")
    parser.add_argument("--toy", action="store_true",
                        help="tiny sizes, a few calls (on the CPU: the reference path): checks the script")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    names = args.policies.split(",")
    ns = [int(x) for x in args.n.split(",")]
    if args.toy:
        REPEATS.update(host=2, wall=1, replays=1)
        ns = [min(n, 256) for n in ns[:1]]
        args.budgets = args.budgets.split(",")[0]
    result = dict(gpu=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__,
                  primitives=primitives() if CUDA else {},   # the pieces are CUDA calls
                  cases=measure(names, ns, [float(x) for x in args.budgets.split(",")]),
                  layers=layers(names, n=256, n_layers=2) if args.toy else layers(names))
    profile(calls=2 if args.toy else 500)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
