"""A / B of TOVA's one pass over K (the statistics pass keeps its logits, the score pass reads
them: kernels/proxy.py LOGITS) against two passes (``TRITONKV_PROXY_LOGITS=0``), in one
process, beside the peer (kvpress' formulation: scores in the cache's dtype, topk, gather).
Per case three times of tkv.evict through a planned Evictor: wall (one call from an idle GPU,
host launch included), graph (CUDA-graph replay: kernels alone) and host (back-to-back calls);
the variants interleaved, medians over ``--repeats``. B x 8 KV heads x N x 128, bf16, 32 query
heads (one query each).

    python perf/proxy_logits_ab.py [--repeats 3] [--json OUT.json]
    python perf/proxy_logits_ab.py --toy        # CPU, tiny sizes: checks the script
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.baselines import peer_evict  # noqa: E402
from perf.timing import DEVICE, event_seconds, graph_seconds, host_times  # noqa: E402
from tritonkv import geometry, policies  # noqa: E402
from tritonkv.runtime import Evictor  # noqa: E402

CASES = [(b, n, budget) for b in (1, 4) for n in (131072, 524288) for budget in (0.1, 0.5)]
VARIANTS = ("two passes", "one pass")


def evictor(variant: str, budget: float) -> Evictor:
    """A fresh Evictor planned under the variant's setting (geometry is cached per shape)."""
    os.environ["TRITONKV_PROXY_LOGITS"] = "1" if variant == "one pass" else "0"
    geometry.clear_geometry()
    return Evictor(policies.tova(), budget)


def times_us(fn, replays: int) -> dict:
    fn()
    return dict(wall=event_seconds(fn) * 1e6,
                graph=graph_seconds(fn, replays=replays) * 1e6 if DEVICE == "cuda" else float("nan"),
                host=statistics.mean(host_times(fn, calls=100 if DEVICE == "cuda" else 4, block=25)) * 1e6)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--toy", action="store_true", help="toy sizes (CPU: checks the script)")
    args = parser.parse_args(argv)
    cases = [(1, 300, 0.1), (2, 257, 0.5)] if args.toy else CASES
    replays = 2 if args.toy else 20
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{name}  tova  8 KV heads, D=128 bf16, 4 query heads per KV head; us: wall / graph / host")
    rows = []
    peer = peer_evict("tova")
    for b, n, budget in cases:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
        keys = torch.randn(b, 8, n, 128, device=DEVICE, dtype=dtype, generator=g)
        values = torch.randn_like(keys)
        queries = torch.randn(b, 32, 1, 128, device=DEVICE, dtype=dtype, generator=g)
        k = max(1, int(budget * n))
        got = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                ev = evictor(variant, k)
                got[variant].append(times_us(lambda: ev(keys, values, queries=queries), replays))
        got["peer"] = [times_us(lambda: peer(keys, values, queries, k), replays)]
        row = dict(B=b, N=n, budget=budget, gpu=name)
        for variant, runs in got.items():
            for kind in ("wall", "graph", "host"):
                row[f"{variant} {kind} us"] = statistics.median(r[kind] for r in runs)
        rows.append(row)
        def us(variant, kind):
            return row[f"{variant} {kind} us"]

        times = " | ".join(f"{v} " + " ".join(f"{us(v, k):8.1f}" for k in ("wall", "graph", "host")) for v in VARIANTS)
        print(f"B={b} N={n:>6} {int(budget * 100)}%  {times} | one / two (graph) "
              f"{us('one pass', 'graph') / us('two passes', 'graph'):.3f} | peer / one (wall) "
              f"{us('peer', 'wall') / us('one pass', 'wall'):.2f}x", flush=True)
    os.environ.pop("TRITONKV_PROXY_LOGITS", None)
    geometry.clear_geometry()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(rows=rows), indent=1))


if __name__ == "__main__":
    main()
