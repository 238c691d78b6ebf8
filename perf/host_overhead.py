"""Host (CPU) time of evict() on the GPU machine: wall time of back-to-back calls with the
GPU kept busy, and a cProfile of where the Python time goes."""

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.test_evict import POLICIES, make_cache  # noqa: E402
from tritonkv.kernels import launch as L  # noqa: E402

for name in ("knorm", "keydiff", "streaming_llm", "snapkv"):
    keys, values, queries = make_cache(1, 8192)
    policy = POLICIES[name]
    q = queries if policy.needs_queries else None
    f = lambda: tkv.evict(keys, values, policy, 0.5, queries=q)  # noqa: E731
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100):
        f()
    host = (time.perf_counter() - t) / 100
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / 100
    print(f"{name:<14} host enqueue {host * 1e6:7.1f} us/call, with GPU {total * 1e6:7.1f} us/call")
    if name == "keydiff":
        cProfile.run("for _ in range(100): f()", "/tmp/prof")
        torch.cuda.synchronize()
        pstats.Stats("/tmp/prof").sort_stats("tottime").print_stats(15)
print("launchers:", {k: len(v.compiled) for k, v in L._LAUNCHERS.items()})
