"""Why the host time per call of one case moves up to 2.5x between two perf runs of the same code
(H100 runs at b26ea67 and 822a50a: per-case ratios 0.40-1.74, the best block of 50 calls moving with the
mean, so a slow case is slow for its whole measurement).

Per preset (B = 1, 128K, 10%), ``--rounds`` times a few seconds apart: the host time per call of 50
back-to-back calls measured by the wall clock (perf_counter, what perf/timing.py's host_times uses) and
by this thread's CPU time (thread_time: time the vCPU ran this thread), with the machine's steal time
(/proc/stat: time the hypervisor ran something else on our vCPUs) over the block. If the wall clock moves
and the thread's CPU time does not, the host was descheduled (steal, or other processes); if both move,
the CPU itself ran slower (frequency, a busy neighbour on shared caches).

    PYTHONPATH=. python perf/host_noise_probe.py [--rounds 8] [--toy]
"""

import argparse
import os
import statistics
import time

from perf.host_overhead import held_call
from perf.test_evict import POLICIES, make_cache
from perf.timing import sync


def steal_ticks() -> int:
    """Steal ticks of all CPUs since boot (0 where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) if len(fields) > 8 else 0
    except OSError:
        return 0


def current_cpu() -> int:
    """The CPU this process last ran on (/proc/self/stat field 39; -1 where missing)."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return -1


def block(fn, calls: int):
    """(wall us per call, thread CPU us per call, steal ticks) of ``calls`` back-to-back calls."""
    sync()
    steal, wall, cpu = steal_ticks(), time.perf_counter(), time.thread_time()
    for _ in range(calls):
        fn()
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    stolen = steal_ticks() - steal
    sync()
    return wall / calls * 1e6, cpu / calls * 1e6, stolen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="streaming_llm,keydiff,snapkv,random")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--toy", action="store_true", help="tiny sizes, two rounds (CPU: checks the script)")
    args = parser.parse_args()
    n, calls, pause = (128, 2, 0.0) if args.toy else (131072, 50, 1.0)
    rounds = 2 if args.toy else args.rounds
    keys, values, queries = make_cache(1, n)
    fns = {}
    for name in args.presets.split(","):
        _, fns[name] = held_call(POLICIES[name], 0.1, keys, values, queries)
        for _ in range(3):
            fns[name]()
    seen = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            seen[name].append(block(fn, calls))
        time.sleep(pause)
    print(f"process on CPU {current_cpu()} of {os.cpu_count()}; load average {os.getloadavg()}", flush=True)
    for name, got in seen.items():
        walls, cpus, steals = zip(*got)
        print(f"{name:<14} wall us/call {' '.join(f'{w:5.1f}' for w in walls)} (max/min {max(walls) / min(walls):.2f})"
              f" | thread CPU {' '.join(f'{c:5.1f}' for c in cpus)} (max/min {max(cpus) / min(cpus):.2f})"
              f" | steal ticks {' '.join(map(str, steals))}"
              f" | wall - CPU median {statistics.median(w - c for w, c in zip(walls, cpus)):.1f}",
              flush=True)


if __name__ == "__main__":
    main()
