"""Timing helpers, three views of one call:
- wall: one call until its GPU work is done, host launch included, with the L2 cache flushed
  before it (so a 16 MB cache does not sit in the 50 MB L2): what a caller waits;
- graph replay: the same GPU work replayed from a CUDA graph, without launch gaps: the kernels;
- queued: one eager call whose launch the GPU does not wait for (it sleeps while the host enqueues
  the call): the kernels back to back, writing where the caching allocator puts the outputs (after
  the perf suite's baselines a graph replay read 1.10-1.13x the same call's eager kernels on an
  H100, perf/graph_gap_probe.py; the cause was the driver's work after a large free, which slows
  every kernel that reads K for ~50 ms, perf/placement_probe.py: ``settle`` waits it out);
- host: CPU time per call of back-to-back calls that do not synchronize: the Python and
  launch cost, what bounds a loop of per-layer evictions once the GPU keeps up.

On a machine without CUDA (CI runs every perf script at toy sizes there, to catch a script
that would crash on the GPU) the same functions run on the CPU: synchronizing is a no-op,
there is no L2 to flush, a "graph replay" times the calls themselves, and peak memory is
unknown (None). Those numbers check the scripts; they measure nothing worth keeping."""

from __future__ import annotations

import statistics
import time

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


_FLUSH = {}


def flush_l2(device=DEVICE) -> None:
    if device == "cpu":
        return
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    _FLUSH[device].zero_()


SETTLE_S = 0.2


def settle(seconds: float = SETTLE_S) -> None:
    """Return the allocator's cached blocks to the driver, then leave the GPU idle for ``seconds``.
    After a large free the driver works in the background for tens of milliseconds: on an H100, a
    KeyDiff call at 128K, B = 4 ran 1.13x slower (its K-reading kernels 1.13-1.16x) for every call
    in the first ~50 ms after 30 GiB were freed, and at its usual time after 0.1 s more of an idle
    GPU (perf/placement_probe.py --churn). The perf suite settles before each case's timings."""
    if not CUDA:
        return
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    time.sleep(seconds)


def cuda_clock() -> float:
    """A pytest-benchmark timer: perf_counter after the GPU has finished what was queued."""
    sync()
    return time.perf_counter()


def median_seconds(fn, rounds: int, warmup: int = 1) -> float:
    """Median of ``rounds`` counter_seconds of fn (L2 flushed before each), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(counter_seconds(fn) for _ in range(rounds))


def peak_extra_bytes(fn, output_bytes):
    """Peak memory fn allocates beyond what exists before it and what it returns (bytes;
    None on the CPU, where PyTorch keeps no such statistics)."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - base - output_bytes)


def counter_seconds(fn, flush: bool = True) -> float:
    """Seconds of one call as the host sees it: perf_counter around synchronize / the call /
    synchronize (the L2 flushed first unless ``flush`` is False)."""
    if flush:
        flush_l2()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def queued_seconds(fn, lead_s: float = 1e-3) -> float:
    """Seconds of fn's GPU work from an idle device (L2 flushed), its host launch hidden: the GPU
    sleeps ``lead_s`` (at up to 2 GHz) while the host enqueues fn, then CUDA events time fn's
    kernels (event_seconds). Where the host took longer than the sleep the lead doubles and it
    is timed again. On the CPU: event_seconds."""
    if not CUDA:
        return event_seconds(fn)
    while True:
        host = []

        def timed():
            start = time.perf_counter()
            fn()
            host.append(time.perf_counter() - start)

        seconds = event_seconds(timed, lead_s=lead_s)
        if host[0] < 0.5 * lead_s:   # the sleep (>= lead_s at clocks up to 2 GHz) outlasted the launch
            return seconds
        lead_s *= 2


def graph_seconds(fn, replays: int = 10) -> float:
    """Device time of fn without launch gaps: fn captured once in a CUDA graph, the median
    replay timed with events (L2 flushed before each replay)."""
    return statistics.median(graph_times(fn, replays))


def graph_times(fn, replays: int = 10) -> list:
    """Seconds of each of ``replays`` replays of fn captured in a CUDA graph (see graph_seconds)."""
    if not CUDA:
        return [event_seconds(fn) for _ in range(replays)]
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()   # warm the allocator on the side stream
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    times = [event_seconds(graph.replay) for _ in range(replays)]
    del graph
    return times


def host_times(fn, calls: int = 200, block: int = 50) -> list:
    """Host (CPU) seconds per call of back-to-back calls without synchronizing: the mean of
    each block of ``block`` calls, ``calls`` in all. Between blocks the GPU catches up, so the
    launch queue never fills (a full queue would make the host wait for the GPU and time the
    kernels instead); within a block nothing waits for the GPU unless fn itself syncs.
    On the H100 machines the CPU runs the same calls 1.5-2.6x slower in spells of seconds (the
    thread's CPU time moves with the wall clock, no steal: perf/host_noise_probe.py); blocks 40 ms
    apart did not help (perf/results/ab/host-spaced-6947b62-H100/). Compare host times of one
    process, interleaved, as ratios."""
    for _ in range(3):
        fn()
    sync()
    means = []
    for done in range(0, calls, block):
        m = min(block, calls - done)
        start = time.perf_counter()
        for _ in range(m):
            fn()
        means.append((time.perf_counter() - start) / m)
        sync()
    return means


def event_seconds(fn, flush: bool = True, lead_s: float = 0.0) -> float:
    """Seconds of one call from an idle device (L2 flushed unless ``flush`` is False) to the end
    of its work: CUDA events around the call on a GPU (after a GPU sleep of ``lead_s`` at up to
    2 GHz, where given: queued_seconds), counter_seconds on the CPU."""
    if not CUDA:
        return counter_seconds(fn, flush)
    if flush:
        flush_l2()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if lead_s:
        torch.cuda._sleep(int(lead_s * 2e9))
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3
