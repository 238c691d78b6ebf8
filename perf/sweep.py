"""Tuning sweep of the generated kernels' tile size and warps, and a per-kernel GPU profile.

    python perf/sweep.py                       the default sweep, then the profiles
    python perf/sweep.py --policies snapkv --n 131072 --blocks 32 64 128 --warps 4 8 --stages 0 2 3 4 --flash
    python perf/sweep.py --policies tova --batch 4 --blocks 64 128 256 --stages 0 3 4
Prints, per policy and N: the score stage's time (ms) for each (BLOCK_N, num_warps, num_stages; 0 =
Triton's default), then the GPU time of every kernel of one evict() from torch.profiler. --flash adds one
SDPA pass (FlashAttention-2, PV included) of the same proxy queries over the keys: the yardstick of
the proxy-attention policies' two passes.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.settings import switches  # noqa: E402
from perf.test_evict import POLICIES, make_cache  # noqa: E402
from tritonkv import compiler  # noqa: E402
from tritonkv.geometry import clear_geometry  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def sweep(name, n, blocks, warps, stages=(0,), batch=1):
    keys, values, queries = make_cache(batch, n)
    policy = POLICIES[name]
    q = queries if policy.needs_queries else None
    compiled = compiler.compile_policy(policy)
    row = []
    for block_n, nw, ns in itertools.product(blocks, warps, stages):
        setting = {"TRITONKV_BLOCK_N": str(block_n), "TRITONKV_WARPS": str(nw)}
        with switches(setting | ({"TRITONKV_STAGES": str(ns)} if ns else {})):
            clear_geometry()
            try:
                row.append((block_n, nw, ns, bench(lambda: compiler.score(compiled, keys, values, q, 0))))
            except Exception as e:  # out of resources etc.
                row.append((block_n, nw, ns, float("nan")))
                print(f"  {name} BLOCK_N={block_n} warps={nw} stages={ns}: {type(e).__name__}", file=sys.stderr)
    clear_geometry()
    best = min(row, key=lambda r: r[3] if r[3] == r[3] else 1e9)
    print(f"{name:<14}{n:>8} B={batch}  " + "  ".join(f"{b}/{w}/{s}:{t:.3f}" for b, w, s, t in row)
          + f"   best {best[0]}/{best[1]}/{best[2]}")


def flash_pass(n):
    """ms of one SDPA FlashAttention pass of the benchmark's proxy queries over its keys (K / V
    repeated per query head outside the timing, as FA2 reads them per head)."""
    keys, values, queries = make_cache(1, n)
    group = queries.shape[1] // keys.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (keys, values))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        t = bench(lambda: torch.nn.functional.scaled_dot_product_attention(queries, k, v))
    print(f"{'flash (FA2)':<14}{n:>8}  one pass, PV included: {t:.3f}")


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", nargs="+")
    parser.add_argument("--n", type=int, nargs="+", default=[131072])
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[0])
    parser.add_argument("--batch", type=int, default=1, help="batch rows of the swept cache (B x 8 heads)")
    parser.add_argument("--flash", action="store_true")
    args = parser.parse_args()
    if args.policies:
        print("score stage ms for BLOCK_N/num_warps/num_stages")
        for n in args.n:
            if args.flash:
                flash_pass(n)
            for name in args.policies:
                sweep(name, n, args.blocks, args.warps, args.stages, args.batch)
        return
    print("score stage ms for BLOCK_N/num_warps/num_stages")
    for n in (32768, 131072):
        sweep("knorm", n, [32, 64, 128, 256], [4, 8])
        sweep("keydiff", n, [32, 64, 128, 256], [4, 8])
        sweep("snapkv", n, [32, 64, 128], [4, 8])
    for name in ("keydiff", "knorm", "snapkv", "nacl", "random", "streaming_llm"):
        for n in (8192, 131072):
            profile(name, n)


if __name__ == "__main__":
    main()
