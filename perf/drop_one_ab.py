"""A / B of select's one-pass drop (kernels/select.py ``drop_one``) against its radix select, for
the eviction an every-step cache runs: budget + 1 slots back to the budget, one token dropped per
row, indices only (as StaticEvictingCache). The rows are the stacked layers' KV heads of the
generation benchmark's models at a 10% budget of 16K and 128K prompts; the scores are signals,
as a decode-scored TOVA (a step's attention) and an accumulated H2O (positions for its recency
half, the accumulators for the rest) rank them. Median CUDA-graph replay, the two variants
interleaved; ``TRITONKV_DROP_ONE=0`` is the radix select.

    python perf/drop_one_ab.py [--repeats 3] [--json OUT.json]
    python perf/drop_one_ab.py --toy          # CPU, tiny sizes: checks the script
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tritonkv as tkv  # noqa: E402
from perf.settings import switches  # noqa: E402
from perf.timing import DEVICE, graph_seconds  # noqa: E402
from tritonkv.runtime import Evictor  # noqa: E402

POLICIES = {   # the forms StaticEvictingCache ranks in its every-step evictions
    "tova (step's attention)": tkv.recent(1) | tkv.top(tkv.signal("attention")),
    "h2o (accumulated)": tkv.top(tkv.signal("position"), share=0.5) | tkv.top(tkv.signal("attention")),
}
MODELS = {"tiny": (4, 4), "wide": (8, 8)}   # (layers, KV heads): rows of the stacked cache
PROMPTS = (16384, 131072)


def time_us(drop_one: bool, policy, slots: int, signals: dict, toy: bool) -> float:
    rows, heads = signals["attention"].shape[:2]
    cache = torch.empty(rows, heads, slots, 1, device=DEVICE, dtype=torch.bfloat16)
    signals = {name: t for name, t in signals.items() if name in policy.signals}
    with switches({"TRITONKV_DROP_ONE": "1" if drop_one else "0"}):   # read when the call plans
        ev = Evictor(policy, slots - 1, gather=False, backend="triton")
        call = lambda: ev(cache, cache, signals=signals)   # noqa: E731
        call()
        return 1.0 if toy else graph_seconds(call, replays=50) * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CPU: checks the script)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"{gpu}  one token dropped per row, indices only; graph replay us")
    print(f"{'policy':<26}{'model':>6}{'slots':>8}{'radix':>10}{'drop one':>10}{'ratio':>8}")
    rows = []
    for name, policy in POLICIES.items():
        for model, (layers, heads) in (list(MODELS.items())[:1] if args.toy else MODELS.items()):
            for prompt in ((300,) if args.toy else PROMPTS):
                slots = prompt // 10 + 1
                g = torch.Generator(device=DEVICE).manual_seed(0)
                signals = {"attention": torch.rand(layers, heads, slots, device=DEVICE, generator=g),
                           "position": torch.randperm(slots, device=DEVICE, generator=g)
                           .expand(layers, heads, slots).contiguous()}
                got = {True: [], False: []}
                for _ in range(1 if args.toy else args.repeats):
                    for drop in (False, True):
                        got[drop].append(time_us(drop, policy, slots, signals, args.toy))
                radix, drop = (statistics.median(got[d]) for d in (False, True))
                rows.append(dict(policy=name, model=model, slots=slots, radix_us=radix, drop_one_us=drop, gpu=gpu))
                print(f"{name:<26}{model:>6}{slots:>8}{radix:>10.1f}{drop:>10.1f}{radix / drop:>7.2f}x",
                      flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(rows=rows), indent=1))


if __name__ == "__main__":
    main()
