"""tkv.paged.evict on a paged pool against the way to do it without it: gather each sequence's
pages to a dense tensor, tkv.evict, scatter the kept rows back into its first pages.

    python perf/paged.py [--policies knorm,snapkv] [--budgets 0.1,0.5] [--json out.json]
    python perf/paged.py --toy       # CI: tiny sizes on the CPU (the interpreter), checks the script

A batch of 8 sequences of 32k .. 128k tokens in 16-token pages (NHD, bf16, H_kv = 8, D = 128,
shuffled page ids). Three times per case (perf/timing.py): wall (one call, L2 flushed, host
launch included), graph replay (the kernels; ``check=False`` inside the capture) and host (CPU
per call, back to back). x_floor: graph replay / the HBM floor of the same work on dense
tensors (perf/floor.py: K / V read once where scores need them, the kept rows read and written,
the kept positions written), at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from tritonkv import paged, policies  # noqa: E402
from tritonkv.budget import resolve_budget  # noqa: E402
from tritonkv.paged import _Pool  # noqa: E402

from perf.floor import copy_bandwidth, floor_bytes  # noqa: E402
from perf.timing import DEVICE, graph_times, host_times, median_seconds  # noqa: E402

LENGTHS = [32768, 131072, 65536, 98304, 40960, 114688, 81920, 57344]   # 32k .. 128k, 4.5M tokens
TOY_LENGTHS = [70, 100, 90]


def make_pool(lengths, page, heads, d, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    need = [-(-n // page) for n in lengths]
    num_pages = sum(need) + 8
    k = torch.randn(num_pages, page, heads, d, dtype=dtype, device=DEVICE)
    v = torch.randn(num_pages, page, heads, d, dtype=dtype, device=DEVICE)
    order = torch.randperm(num_pages, generator=g)
    table = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    at = 0
    for b, count in enumerate(need):
        table[b, :count] = order[at:at + count].int()
        at += count
    return k, v, table.to(DEVICE)


def dense_then_scatter(k, v, table, lengths, policy, budget, queries):
    """The baseline: per sequence, its pages gathered to [1, H, n, D], tkv.evict, the kept rows
    written back into its first pages."""
    k_pool, v_pool = _Pool.of(k, "NHD"), _Pool.of(v, "NHD")
    for b, n in enumerate(lengths):
        rows = table[b, : -(-n // k_pool.page_size)]
        q = None if queries is None else queries[b:b + 1]
        out = tkv.evict(k_pool.tokens(rows, n), v_pool.tokens(rows, n), policy, budget, queries=q)
        k_pool.write(rows, out.keys[0])
        v_pool.write(rows, out.values[0])


def measure(name, budget, lengths, page, heads, d, group, window, bandwidth, rounds):
    policy = policies.PRESETS[name]() if name in policies.PRESETS else policies.COMPOSITES[name]
    k, v, table = make_pool(lengths, page, heads, d, torch.bfloat16)
    queries = torch.randn(len(lengths), heads * group, window, d, dtype=torch.bfloat16, device=DEVICE) \
        if policy.needs_queries else None
    seq_lens = torch.tensor(lengths, dtype=torch.int32)

    def ours():
        paged.evict(k, v, table, seq_lens, policy, budget, queries=queries, check=False)

    def baseline():
        dense_then_scatter(k, v, table, lengths, policy, budget, queries)

    kept = [resolve_budget(budget, n) for n in lengths]
    floor = 0
    for n, kk in zip(lengths, kept):
        meta = torch.empty(1, heads, n, d, dtype=torch.bfloat16, device="meta")
        q = None if queries is None else torch.empty(1, heads * group, window, d, dtype=torch.bfloat16,
                                                     device="meta")
        floor += floor_bytes(policy, meta, meta, q, min(kk, n))
    row = dict(policy=name, budget=budget, page=page, sequences=len(lengths), tokens=sum(lengths), heads=heads,
               d=d, floor_bytes=floor, floor_ms=floor / bandwidth * 1e3, device=DEVICE)
    for label, fn in (("paged", ours), ("dense_gather_scatter", baseline)):
        wall = median_seconds(fn, rounds)
        replay = statistics.median(graph_times(fn, replays=rounds))
        host = statistics.median(host_times(fn, calls=4 * rounds, block=rounds))
        row[f"{label}_wall_ms"] = wall * 1e3
        row[f"{label}_gpu_ms"] = replay * 1e3
        row[f"{label}_host_us"] = host * 1e6
        row[f"{label}_x_floor_gpu"] = replay * bandwidth / floor
    row["speedup_gpu"] = row["dense_gather_scatter_gpu_ms"] / row["paged_gpu_ms"]
    row["speedup_wall"] = row["dense_gather_scatter_wall_ms"] / row["paged_wall_ms"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="streaming_llm,knorm,keydiff,snapkv,tova")
    parser.add_argument("--budgets", default="0.1,0.5")
    parser.add_argument("--page", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CI on the CPU)")
    args = parser.parse_args(argv)
    if args.toy:
        lengths, heads, d, window, rounds = TOY_LENGTHS, 2, 64, 64, 2
    else:
        lengths, heads, d, window, rounds = LENGTHS, 8, 128, 64, 10
    bandwidth = copy_bandwidth()
    rows = []
    print(f"{'policy':<14}{'budget':>7}{'floor ms':>10}{'paged gpu':>11}{'x floor':>9}{'dense gpu':>11}"
          f"{'x floor':>9}{'speedup':>9}{'wall ms':>9}{'host us':>9}", flush=True)
    for name in args.policies.split(","):
        for budget in (float(x) for x in args.budgets.split(",")):
            row = measure(name, budget, lengths, args.page, heads, d, 4, window, bandwidth, rounds)
            row["copy_bandwidth"] = bandwidth
            rows.append(row)
            print(f"{name:<14}{budget:>7}{row['floor_ms']:>10.3f}{row['paged_gpu_ms']:>11.3f}"
                  f"{row['paged_x_floor_gpu']:>9.2f}{row['dense_gather_scatter_gpu_ms']:>11.3f}"
                  f"{row['dense_gather_scatter_x_floor_gpu']:>9.2f}{row['speedup_gpu']:>9.2f}"
                  f"{row['paged_wall_ms']:>9.2f}{row['paged_host_us']:>9.0f}", flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
