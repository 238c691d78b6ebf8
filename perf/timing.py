"""Timing helpers: every measurement is the wall time of one call until its GPU work is
done, with the L2 cache flushed before it (so a 16 MB cache does not sit in the 50 MB L2)."""

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
    return statistics.median(times)
