"""Peak GPU memory of evict() beyond its inputs and outputs, for N up to 1M tokens.

    python perf/memory.py --out perf/results/memory      # GPU: memory.json in that folder
    python perf/memory.py --out /tmp/memory --toy        # CPU, tiny sizes: checks the script
B = 1, H_kv = 8, D = 128, bfloat16, budget 10% and 50%; proxy policies with 32 query heads
and a 64-query window. Expected: about one float32 per token per head and priority slot
(the priorities the select kernel ranks), plus small row statistics; never a [W, N]
attention matrix nor sort buffers.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.test_evict import POLICIES, make_cache, make_named  # noqa: E402
from perf.timing import CUDA, peak_extra_bytes, settle, sync  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="folder for memory.json")
    parser.add_argument("--n", type=int, nargs="+", default=[131072, 524288, 1048576])
    parser.add_argument("--toy", action="store_true", help="N = 256 (on the CPU no peak is known): checks the script")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [256] if args.toy else args.n:
        keys, values, queries = make_cache(1, n)
        for name, policy in POLICIES.items():
            signals, directions = make_named(policy, 1, n)
            kw = dict(queries=queries if policy.needs_queries else None, signals=signals or None,
                      directions=directions or None)
            for budget in (0.1, 0.5):
                run = lambda: tkv.evict(keys, values, policy, budget, **kw)  # noqa: E731
                out = run()
                sync()
                start = time.perf_counter()
                out = run()
                sync()
                seconds = time.perf_counter() - start
                output = sum(t.numel() * t.element_size() for t in (out.keys, out.values, out.indices))
                del out
                extra = peak_extra_bytes(run, output)
                row = dict(policy=name, N=n, budget=budget, extra_bytes=extra,
                           extra_bytes_per_token_head=None if extra is None else extra / (keys.shape[1] * n),
                           input_bytes=2 * keys.numel() * keys.element_size(), ms=seconds * 1e3)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del keys, values, queries
        settle()   # the next N's calls not timed during the driver's work on what was freed
    path = args.out / "memory.json"
    path.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name() if CUDA else "cpu", rows=rows), indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
