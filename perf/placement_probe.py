"""Does where the outputs land change a call's kernel time? A probe, not the library.

In the perf suite's run at c556b12 (H100), KeyDiff at 512K, B = 4, 10% had a queued time (one eager
call's kernels, its launch hidden) of 4.30 ms, the same as its graph replay, while its wall time (host
launch included) was 3.80 ms and the run before had queued 3.77: the same kernels on the same inputs
took 1.13x longer on some calls. Three measurements:

  - calls: ``--calls`` held-Evictor calls whose results are all kept (so each lands on fresh
    memory), each timed as queued (perf/timing.queued_seconds), with the outputs' and the scratch's
    addresses (the allocator's trace): whether slow calls share an address pattern;
  - copies: one copy of the kept rows' size from K into a pool at byte offsets 0 .. 2 MiB + x:
    whether the destination's offset alone moves a copy's bandwidth;
  - ``--churn GIB``: calls before and after allocating GIB GiB, after freeing it (empty_cache), after
    0.1 s and 1 s of an idle GPU, each phase's kernels under the profiler.

Found on an H100 (perf/results/ab/placement-c50b8fa-H100/): not the addresses (24 calls each, scratch and
outputs at many addresses, all within 1%; copies at every offset within 3%), but a large free: for ~50 ms
after 30 GiB went back to the driver, KeyDiff at 128K, B = 4, 10% took 1.097 ms against 0.970 (its anchor
pass 416 against 358 us, which reads only K), TOVA 0.697 against 0.623; after 0.1 s of an idle GPU, back to
0.971. The perf suite now settles (perf/timing.settle) before its timings.

    PYTHONPATH=. python perf/placement_probe.py [--policies keydiff,streaming_llm] [--n 524288] [--batch 4]
    PYTHONPATH=. python perf/placement_probe.py --churn 20 --n 131072   # calls around a 20 GiB allocation
    PYTHONPATH=. python perf/placement_probe.py --toy     # CPU: checks the script
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from perf.host_overhead import held_call
from perf.test_evict import POLICIES, make_cache
from perf.timing import CUDA, DEVICE, event_seconds, queued_seconds

MIB = 1 << 20


def calls(policy, keys, values, queries, budget, count):
    ev, call = held_call(POLICIES[policy], budget, keys, values, queries)
    call()
    call()
    kept, rows = [], []
    plan = next(iter(ev._plans.values()))
    scratch_bytes = 4 * getattr(plan, "scratch_numel", 0)
    if CUDA:   # the allocator's trace gives each call's scratch address
        torch.cuda.memory._record_memory_history(max_entries=100000)
    for _ in range(count):
        out = []
        seconds = queued_seconds(lambda: out.append(call()))
        kept.append(out[0])
        k, v, i = (t.data_ptr() for t in (out[0].keys, out[0].values, out[0].indices))
        rows.append((seconds * 1e3, k, v, i))
    scratches = []
    if CUDA:
        trace = torch.cuda.memory._snapshot()["device_traces"][keys.device.index or 0]
        scratches = [e["addr"] for e in trace if e["action"] == "alloc" and e["size"] >= scratch_bytes > 0
                     and e["size"] - scratch_bytes < 2 * MIB]
        torch.cuda.memory._record_memory_history(enabled=None)
    scratches = scratches[:count] if len(scratches) >= count else [0] * count
    rows = [row + (scratch,) for row, scratch in zip(rows, scratches)]
    fastest = min(r[0] for r in rows)
    print(f"{policy} N={keys.shape[2]} B={keys.shape[0]} {budget}: {count} calls, queued ms "
          f"min {fastest:.3f} median {statistics.median(r[0] for r in rows):.3f} max {max(r[0] for r in rows):.3f}")
    print(f"  scratch {scratch_bytes / MIB:.1f} MiB; inputs: keys {keys.data_ptr():#x}, values {values.data_ptr():#x}")
    for ms, k, v, i, sc in rows:
        print(f"  {ms:7.3f} ({ms / fastest:.3f}x)  keys out {k:#x}  values out {v:#x}  indices {i:#x}  "
              f"scratch {sc:#x} (mod 2M {sc % (2 * MIB):#x})")
    return rows


def churn(policy, keys, values, queries, budget, gib, count):
    """Whether fresh memory slows the kernels that run after it is taken: queued times of ``count``
    calls (results dropped) before and after a ``gib`` GiB allocation, then after it is freed and
    returned to the driver, each with its seconds since that event."""
    _, call = held_call(POLICIES[policy], budget, keys, values, queries)
    call()

    def timed(label, since):
        times = []
        for _ in range(count):
            times.append((time.perf_counter() - since, queued_seconds(call) * 1e3))
        print(f"  {label}: " + " ".join(f"{t:.2f}s:{ms:.3f}" for t, ms in times))
        if CUDA:   # one more call under the profiler: its kernels' times
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
            print("    kernels (us): " + ", ".join(f"{e.key[:28]} {e.device_time_total:.1f}"
                                                  for e in prof.key_averages() if e.device_time_total > 0))

    print(f"{policy} N={keys.shape[2]} B={keys.shape[0]} {budget}: queued ms around a {gib} GiB allocation "
          "(seconds since the event : ms)")
    timed("before", time.perf_counter())
    start = time.perf_counter()
    block = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device=keys.device)
    timed("after allocating", start)
    del block
    if CUDA:
        torch.cuda.empty_cache()
    timed("after freeing + empty_cache", time.perf_counter())
    _, call = held_call(POLICIES[policy], budget, keys, values, queries)   # a new plan (and CUDA graph) made now
    call()
    call()
    timed("a new Evictor after that", time.perf_counter())
    for pause in (0.1, 1.0):
        time.sleep(pause)
        timed(f"after {pause} s more of an idle GPU", time.perf_counter())
    busy = torch.empty(256 << 20, dtype=torch.uint8, device=keys.device)
    for _ in range(200):   # ~ 50 ms of memory traffic
        busy.zero_()
    timed("after 200 zeroings of 256 MB", time.perf_counter())


def copies(keys, nbytes, offsets, repeats):
    src = keys.view(torch.uint8).reshape(-1)[:nbytes]
    pool = torch.empty(nbytes + max(offsets) + 4096, dtype=torch.uint8, device=keys.device)
    print(f"copy of {nbytes / 1e6:.0f} MB from K into a pool at offsets (median of {repeats}, ms):")
    for off in offsets:
        dst = pool[off:off + nbytes]
        times = [event_seconds(lambda: dst.copy_(src)) for _ in range(repeats)]
        ms = statistics.median(times) * 1e3
        print(f"  offset {off:>9} ({off % (2 * MIB):#9x} mod 2M): {ms:.3f} ms, {2 * nbytes / ms / 1e9:.2f} TB/s")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", default="keydiff,streaming_llm")
    parser.add_argument("--n", type=int, nargs="+", default=[524288])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--calls", type=int, default=16)
    parser.add_argument("--churn", type=float, default=0, help="GiB: time calls around allocating and freeing this much")
    parser.add_argument("--toy", action="store_true")
    args = parser.parse_args()
    if args.toy:
        args.n, args.batch, args.calls = [256], 1, 2
    print(torch.cuda.get_device_name() if CUDA else "cpu")
    for n in args.n:
        keys, values, queries = make_cache(args.batch, n)
        if args.churn:
            for policy in args.policies.split(","):
                churn(policy, keys, values, queries, args.budget, args.churn, args.calls)
            continue
        for policy in args.policies.split(","):
            calls(policy, keys, values, queries, args.budget, args.calls)
        kept_bytes = int(keys.numel() * keys.element_size() * args.budget)
        offsets = [0, 256, 4096, 65536, 512 * 1024, MIB, 2 * MIB - 4096, 2 * MIB + 256] if CUDA else [0, 256]
        copies(keys, kept_bytes, offsets, 5 if CUDA else 1)
        del keys, values, queries
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
