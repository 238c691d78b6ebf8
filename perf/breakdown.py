"""Where the time of one evict() goes: statistics + score kernels vs select + gather, next to
the HBM floor. A tool for tuning, not part of the benchmark suite. Select runs as evict runs it:
one row per batch row where the heads share their selection (TOVA). Until 2026-12-06 this tool
timed a per-head select for TOVA, which evict no longer runs.

    python perf/breakdown.py [--n 131072] [--batch 1] [--peer]

--peer adds the peer's time (kvpress' formulation: scores in the cache dtype, torch.topk, gather)
and how many times faster evict() is.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.baselines import peer_evict  # noqa: E402
from perf.floor import copy_bandwidth, floor_bytes  # noqa: E402
from perf.test_evict import POLICIES, make_cache  # noqa: E402
from tritonkv import compiler  # noqa: E402
from tritonkv.budget import allocate, resolve_budget  # noqa: E402
from tritonkv.kernels.gather import gather_rows  # noqa: E402
from tritonkv.kernels.select import select_indices  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3


def peer_columns(peer, keys, values, queries, k, total):
    """The peer's time and evict()'s speed-up over it, or nothing where there is no peer."""
    if not peer:
        return ""
    t = bench(lambda: peer(keys, values, queries, k))
    return f"{t * 1e3:>10.3f}{t / total:>8.2f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=float, nargs="+", default=[0.5])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--peer", action="store_true", help="time the peer beside evict()")
    args = parser.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bw / 1e9:.0f} GB/s")
    print(f"{'policy':<15}{'N':>8}{'total ms':>10}{'score ms':>10}{'select ms':>10}{'gather ms':>10}"
          f"{'floor ms':>10}{'x floor':>9}" + (f"{'peer ms':>10}{'x peer':>8}" if args.peer else ""))
    for n, budget in itertools.product(args.n, args.budget):
        keys, values, queries = make_cache(args.batch, n)
        print(f"-- N={n} B={args.batch} budget={budget}")
        for name in args.policies.split(","):
            policy = POLICIES[name]
            q = queries if policy.needs_queries else None
            k = resolve_budget(budget, n)
            alloc = allocate(policy, n, k)
            compiled = compiler.compile_policy(policy)
            total = bench(lambda: tkv.evict(keys, values, policy, budget, queries=q))
            score = bench(lambda: compiler.score(compiled, keys, values, q, 0))
            # every clause's priority stored (a sample clause's, as select computes it from its slot)
            prios = compiler.score(compiled, keys, values, q, 0, clauses=True)
            b, h = keys.shape[:2]
            rows = b * h
            clauses = range(len(compiled.program.clause_keys))
            # as evict selects: one row per batch row where the heads share the selection (TOVA)
            shared = compiler.shared_selection(compiled.program)
            selected = lambda: select_indices(prios, clauses, alloc.clause_counts, alloc.n_sink,  # noqa: E731
                                              alloc.n_recent, rows, n, alloc.total, keys.device, heads=h,
                                              shared=shared)
            select = bench(selected)
            idx = selected().view(b, h, -1)
            gather = bench(lambda: gather_rows(idx, keys, values))
            floor = floor_bytes(policy, keys, values, q, alloc.total) / bw
            print(f"{name:<15}{n:>8}{total * 1e3:>10.3f}{score * 1e3:>10.3f}{select * 1e3:>10.3f}"
                  f"{gather * 1e3:>10.3f}{floor * 1e3:>10.3f}{total / floor:>9.2f}" + peer_columns(
                      args.peer and peer_evict(name), keys, values, q, alloc.total, total))


if __name__ == "__main__":
    main()
