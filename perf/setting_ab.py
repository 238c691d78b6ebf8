"""A / B of a kernel setting read from the environment (a ``TRITONKV_*`` switch that
tritonkv.geometry reads when it plans a launch), in one process, beside the peer (kvpress'
formulation: scores in the cache's dtype, topk, gather).

For each case and each value of the setting, a fresh planned Evictor; four times of one call:
wall (from an idle GPU, host launch included), graph (CUDA-graph replay: kernels alone), queued
(the kernels of an eager call, its launch hidden: perf/timing.py's queued_seconds) and host (back-to-back
calls); the values interleaved, medians over ``--repeats``. The caches are those
of the perf suite (perf/test_evict.py: B x 8 KV heads x N x 128, bf16, 32 query heads with a
window of 64).

    python perf/setting_ab.py TRITONKV_PROXY_LOGITS 0 1 --presets tova
    python perf/setting_ab.py TRITONKV_BLOCK_N 32 64 --presets keydiff,snapkv --n 32768,131072
    python perf/setting_ab.py TRITONKV_BLOCK_N 32 64 --presets keydiff --toy   # CPU: checks the script

A value holding ``=`` sets several switches together (comma-separated NAME=VALUE, the setting then
only names the A/B; a value without one sets the setting alone), so a combination is timed against
the defaults in the same process:

    python perf/setting_ab.py TRITONKV_BLOCK_N 64 TRITONKV_BLOCK_N=32,TRITONKV_ANCHOR_FOLD=4 --presets keydiff
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.baselines import peer_evict  # noqa: E402
from perf.host_overhead import inputs  # noqa: E402
from perf.settings import switches  # noqa: E402
from perf.test_evict import POLICIES, make_cache  # noqa: E402
from perf.timing import DEVICE, event_seconds, graph_seconds, host_times, queued_seconds  # noqa: E402
from tritonkv import geometry  # noqa: E402
from tritonkv.runtime import Evictor  # noqa: E402

KINDS = ("wall", "graph", "queued", "host")


def ints(text: str):
    return [int(x) for x in text.split(",")]


def floats(text: str):
    return [float(x) for x in text.split(",")]


def planned(policy, k: int) -> Evictor:
    """A fresh Evictor, which plans under the settings of the moment (geometry is cached per
    shape, so it is forgotten first)."""
    geometry.clear_geometry()
    return Evictor(policy, k, backend="triton")


def times_us(fn, replays: int) -> dict:
    """The first calls of a fresh Evictor plan and launch its plan for the first time (building
    its CUDA graph, TRITONKV_GRAPH_LAUNCH): they are run first, untimed, and the wall is the median
    of five samples (one sample, one call after planning, timed the graph's construction: H100,
    perf/results/ab/graph-launch-H100-30ba9dc)."""
    for _ in range(3 if DEVICE == "cuda" else 1):
        fn()
    samples = 5 if DEVICE == "cuda" else 1
    return dict(wall=statistics.median(event_seconds(fn) for _ in range(samples)) * 1e6,
                graph=graph_seconds(fn, replays=replays) * 1e6 if DEVICE == "cuda" else float("nan"),
                queued=statistics.median(queued_seconds(fn) for _ in range(samples)) * 1e6,
                host=statistics.mean(host_times(fn, calls=100 if DEVICE == "cuda" else 2, block=25)) * 1e6)


def assignments(setting: str, value: str) -> dict:
    """The environment one value of the A/B sets: ``{setting: value}``, or for a value holding ``=``
    its comma-separated NAME=VALUE pairs (each a TRITONKV_* switch)."""
    if "=" not in value:
        return {setting: value}
    pairs = dict(part.split("=", 1) for part in value.split(","))
    wrong = [name for name in pairs if not name.startswith("TRITONKV_")]
    if wrong or any("=" in v for v in pairs.values()):
        raise ValueError(f"value {value!r}: expected comma-separated TRITONKV_*=VALUE pairs")
    return pairs


def case(setting, values, name, b, n, budget, repeats, replays) -> dict:
    policy = POLICIES[name]
    keys, values_, queries = make_cache(b, n)
    kw = inputs(policy, keys, values_, queries)
    k = max(1, int(budget * n))
    runs = {v: [] for v in values}
    for _ in range(repeats):
        for value in values:
            with switches(assignments(setting, value)):   # the plan and every timed call under it
                ev = planned(policy, k)
                runs[value].append(times_us(lambda: ev(keys, values_, **kw), replays))
    peer = peer_evict(name)
    if peer is not None:
        named = {**(kw["signals"] or {}), **(kw["directions"] or {})} or None
        runs["peer"] = [times_us(lambda: peer(keys, values_, queries, k, named), replays)]
    row = dict(policy=name, B=b, N=n, budget=budget, setting=setting)
    for variant, got in runs.items():
        for kind in KINDS:
            row[f"{variant} {kind} us"] = statistics.median(r[kind] for r in got)
    return row


def line(row, values) -> str:
    us = lambda variant, kind: row[f"{variant} {kind} us"]  # noqa: E731
    a, b = values[0], values[-1]
    times = " | ".join(f"{v}: " + " ".join(f"{us(v, k):8.1f}" for k in KINDS) for v in values)
    text = (f"{row['policy']:<14} B={row['B']} N={row['N']:>6} {row['budget']:.0%}  {times} | "
            f"{b} / {a} graph {us(b, 'graph') / us(a, 'graph'):.3f} queued {us(b, 'queued') / us(a, 'queued'):.3f} "
            f"wall {us(b, 'wall') / us(a, 'wall'):.3f}")
    if "peer wall us" in row:
        text += f" | peer / {b} wall {us('peer', 'wall') / us(b, 'wall'):.2f}x"
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", help="the environment variable, e.g. TRITONKV_PROXY_LOGITS")
    parser.add_argument("values", nargs="+", help="its values (or NAME=VALUE,... sets of switches); ratios are "
                                                  "the last against the first")
    parser.add_argument("--presets", default="tova", help="comma-separated names of perf/test_evict.py's POLICIES")
    parser.add_argument("--b", type=ints, default=[1, 4])
    parser.add_argument("--n", type=ints, default=[131072, 524288])
    parser.add_argument("--budgets", type=floats, default=[0.1, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--toy", action="store_true", help="tiny sizes, one repeat (CPU: checks the script)")
    args = parser.parse_args(argv)
    if not args.setting.startswith("TRITONKV_"):
        parser.error(f"setting: expected a TRITONKV_* environment variable, got {args.setting!r}")
    try:
        [assignments(args.setting, value) for value in args.values]
    except ValueError as e:
        parser.error(str(e))
    names = args.presets.split(",")
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        parser.error(f"--presets: unknown {unknown}; expected names from {sorted(POLICIES)}")
    if args.toy:
        args.b, args.n, args.budgets, args.repeats = [1], [128], [0.5], 1
    replays = 2 if args.toy else 20
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{gpu}  {args.setting} in {args.values}; us: wall / graph / queued / host", flush=True)
    rows = []
    try:
        for name in names:
            for b in args.b:
                for n in args.n:
                    for budget in args.budgets:
                        row = case(args.setting, args.values, name, b, n, budget, args.repeats, replays)
                        rows.append(dict(row, gpu=gpu))
                        print(line(row, args.values), flush=True)
    finally:
        geometry.clear_geometry()   # no geometry planned under a switched setting outlives the run
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(setting=args.setting, values=args.values, rows=rows), indent=1))


if __name__ == "__main__":
    main()
