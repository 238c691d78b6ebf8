"""tritonkv.evict beside two eager baselines and their torch.compile, on the GPU
(perf/baselines.py): "eager", the same policy in float32 (keeps the same tokens), and "peer",
the most used eviction library's formulation (cache dtype, topk, gather) where it exists.

Run (README): ``perf/run`` — one JSON per run under perf/results/.
Each case's extra_info holds: policy, N, B, budget; four times of tritonkv: time_ms (wall of
one call, host launch included), gpu_ms / gpu_min_ms (CUDA-graph replay, median / min),
host_us / host_min_us (host time per call of back-to-back calls without sync, mean / best
block of 50); queued_ms (one eager call's kernels, its launch hidden behind a GPU sleep:
perf/timing.py); floor_ms,
x_floor, x_floor_gpu, x_floor_queued; eager_ms, compile_ms, peer_ms, peer_compile_ms and
speedup_vs_{eager,compile,peer,peer_compile} (baseline wall / tritonkv wall);
kept_mismatch_vs_{eager,peer}; {compile,peer_compile}_skipped (why, where it did not run) and
{compile,peer_compile}_first_call_s (compilation included); extra_memory_bytes, and more.
"""

import json
import os
import statistics
import time

import pytest
import torch

import tritonkv as tkv
from tritonkv import policies
from tritonkv.budget import resolve_budget

from .baselines import CompileBudgetExceeded, compile_within, compiled_evict, eager_evict, peer_evict
from .floor import floor_bytes
from .timing import (DEVICE, flush_l2, graph_times, host_times, median_seconds, peak_extra_bytes, queued_seconds,
                     settle, sync)

HEADS, GROUP, WINDOW, DIM = 8, 4, 64, 128
DTYPE = torch.bfloat16


def _policies():
    named = {name: make() for name, make in policies.PRESETS.items() if name not in ("adakv", "pyramidkv", "nacl")}
    named["nacl"] = policies.nacl(proxy_window=WINDOW)   # the benchmark's proxy window is 64 for every policy
    named.update(policies.COMPOSITES)
    # H2O with its attention sum supplied by the attention kernel: a signal, no K read
    named["h2o_signal"] = tkv.top(tkv.position(), share=0.5) | tkv.top(tkv.signal("acc"))
    return named


POLICIES = _policies()
# cheap policies first, those whose baselines draw random numbers or attend last
ORDER = ["knorm", "streaming_llm", "qfilters", "h2o_signal", "keydiff", "tova", "keydiff+knorm", "snapkv",
         "chunkkv", "h2o", "random", "nacl", "snapkv+sample"]
_env = os.environ.get
N_VALUES = [int(x) for x in _env("TKV_BENCH_N", "8192,32768,131072,524288").split(",")]
BATCHES = [int(x) for x in _env("TKV_BENCH_B", "1,4").split(",")]
BUDGETS = [float(x) for x in _env("TKV_BENCH_BUDGETS", "0.1,0.5").split(",")]
NAMES = _env("TKV_BENCH_POLICIES", ",".join(ORDER)).split(",")
BASELINES = _env("TKV_BENCH_BASELINES", "1") == "1"
# TKV_BENCH_TOY=1 (CPU, tests/test_perf_scripts.py): every step of a case, each timed twice
TOY = _env("TKV_BENCH_TOY") == "1"
ROUNDS, HOST_CALLS, HOST_BLOCK = (2, 4, 2) if TOY else (10, 200, 50)


def make_cache(batch, n, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    keys = torch.randn(batch, HEADS, n, DIM, device=DEVICE, dtype=DTYPE, generator=g)
    values = torch.randn(batch, HEADS, n, DIM, device=DEVICE, dtype=DTYPE, generator=g)
    queries = torch.randn(batch, HEADS * GROUP, WINDOW, DIM, device=DEVICE, dtype=DTYPE, generator=g)
    return keys, values, queries


def make_named(policy, batch, n, seed=0):
    """(signals, directions) a policy reads: float32 signals [B, H_kv, N], directions [H_kv, D]."""
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    signals = {name: torch.rand(batch, HEADS, n, device=DEVICE, generator=g) for name in policy.signals}
    directions = {name: torch.randn(HEADS, DIM, device=DEVICE, generator=g) / DIM ** 0.5
                  for name in policy.directions}
    return signals, directions


def kept_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of kept positions that differ between two index tensors [B, H, n]."""
    n = int(max(a.max(), b.max())) + 1
    mask = lambda idx: torch.zeros(*idx.shape[:2], n, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)  # noqa: E731
    return float((mask(a) ^ mask(b)).sum()) / (2 * a.numel())


COMPILE_N = [int(x) for x in _env("TKV_COMPILE_N", "32768,131072").split(",")]
COMPILE_B = [int(x) for x in _env("TKV_COMPILE_B", "1").split(",")]
# wall seconds a torch.compile baseline may take on its first call of a case (compilation
# included); one that runs past it is abandoned, and the policy's later cases skip it
COMPILE_BUDGET_S = float(_env("TKV_COMPILE_BUDGET_S", "120"))
COMPILED = _env("TKV_BENCH_COMPILE", "compile,peer_compile").split(",")   # which torch.compile baselines run
# (baseline, policy) -> why it is skipped; TKV_COMPILE_SKIP names "baseline:policy" pairs to skip
# from the start (e.g. compile:random, whose float32 Philox did not compile in 500 s on the H100)
_compile_skipped = {tuple(pair.split(":", 1)): "skipped by TKV_COMPILE_SKIP"
                    for pair in _env("TKV_COMPILE_SKIP", "").split(",") if ":" in pair}


def _baseline(fn, rounds):
    """(output, median seconds), or (None, None) where the baseline cannot run (out of
    memory; a torch.compile failure), which is recorded, never fatal to the case."""
    try:
        out = fn()
        return out, median_seconds(fn, rounds)
    except Exception as e:  # noqa: BLE001
        print(f"\nbaseline failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.empty_cache()
        return None, None


def _compiled_baseline(label, name, fn, rounds, info):
    """Median seconds of a torch.compile baseline, its first call (compilation included)
    bounded by COMPILE_BUDGET_S; None, with ``info[label + "_skipped"]`` saying why, where it
    did not run."""
    if (label, name) in _compile_skipped:
        info[f"{label}_skipped"] = _compile_skipped[label, name]
        return None
    try:
        with compile_within(COMPILE_BUDGET_S) as elapsed:
            out = fn()
            sync()
            info[f"{label}_first_call_s"] = elapsed()
    except CompileBudgetExceeded as e:
        _compile_skipped[label, name] = info[f"{label}_skipped"] = str(e)
        print(f"\n{label} of {name} skipped: {e}", flush=True)
        torch._dynamo.reset()    # drop the half-built compilation
        return None
    except Exception as e:  # noqa: BLE001
        info[f"{label}_skipped"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        print(f"\n{label} of {name} failed: {info[f'{label}_skipped']}", flush=True)
        torch.cuda.empty_cache()
        return None
    del out
    return _baseline(fn, rounds)[1]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize("name", NAMES)
def test_evict(benchmark, bandwidth, name, n, batch, budget):
    policy = POLICIES[name]
    # each case on memory fresh from the driver, after the driver's work on what the earlier cases
    # freed (perf/timing.settle: kernels ran 1.13-1.16x slower for ~50 ms after a large free)
    settle()
    keys, values, queries = make_cache(batch, n)
    queries = queries if policy.needs_queries else None
    k = resolve_budget(budget, n)
    signals, directions = make_named(policy, batch, n)
    named = {**signals, **directions}

    def run():
        return tkv.evict(keys, values, policy, budget, queries=queries, seed=0, signals=signals or None,
                         directions=directions or None)

    out = run()   # compiles on first use
    n_kept = out.indices.shape[-1]
    rounds = ROUNDS
    info = dict(policy=name, N=n, B=batch, H_kv=HEADS, H_q=HEADS * GROUP, D=DIM, window=WINDOW, budget=budget,
                dtype="bfloat16", n_kept=n_kept)

    if BASELINES:
        eager_out, eager_s = _baseline(lambda: eager_evict(keys, values, queries, policy, k, signals=signals,
                                                           directions=directions), 2)
        compile_s = peer_compile_s = None
        # compilation costs minutes: a subset of cases
        compile_case = n in COMPILE_N and batch in COMPILE_B
        if compile_case and "compile" in COMPILED:
            compiled = compiled_evict(policy)
            compile_s = _compiled_baseline("compile", name, lambda: compiled(keys, values, queries, k=k, seed=0,
                                                                             signals=signals, directions=directions),
                                           2, info)
        if eager_out is not None:
            mismatch = kept_mismatch(out.indices, eager_out[2])
            info["kept_mismatch_vs_eager"] = mismatch
            assert mismatch <= 1e-3, f"tritonkv and eager keep different tokens ({mismatch:.2%})"
        del eager_out
        peer = peer_evict(name)
        peer_s = None
        if peer is not None:
            peer_out, peer_s = _baseline(lambda: peer(keys, values, queries, k, named or None), ROUNDS // 2)
            if peer_out is not None:
                # recorded, not asserted: the peer's semantics differ for some presets
                info["kept_mismatch_vs_peer"] = kept_mismatch(out.indices, peer_out[2])
            del peer_out
            if compile_case and "peer_compile" in COMPILED:
                compiled_peer = peer_evict(name, compiled=True)
                peer_compile_s = _compiled_baseline("peer_compile", name,
                                                    lambda: compiled_peer(keys, values, queries, k, named or None),
                                                    5, info)
        ms = lambda s: s and s * 1e3  # noqa: E731
        info.update(eager_ms=ms(eager_s), compile_ms=ms(compile_s), peer_ms=ms(peer_s),
                    peer_compile_ms=ms(peer_compile_s))

    output_bytes = sum(t.numel() * t.element_size() for t in (out.keys, out.values, out.indices))
    del out
    info["extra_memory_bytes"] = peak_extra_bytes(run, output_bytes)
    extra = info["extra_memory_bytes"]
    info["extra_bytes_per_token_head"] = None if extra is None else extra / (batch * HEADS * n)

    # four times: time_ms, one call until its GPU work is done, launch overhead included (what
    # a caller waits); gpu_ms, the same kernels replayed from a CUDA graph, without launch gaps
    # (what the kernels cost); host_us, CPU time per call of back-to-back calls (what the host
    # costs). Minima beside them let the dashboard tell noise from change. queued_ms: the kernels
    # of an eager call (before the suite settled, some graph replays read 1.10-1.16x it: the driver's
    # work after a large free, perf/placement_probe.py)
    settle()   # the baselines' memory freed, its background work done before tritonkv is timed
    replays = graph_times(run, replays=ROUNDS)
    gpu_seconds = statistics.median(replays)
    queued = statistics.median(queued_seconds(run) for _ in range(ROUNDS))
    hosts = host_times(run, calls=HOST_CALLS, block=HOST_BLOCK)
    benchmark.pedantic(run, setup=flush_l2, rounds=rounds, warmup_rounds=min(2, rounds))
    seconds = benchmark.stats.stats.median
    floor = floor_bytes(policy, keys, values, queries, n_kept, tuple(named.values()))
    floor_s = floor / bandwidth
    info.update(time_ms=seconds * 1e3, gpu_ms=gpu_seconds * 1e3, gpu_min_ms=min(replays) * 1e3, queued_ms=queued * 1e3,
                host_us=statistics.mean(hosts) * 1e6, host_min_us=min(hosts) * 1e6, floor_bytes=floor,
                bandwidth_GBps=bandwidth / 1e9, floor_ms=floor_s * 1e3, x_floor=seconds / floor_s,
                x_floor_gpu=gpu_seconds / floor_s, x_floor_queued=queued / floor_s)
    if BASELINES:
        for baseline in ("eager", "compile", "peer", "peer_compile"):
            base_ms = info[f"{baseline}_ms"]
            info[f"speedup_vs_{baseline}"] = base_ms / info["time_ms"] if base_ms else None
    benchmark.extra_info.update(info)
    record_case(info, benchmark)


def record_case(info, benchmark):
    """Append the case to cases.jsonl beside the run's JSON as soon as it is measured, so a
    run cut short still keeps what it measured; print a one-line summary."""
    stats = benchmark.stats.stats
    row = dict(info, name=benchmark.name, median_s=stats.median, min_s=stats.min, max_s=stats.max,
               rounds=stats.rounds, unix_time=time.time())
    directory = os.environ.get("TKV_RESULTS", "perf/results")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, os.environ.get("TKV_CASES_FILE", "cases.jsonl")), "a") as f:
        f.write(json.dumps(row) + "\n")
    fmt = lambda x, digits=2: "-" if x is None else f"{x:.{digits}f}"  # noqa: E731
    print(f"\n{info['policy']:<14} N={info['N']:<7} B={info['B']} budget={info['budget']:<4} "
          f"{info['time_ms']:.3f} ms (gpu {info['gpu_ms']:.3f}) = {info['x_floor']:.2f}x floor "
          f"(gpu {info['x_floor_gpu']:.2f}x, queued {info['x_floor_queued']:.2f}x), host {info['host_us']:.1f} us; "
          f"vs eager {fmt(info.get('speedup_vs_eager'))}x, compile {fmt(info.get('speedup_vs_compile'))}x, "
          f"peer {fmt(info.get('speedup_vs_peer'))}x, peer compile {fmt(info.get('speedup_vs_peer_compile'))}x, "
          f"peer mismatch {fmt(info.get('kept_mismatch_vs_peer'), 4)}", flush=True)
