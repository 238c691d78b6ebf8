"""Tuning sweep of the generated kernels' tile size and warps, and a per-kernel GPU profile.

    python perf/sweep.py
Prints, per policy and N: the score stage's time for each (BLOCK_N, num_warps), then the
GPU time of every kernel of one evict() from torch.profiler.
"""

import itertools
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.test_evict import POLICIES, make_cache  # noqa: E402
from tritonkv import compiler  # noqa: E402
from tritonkv.geometry import clear_geometry  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def sweep(name, n, blocks, warps):
    keys, values, queries = make_cache(1, n)
    policy = POLICIES[name]
    q = queries if policy.needs_queries else None
    compiled = compiler.compile_policy(policy)
    row = []
    for block_n, nw in itertools.product(blocks, warps):
        os.environ["TRITONKV_BLOCK_N"], os.environ["TRITONKV_WARPS"] = str(block_n), str(nw)
        clear_geometry()
        try:
            row.append((block_n, nw, bench(lambda: compiler.score(compiled, keys, values, q, 0))))
        except Exception as e:  # out of resources etc.
            row.append((block_n, nw, float("nan")))
            print(f"  {name} BLOCK_N={block_n} warps={nw}: {type(e).__name__}", file=sys.stderr)
    del os.environ["TRITONKV_BLOCK_N"], os.environ["TRITONKV_WARPS"]
    clear_geometry()
    best = min(row, key=lambda r: r[2] if r[2] == r[2] else 1e9)
    print(f"{name:<14}{n:>8}  " + "  ".join(f"{b}/{w}:{t:.3f}" for b, w, t in row) + f"   best {best[0]}/{best[1]}")


def profile(name, n):
    keys, values, queries = make_cache(1, n)
    policy = POLICIES[name]
    q = queries if policy.needs_queries else None
    run = lambda: tkv.evict(keys, values, policy, 0.5, queries=q)  # noqa: E731
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / e.count) for e in prof.key_averages() if e.device_time_total > 0]
    print(f"{name} N={n}: " + ", ".join(f"{k[:28]} {t:.1f}us" for k, t in sorted(rows, key=lambda r: -r[1])))


if __name__ == "__main__":
    print("score stage ms for BLOCK_N/num_warps")
    for n in (32768, 131072):
        sweep("knorm", n, [32, 64, 128, 256], [4, 8])
        sweep("keydiff", n, [32, 64, 128, 256], [4, 8])
        sweep("snapkv", n, [32, 64, 128], [4, 8])
    for name in ("keydiff", "knorm", "snapkv", "nacl", "random", "streaming_llm"):
        for n in (8192, 131072):
            profile(name, n)
