"""A few evict calls of one policy at one shape, for Nsight Compute to profile their kernels
(achieved DRAM bandwidth, occupancy, stall reasons of the score stage's passes).

    ncu --kernel-name regex:'stats_0|score' --launch-skip 4 --launch-count 2 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section WarpStateStats python perf/ncu_probe.py --policy tova --n 131072 --batch 4
    python perf/ncu_probe.py --toy        # CPU, tiny sizes: checks the script

The first calls compile and plan; the profiler should skip them (--launch-skip).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.host_overhead import inputs  # noqa: E402
from perf.test_evict import POLICIES, make_cache  # noqa: E402
from perf.timing import sync  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--policy", default="tova", choices=sorted(POLICIES))
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--toy", action="store_true")
    args = parser.parse_args(argv)
    if args.toy:
        args.n, args.batch, args.calls = 256, 1, 2
    keys, values, queries = make_cache(args.batch, args.n)
    policy = POLICIES[args.policy]
    evictor = tkv.Evictor(policy, args.budget)
    kwargs = inputs(policy, keys, values, queries)
    for _ in range(args.calls):
        out = evictor(keys, values, **kwargs)
    sync()
    print(f"{args.policy} N={args.n} B={args.batch} budget={args.budget}: {args.calls} calls, "
          f"kept {tuple(out.indices.shape)}")


if __name__ == "__main__":
    main()
