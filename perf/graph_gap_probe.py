"""Why the perf suite's graph replay (gpu_ms) reads 1.06-1.15x above one eager call (time_ms) for the
bandwidth-bound cases with large outputs, while perf/setting_ab.py's graph replay of the same case reads
below its wall (H100, b26ea67: KeyDiff 128K B = 4 10% 1.101 ms in the suite against 0.972 ms in the sweep).

In one process, per case, the steps of a perf-suite case in its order, with the GPU's clocks, power and
temperature (nvidia-smi) beside each measure:
  graph (tkv.evict) -> wall and queued (perf/timing.py) -> graph (held Evictor) -> peak_extra_bytes ->
  eager and peer baselines as the suite runs them -> graph (tkv.evict) again -> wall and queued again -> graph after a 5 s rest.
If the graph time rises after the baselines and falls after the rest, the suite times tritonkv on a GPU
the baselines have heated (clocks or power capped); if it is high from the start, the capture is.

    PYTHONPATH=. python perf/graph_gap_probe.py [--cases keydiff:131072:4:0.1,...]
"""

import argparse
import statistics
import subprocess
import time

import torch

import tritonkv as tkv
from perf.baselines import eager_evict, peer_evict
from perf.test_evict import POLICIES, make_cache, make_named
from perf.timing import event_seconds, graph_times, peak_extra_bytes, queued_seconds
from tritonkv.budget import resolve_budget

CASES = "keydiff:131072:4:0.1,streaming_llm:524288:4:0.5,tova:524288:4:0.1"


def gpu_state() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,"
                              "clocks_throttle_reasons.active", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = "no nvidia-smi"
    return out.replace("\n", " | ")


def probe(name, n, batch, budget):
    policy = POLICIES[name]
    keys, values, queries = make_cache(batch, n)
    queries = queries if policy.needs_queries else None
    signals, directions = make_named(policy, batch, n)
    k = resolve_budget(budget, n)

    def run():
        return tkv.evict(keys, values, policy, budget, queries=queries, seed=0, signals=signals or None,
                         directions=directions or None)

    evictor = tkv.Evictor(policy, budget)
    held = lambda: evictor(keys, values, queries=queries, signals=signals or None,  # noqa: E731
                           directions=directions or None)
    for fn in (run, run, held, held, held):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()

    def graph(label, fn=run):
        times = graph_times(fn, replays=10)
        print(f"  {label:<34} graph  {statistics.median(times) * 1e6:8.1f} us (min {min(times) * 1e6:8.1f})"
              f"  [{gpu_state()}]", flush=True)

    def wall(label):
        for kind, measure in (("wall", event_seconds), ("queued", queued_seconds)):
            times = [measure(run) for _ in range(10)]
            print(f"  {label:<34} {kind:<6} {statistics.median(times) * 1e6:8.1f} us (min {min(times) * 1e6:8.1f})"
                  f"  [{gpu_state()}]", flush=True)

    print(f"{name} N={n} B={batch} {budget:.0%}", flush=True)
    graph("fresh, tkv.evict")
    wall("fresh")
    graph("fresh, held Evictor", held)
    out = run()
    peak_extra_bytes(run, sum(t.numel() * t.element_size() for t in (out.keys, out.values, out.indices)))
    del out
    graph("after peak_extra_bytes")
    for _ in range(3):
        eager_evict(keys, values, queries, policy, k, signals=signals, directions=directions)
    peer = peer_evict(name)
    if peer is not None:
        named = {**signals, **directions}
        for _ in range(6):
            peer(keys, values, queries, k, named or None)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    graph("after the baselines")
    wall("after the baselines")
    graph("after the baselines, held Evictor", held)
    time.sleep(5 if torch.cuda.is_available() else 0)
    graph("after a 5 s rest")
    wall("after a 5 s rest")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=CASES)
    args = parser.parse_args()
    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", gpu_state(), flush=True)
    for case in args.cases.split(","):
        name, n, batch, budget = case.split(":")
        probe(name, int(n), int(batch), float(budget))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
