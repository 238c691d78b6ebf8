"""python -m tritonkv.dashboard {build,compare} ..."""

import argparse
import sys
from pathlib import Path

from .compare import DEFAULT_HOST_THRESHOLD, DEFAULT_THRESHOLD


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonkv.dashboard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the static HTML dashboard from a results directory")
    b.add_argument("results", type=Path, help="directory of result files (perf/results)")
    b.add_argument("-o", "--out", type=Path, default=Path("site"), help="output directory")
    b.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    b.add_argument("--host-threshold", type=float, default=DEFAULT_HOST_THRESHOLD)
    c = sub.add_parser("compare", help="flag regressions of a run against a baseline; exit 1 if any")
    c.add_argument("new", help="result file of the new run")
    c.add_argument("baseline", nargs="?",
                   help="result file of the baseline (default: the latest earlier run on the same GPU with cases in "
                        "common)")
    c.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="relative slowdown of replay median AND min that counts as a kernel regression "
                        "(0.10 = 10%%; also the wall-time rule for runs without replay times)")
    c.add_argument("--host-threshold", type=float, default=DEFAULT_HOST_THRESHOLD,
                   help="relative slowdown of host time per call, mean AND best block, that counts as a host "
                        "regression (default 0.25: host time is noisier)")
    c.add_argument("--judge", choices=("both", "kernel", "host"), default="kernel",
                   help="which side to judge: kernels (CUDA-graph replay time; the default), host (host "
                        "time per call), or both. Host time is judged only when asked: the H100 machines' "
                        "CPUs run the same calls 1.5-2.6x slower in spells of seconds, and two runs of one "
                        "commit differed by 0.40-1.74x per case (perf/host_noise_probe.py)")
    args = parser.parse_args(argv)
    if args.command == "build":
        from .build import build
        index = build(args.results, args.out, args.threshold, args.host_threshold)
        print(f"dashboard: {index}")
        return 0
    from .compare import main as compare_main
    judge = ("kernel", "host") if args.judge == "both" else (args.judge,)
    return compare_main(args.new, args.baseline, args.threshold, judge, args.host_threshold)


if __name__ == "__main__":
    sys.exit(main())
