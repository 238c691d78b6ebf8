"""Peak GPU memory of evict() beyond its inputs and outputs, for N up to 1M tokens.

    python perf/memory.py --out memory.json
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
from perf.test_evict import POLICIES, make_cache  # noqa: E402
from perf.timing import peak_extra_bytes  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, nargs="+", default=[131072, 524288, 1048576])
    args = parser.parse_args()
    rows = []
    for n in args.n:
        keys, values, queries = make_cache(1, n)
        for name in ("streaming_llm", "knorm", "random", "keydiff", "tova", "snapkv", "nacl", "snapkv+sample"):
            policy = POLICIES[name]
            q = queries if policy.needs_queries else None
            for budget in (0.1, 0.5):
                run = lambda: tkv.evict(keys, values, policy, budget, queries=q)  # noqa: E731
                out = run()
                torch.cuda.synchronize()
                start = time.perf_counter()
                out = run()
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                output = sum(t.numel() * t.element_size() for t in (out.keys, out.values, out.indices))
                del out
                extra = peak_extra_bytes(run, output)
                row = dict(policy=name, N=n, budget=budget, extra_bytes=extra,
                           extra_bytes_per_token_head=extra / (8 * n), input_bytes=2 * keys.numel() * 2,
                           ms=seconds * 1e3)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del keys, values, queries
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
