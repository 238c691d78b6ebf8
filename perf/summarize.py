"""Markdown summary of a benchmark run (and optionally a memory run) for docs/performance.md.

    python perf/summarize.py perf/results/RUN.json [--memory perf/results/memory-*.json] > docs/performance.md
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tritonkv.dashboard.results import load_run  # noqa: E402


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("--memory", type=Path)
    args = parser.parse_args()
    run = load_run(args.run)
    print(f"# Performance on {run.gpu}\n")
    print(f"Run `{args.run.name}` (commit {run.commit}): {len(run.cases)} cases, B x H_kv=8 x N x D=128, "
          "bf16, proxy attention with H_q=32 and a 64-query window. `ms` is one call until its GPU work is "
          "done (launch overhead included); `GPU ms` replays the same kernels from a CUDA graph. The floor "
          "is the HBM traffic no implementation avoids, at the copy bandwidth measured in the run "
          f"({fmt(next(iter(run.cases.values())).get('bandwidth_GBps'), 0)} GB/s).\n")
    by_policy = defaultdict(list)
    for case in run.cases.values():
        by_policy[case.policy].append(case)
    print("| policy | N | B | budget | ms | GPU ms | floor ms | x floor | x floor (GPU) | vs eager | vs compile "
          "| extra B/token/head |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for policy, cases in by_policy.items():
        for c in sorted(cases, key=lambda c: (c.n, c.batch, c.budget)):
            print(f"| {policy} | {c.n} | {c.batch} | {c.budget:g} | {fmt(c.get('time_ms'), 3)} | "
                  f"{fmt(c.get('gpu_ms'), 3)} | {fmt(c.get('floor_ms'), 3)} | {fmt(c.get('x_floor'))} | "
                  f"{fmt(c.get('x_floor_gpu'))} | {fmt(c.get('speedup_vs_eager'), 1)} | "
                  f"{fmt(c.get('speedup_vs_compile'), 1)} | {fmt(c.get('extra_bytes_per_token_head'), 1)} |")
    if args.memory:
        mem = json.loads(args.memory.read_text())
        print(f"\n## Peak extra memory, N up to 1M ({mem['gpu']})\n")
        print("B=1, H_kv=8, D=128, bf16. Extra = peak allocated during evict() minus inputs and outputs.\n")
        print("| policy | N | budget | extra MiB | bytes / token / head | ms |")
        print("|---|---|---|---|---|---|")
        for r in mem["rows"]:
            print(f"| {r['policy']} | {r['N']} | {r['budget']:g} | {r['extra_bytes'] / 2**20:.1f} | "
                  f"{r['extra_bytes_per_token_head']:.2f} | {r['ms']:.2f} |")


if __name__ == "__main__":
    main()
