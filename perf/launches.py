"""Each kernel launch of one evict call, timed as evict runs it: the call's prepared launches
(compiler.prepare), replayed from a CUDA graph as prefixes (the first k launches, k = 1, 2, ...),
so a launch's time is its prefix's time minus the one before. A launch is never timed alone:
select needs the counters the score kernel zeroes, and a stage reads what the one before wrote.
Every prefix graph starts with a one-element fill, and the graph of that fill alone is prefix 0
("start": the graph's launch latency and the fill), so the first launch's time excludes what a
graph takes to start, as the later launches' do; the whole call's time is timed without the fill,
as the perf suite times it (start included).
Beside each: the bytes of K the whole call must read, as the floor of that read at the run's
copy bandwidth. A tool for tuning (where a policy's time over its floor goes), not the suite.

    python perf/launches.py --policies tova,snapkv --n 131072 --batch 4 --budget 0.1
    python perf/launches.py --policies snapkv --gather both   # select with and without the copy of the kept rows
    python perf/launches.py --toy           # CPU, tiny sizes: checks the script
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.floor import copy_bandwidth, floor_bytes  # noqa: E402
from perf.test_evict import POLICIES, make_cache  # noqa: E402
from perf.timing import CUDA, graph_times  # noqa: E402
from tritonkv import compiler  # noqa: E402
from tritonkv.budget import allocate, resolve_budget  # noqa: E402
from tritonkv.kernels.launch import kernel_name  # noqa: E402
from tritonkv.lowering import lower  # noqa: E402


def prefix_us(launches, k: int, replays: int, marker=None) -> float:
    """Median graph time of the first ``k`` launches, after a fill of ``marker`` where given."""
    def run():
        if marker is not None:
            marker.fill_(0)
        for step in launches[:k]:
            step()
    return statistics.median(graph_times(run, replays)) * 1e6


def lowered_case(name: str, n: int, batch: int, budget: float, bandwidth: float):
    """(lowered policy, its allocation, its compiled policy, keys, values, queries or None, floor
    in us) of a perf-suite case: what evict launches for it (H2O's recency clause becomes its
    recent window)."""
    policy = POLICIES[name]
    keys, values, queries = make_cache(batch, n)
    q = queries if policy.needs_queries else None
    k = resolve_budget(budget, n)
    floor = floor_bytes(policy, keys, values, q, k) / bandwidth * 1e6
    policy, alloc = lower(policy, allocate(policy, n, k))
    return policy, alloc, compiler.compile_policy(policy), keys, values, q, floor


def prepared(compiled, alloc, keys, values, queries, gather: bool = True):
    """A call's launches as evict would make them on its second call: a first call compiles and
    learns the select and score kernels' occupancy, which the next call's geometry reads
    (score waves, the select's programs)."""
    compiler.run(compiler.prepare(compiled, alloc, keys, values, queries, 0, gather=gather))
    return compiler.prepare(compiled, alloc, keys, values, queries, 0, gather=gather)


def breakdown(name: str, n: int, batch: int, budget: float, replays: int, bandwidth: float,
              gather: bool = True) -> dict:
    """``gather=False``: select writes the kept indices only (its time then excludes the copy
    of the kept K / V rows)."""
    _, alloc, compiled, keys, values, q, floor = lowered_case(name, n, batch, budget, bandwidth)
    launches = prepared(compiled, alloc, keys, values, q, gather).launches
    marker = keys.new_empty(1)
    prefixes = [prefix_us(launches, k, replays, marker) for k in range(len(launches) + 1)]
    steps = [dict(kernel=kernel_name(s.fn), grid=list(s.grid), us=prefixes[i + 1] - prefixes[i])
             for i, s in enumerate(launches)]
    return dict(policy=name, N=n, B=batch, budget=budget, gather=gather,
                total_us=prefix_us(launches, len(launches), replays), start_us=prefixes[0],
                k_read_floor_us=keys.numel() * keys.element_size() / bandwidth * 1e6,
                floor_us=floor, launches=steps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="tova")
    parser.add_argument("--n", type=int, nargs="+", default=[131072])
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--budget", type=float, nargs="+", default=[0.1])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--gather", choices=["1", "0", "both"], default="1",
                        help="0: select writes the indices only, without copying the kept rows; both: each case twice")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CPU: checks the script)")
    args = parser.parse_args(argv)
    if args.toy:
        args.n, args.batch, args.budget, args.replays = [64], [1], args.budget[:1], 1
    bandwidth = copy_bandwidth()
    print(f"{'GPU' if CUDA else 'CPU'}  copy bandwidth {bandwidth / 1e9:.0f} GB/s  (us, CUDA-graph replay of "
          f"launch prefixes)")
    rows = []
    for name in args.policies.split(","):
        for n in args.n:
            for batch in args.batch:
                for budget in args.budget:
                    for gather in {"1": [True], "0": [False], "both": [True, False]}[args.gather]:
                        r = breakdown(name, n, batch, budget, args.replays, bandwidth, gather)
                        rows.append(r)
                        print(f"-- {name} N={n} B={batch} budget={budget}{'' if gather else ' indices only'}: "
                              f"{r['total_us']:.1f} us, floor {r['floor_us']:.1f} (K read {r['k_read_floor_us']:.1f}); "
                              f"start {r['start_us']:.1f}")
                        for s in r["launches"]:
                            print(f"   {s['kernel']:<24}{str(s['grid']):<18}{s['us']:>9.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(rows=rows), indent=1))


if __name__ == "__main__":
    main()
