"""Host (CPU) time of evict() on the GPU machine: wall time of back-to-back calls, the cost
of each step alone, and a cProfile of where the Python time goes."""

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.test_evict import POLICIES, make_cache  # noqa: E402
from tritonkv.kernels.gather import gather_rows  # noqa: E402


def per_call(f, n=200):
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host * 1e6, (time.perf_counter() - t) / n * 1e6


keys, values, queries = make_cache(1, 8192)
idx = torch.arange(0, 8192, 2, device="cuda").expand(1, 8, -1).contiguous()
print("torch.empty 1MB     %.1f / %.1f us" % per_call(lambda: torch.empty(1 << 18, device="cuda")))
print("torch.zeros 64KB    %.1f / %.1f us" % per_call(lambda: torch.zeros(1 << 14, device="cuda", dtype=torch.int32)))
print("gather_rows         %.1f / %.1f us" % per_call(lambda: gather_rows(idx, keys, values)))
for name in ("knorm", "streaming_llm", "keydiff"):
    policy = POLICIES[name]
    q = queries if policy.needs_queries else None
    f = lambda: tkv.evict(keys, values, policy, 0.5, queries=q)  # noqa: E731
    print(f"evict {name:<14} %.1f / %.1f us" % per_call(f))
policy = POLICIES["knorm"]
f = lambda: tkv.evict(keys, values, policy, 0.5)  # noqa: E731
cProfile.run("for _ in range(200): f()", "/tmp/prof")
torch.cuda.synchronize()
pstats.Stats("/tmp/prof").sort_stats("tottime").print_stats(25)
