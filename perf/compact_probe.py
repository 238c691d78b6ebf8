"""In-place compaction (tritonkv.kernels.compact) of an every-step eviction's buffer, by programs
per row: the wide model's 8 stacked layers [8, 8, slots, 64] bf16, one token dropped per row at a
random place, CUDA-graph replay (us). A tuning tool, not part of the benchmark suite.

    python perf/compact_probe.py [--slots 1639 13108] [--programs 0 9 18 36 72]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.timing import graph_seconds  # noqa: E402
from tritonkv import reference  # noqa: E402
from tritonkv.kernels.compact import compact_in_place, compact_programs  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, nargs="+", default=[1639, 13108])
    parser.add_argument("--programs", type=int, nargs="+", default=[0, 9, 18, 36, 72])
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in args.slots:
        shape = (8, 8, n, 64)
        keys = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
        values = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
        drop = torch.randint(0, n, (8, 8, 1), device="cuda", generator=g)
        kept = torch.ones(8, 8, n, dtype=torch.bool, device="cuda").scatter_(-1, drop, False)
        index = reference.kept_indices(kept)
        line = []
        for p in args.programs:
            us = graph_seconds(lambda: compact_in_place(index, keys, values, p), replays=50) * 1e6
            line.append(f"{p or compact_programs(64, n - 1, keys.device)}{'*' if not p else ''}: {us:.1f}")
        print(f"slots {n}: " + "  ".join(line) + "   (programs per row: us; * = default)")


if __name__ == "__main__":
    main()
