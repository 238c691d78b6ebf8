"""A / B of one selection per batch row (kernels/select.py SHARED) against one per head, in one
process, for the head-reduced policies it applies to (TOVA): the every-step eviction of the
wide model's stacked cache (8 layers x 8 KV heads x budget + 1 slots, indices only, as
StaticEvictingCache runs it) and standalone evict() at B = 4, N = 128K (issue 20's TOVA case),
each as the median replay of a CUDA graph, the two variants interleaved.
TRITONKV_SHARED_SELECT=0 turns the shared selection off for calls planned from then on.

    python perf/shared_select_ab.py [--repeats 3]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.settings import switches  # noqa: E402
from perf.timing import DEVICE, graph_seconds  # noqa: E402
from tritonkv import policies  # noqa: E402
from tritonkv.runtime import Evictor  # noqa: E402

CASES = [  # (name, rows, heads, slots, budget, gather)
    ("static every step 16K", 8, 8, 1639, 1638, False),
    ("static every step 128K", 8, 8, 13108, 13107, False),
    ("evict B=4 128K 10%", 4, 8, 131072, 13107, True),
    ("evict B=4 128K 50%", 4, 8, 131072, 65536, True),
]


def time_us(shared: bool, keys, values, queries, budget, gather) -> float:
    with switches({"TRITONKV_SHARED_SELECT": "1" if shared else "0"}):
        ev = Evictor(policies.tova(), budget, gather=gather)     # a fresh plan under this setting
        ev(keys, values, queries=queries)
        return graph_seconds(lambda: ev(keys, values, queries=queries), replays=50) * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--toy", action="store_true", help="toy sizes (CPU: checks the script)")
    args = parser.parse_args()
    cases = [(n, r, h, 64 + s % 7, 64 + s % 7 - 8, g) for n, r, h, s, _, g in CASES[:2]] if args.toy else CASES
    print(f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}  tova  D=128 bf16, graph replay us")
    print(f"{'case':<26}{'per head':>10}{'shared':>10}{'ratio':>8}")
    for name, rows, heads, n, budget, gather in cases:
        g = torch.Generator(device=DEVICE).manual_seed(0)
        keys = torch.randn(rows, heads, n, 128, device=DEVICE, dtype=torch.bfloat16, generator=g)
        values = torch.randn_like(keys)
        queries = torch.randn(rows, heads * 4, 1, 128, device=DEVICE, dtype=torch.bfloat16, generator=g)
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for shared in (False, True):
                times[shared].append(time_us(shared, keys, values, queries, budget, gather))
        a, b = (sorted(times[s])[len(times[s]) // 2] for s in (False, True))
        print(f"{name:<26}{a:>10.1f}{b:>10.1f}{a / b:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
