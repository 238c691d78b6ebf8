"""Timing helpers, three views of one call:
- wall: one call until its GPU work is done, host launch included, with the L2 cache flushed
  before it (so a 16 MB cache does not sit in the 50 MB L2): what a caller waits;
- graph replay: the same GPU work replayed from a CUDA graph, without launch gaps: the kernels;
- host: CPU time per call of back-to-back calls that do not synchronize: the Python and
  launch cost, what bounds a loop of per-layer evictions once the GPU keeps up."""

from __future__ import annotations

import statistics
import time

import torch

_FLUSH = {}


def flush_l2(device="cuda") -> None:
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    _FLUSH[device].zero_()


def cuda_clock() -> float:
    """A pytest-benchmark timer: perf_counter after the GPU has finished what was queued."""
    torch.cuda.synchronize()
    return time.perf_counter()


def median_seconds(fn, rounds: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        flush_l2()
        start = cuda_clock()
        fn()
        times.append(cuda_clock() - start)
    return statistics.median(times)


def peak_extra_bytes(fn, output_bytes) -> int:
    """Peak memory fn allocates beyond what exists before it and what it returns."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return max(0, peak - base - output_bytes)


def graph_seconds(fn, replays: int = 10) -> float:
    """Device time of fn without launch gaps: fn captured once in a CUDA graph, the median
    replay timed with events (L2 flushed before each replay)."""
    return statistics.median(graph_times(fn, replays))


def graph_times(fn, replays: int = 10) -> list:
    """Seconds of each of ``replays`` replays of fn captured in a CUDA graph (see graph_seconds)."""
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
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        flush_l2()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return times


def host_times(fn, calls: int = 200, block: int = 50) -> list:
    """Host (CPU) seconds per call of back-to-back calls without synchronizing: the mean of
    each block of ``block`` calls, ``calls`` in all. Between blocks the GPU catches up, so the
    launch queue never fills (a full queue would make the host wait for the GPU and time the
    kernels instead); within a block nothing waits for the GPU unless fn itself syncs."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    means = []
    for done in range(0, calls, block):
        m = min(block, calls - done)
        start = time.perf_counter()
        for _ in range(m):
            fn()
        means.append((time.perf_counter() - start) / m)
        torch.cuda.synchronize()
    return means
