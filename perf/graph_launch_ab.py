"""Planned calls as one re-pointed CUDA graph (TRITONKV_GRAPH_LAUNCH=1, the default)
against plain launches from C in two groups (0): wall, graph-replay and host time per call, in one
process (perf/setting_ab.py: a fresh Evictor per value, the values interleaved), over launch counts
1 (StreamingLLM), 2 (KNorm), 4 (KeyDiff, SnapKV, TOVA), 5 (ChunkKV) and 6 (keydiff+knorm), at
32K and 128K, B = 1, 10% and 50%, and at 512K, B = 4 (StreamingLLM, KNorm, TOVA: the H100 run at
3115d49 replayed these cases' CUDA graphs 1.06-1.12x slower than one eager call took, so the wall
time of graph-launched calls is watched where outputs are large); then AdaKV's (7 launches) and
SnapKV's host time per held-Evictor call with each value (perf/host_overhead.py, one process per
value: AdaKV is not in setting_ab's presets). First, whether a graph replay is slower than the same
work launched eagerly for a plain 1 GiB copy (perf/timing.py's two measures). Expected from perf/graph_update_probe.py (H100, 3115d49): ~0.9 us per node update and
~2 us per graph launch through ctypes, against ~3.6 us per launch from C.

    PYTHONPATH=. python perf/graph_launch_ab.py     (perf/gpu_session pending patches runs it)

JSON goes to $OUT (the device tool's folder) where set, else ./out.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf.timing import event_seconds, graph_seconds  # noqa: E402


def copy_probe():
    """us of a 1 GiB device copy into a fresh output: one eager call against a graph replay."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    fn = lambda: source.clone()  # noqa: E731
    eager = sorted(event_seconds(fn) for _ in range(7))[3]
    graph = graph_seconds(fn)
    print(f"1 GiB clone: eager {eager * 1e6:.1f} us, graph replay {graph * 1e6:.1f} us, "
          f"graph / eager {graph / eager:.3f}", flush=True)


def rotating_wall(presets=("streaming_llm", "keydiff", "snapkv", "tova"), ns=(32768, 131072), budget=0.1):
    """Wall (sync, one call, sync) and host (back-to-back enqueue) per call with each value, where
    every call gets the tensors at the addresses of the last one ("same": the outputs freed and
    handed back by the caching allocator) and where calls alternate between two caches ("rotating":
    every pointer changes, so every graph node is re-pointed)."""
    import itertools
    import statistics

    import tritonkv as tkv
    from perf.test_evict import POLICIES, make_cache
    from perf.timing import counter_seconds, host_times
    for name in presets:
        policy = POLICIES[name]
        for n in ns:
            caches = [make_cache(1, n) for _ in range(2)]
            line = f"{name:14s} N={n:6d} {budget:.0%}"
            walls = {}
            for value in ("0", "1"):
                os.environ["TRITONKV_GRAPH_LAUNCH"] = value
                ev = tkv.Evictor(policy, budget)
                args = [(k, v, q if policy.needs_queries else None) for k, v, q in caches]
                for i in range(6):
                    ev(*args[i % 2][:2], queries=args[i % 2][2])
                for mode, order in (("same", (0,)), ("rotating", (0, 1))):
                    turn = itertools.cycle(args[i] for i in order)

                    def call():
                        k, v, q = next(turn)
                        ev(k, v, queries=q)

                    walls[value, mode] = statistics.median(counter_seconds(call, flush=False)
                                                           for _ in range(40)) * 1e6
                    walls[value, mode, "host"] = statistics.mean(host_times(call, calls=100, block=100)) * 1e6
            os.environ.pop("TRITONKV_GRAPH_LAUNCH", None)
            for mode in ("same", "rotating"):
                line += (f" | {mode}: wall {walls['0', mode]:7.1f} / {walls['1', mode]:7.1f} us "
                         f"({walls['1', mode] / walls['0', mode]:.3f}x), host {walls['0', mode, 'host']:5.1f} / "
                         f"{walls['1', mode, 'host']:5.1f}")
            print(line, flush=True)


def main():
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    copy_probe()
    print("plain (0) / graph (1):", flush=True)
    rotating_wall()
    subprocess.run([sys.executable, str(ROOT / "perf/setting_ab.py"), "TRITONKV_GRAPH_LAUNCH", "0", "1",
                    "--presets", "streaming_llm,knorm,keydiff,snapkv,tova,chunkkv,keydiff+knorm", "--b", "1",
                    "--n", "32768,131072", "--budgets", "0.1,0.5", "--json", str(out / "graph-launch-ab.json")],
                   check=True, env=env)
    subprocess.run([sys.executable, str(ROOT / "perf/setting_ab.py"), "TRITONKV_GRAPH_LAUNCH", "0", "1",
                    "--presets", "streaming_llm,knorm,tova", "--b", "4", "--n", "524288", "--budgets", "0.1,0.5",
                    "--json", str(out / "graph-launch-ab-512k.json")], check=True, env=env)
    for value in ("1", "0"):
        print(f"== perf/host_overhead.py, TRITONKV_GRAPH_LAUNCH={value}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "perf/host_overhead.py"), "--policies", "adakv,snapkv",
                        "--n", "32768", "--budgets", "0.1,0.5",
                        "--json", str(out / f"graph-launch-host-{value}.json")],
                       check=True, env=dict(env, TRITONKV_GRAPH_LAUNCH=value))


if __name__ == "__main__":
    main()
