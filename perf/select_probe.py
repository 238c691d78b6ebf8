"""Where an every-step eviction of StaticEvictingCache spends its GPU time: the cache of all
layers stacked ([layers * B, H_kv, budget + 1, D], one token dropped per row), timed as
evict() (select with the gather fused), its score stage, select alone and the gather alone,
each as the replay of a CUDA graph of it (kernels alone: at these sizes one call's host time
exceeds its GPU time, so an event-timed call measures the host). A tuning tool, not part of
the benchmark suite; TRITONKV_SELECT_BLOCK sets select's tokens per step (and so its programs
per row).

    python perf/select_probe.py [--slots 1639 6554 13108] [--policy tova]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.test_evict import POLICIES  # noqa: E402
from perf.timing import graph_seconds  # noqa: E402
from tritonkv import compiler  # noqa: E402
from tritonkv.budget import allocate  # noqa: E402
from tritonkv.kernels import select as select_module  # noqa: E402
from tritonkv.kernels.gather import gather_rows  # noqa: E402
from tritonkv.kernels.select import select_indices, select_programs  # noqa: E402


def bench_us(fn):
    """us per call: the median replay of a CUDA graph of it (perf/timing.py)"""
    return graph_seconds(fn, replays=50) * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, nargs="+", default=[1639, 6554, 13108])
    parser.add_argument("--policy", default="tova")
    parser.add_argument("--rows", type=int, default=8, help="layers * batch (the wide model: 8 layers)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--group", type=int, default=4)
    args = parser.parse_args()
    policy = POLICIES[args.policy]
    compiled = compiler.compile_policy(policy)
    print(f"{torch.cuda.get_device_name()}  {args.policy}  [{args.rows}, {args.heads}, slots, {args.dim}] "
          f"select block {[select_module.scan_block(n) for n in args.slots]}")
    print(f"{'slots':>7}{'P/row':>7}{'evict us':>10}{'score us':>10}{'select us':>11}{'gather us':>11}")
    for n in args.slots:
        g = torch.Generator(device="cuda").manual_seed(0)
        shape = (args.rows, args.heads, n, args.dim)
        keys = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
        values = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
        q = torch.randn(args.rows, args.heads * args.group, 1, args.dim, device="cuda", dtype=torch.bfloat16,
                        generator=g) if policy.needs_queries else None
        budget = n - 1
        alloc = allocate(policy, n, budget)
        rows = args.rows * args.heads
        evict = bench_us(lambda: tkv.evict(keys, values, policy, budget, queries=q))
        score = bench_us(lambda: compiler.score(compiled, keys, values, q, 0))
        prios = compiler.score(compiled, keys, values, q, 0, clauses=True)
        clauses = range(len(compiled.program.clause_keys))
        sel = lambda: select_indices(prios, clauses, alloc.clause_counts, alloc.n_sink,  # noqa: E731
                                     alloc.n_recent, rows, n, alloc.total, keys.device)
        select = bench_us(sel)
        idx = sel().view(args.rows, args.heads, -1)
        gather = bench_us(lambda: gather_rows(idx, keys, values))
        p = select_programs(rows, n, clauses, keys.device, args.dim, args.dim)
        print(f"{n:>7}{p:>7}{evict:>10.1f}{score:>10.1f}{select:>11.1f}{gather:>11.1f}")


if __name__ == "__main__":
    main()
