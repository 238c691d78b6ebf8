"""Concurrent first calls (issue 12 item 8): threads and processes that evict with new
policies on a cold kernel cache all succeed, and get exactly the single-threaded result.

Cold means: a fresh TRITONKV_CACHE_DIR (and, on the GPU, TRITON_CACHE_DIR) and nothing
compiled, loaded or planned in this process. Before the fix (in the interpreter) 2-3 of 4
threads failed in every run: FileNotFoundError (a temporary file name shared by the threads
of a process), AttributeError (a half-executed generated module) and "Did you forget to add
@triton.jit ?" / "y >= grid_dim[1]" (the interpreter's global state, concurrent launches).
"""

import itertools
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import tritonkv as tkv
from tritonkv import compiler, runtime

from .devices import CUDA, DEVICE

THREADS = 4
BUDGET = 16


def make_inputs(device=DEVICE, b=1, h=2, n=64, d=64):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(b, h, n, d, generator=g)
    values = torch.randn(b, h, n, d, generator=g)
    return keys.to(device), values.to(device)


def anchor_policy():
    return tkv.sink(4) | tkv.top(-tkv.anchor_similarity())


def norm_policy():
    """Another structure than anchor_policy (so another generated module)."""
    return tkv.sink(2) | tkv.recent(4) | tkv.top(tkv.key_norm())


@pytest.fixture
def cold(tmp_path, monkeypatch):
    """Call to start cold: fresh cache directories, in-memory caches and plans cleared."""
    fresh = itertools.count()

    def start_cold():
        where = tmp_path / f"cold{next(fresh)}"
        monkeypatch.setenv("TRITONKV_CACHE_DIR", str(where / "tritonkv"))
        monkeypatch.setenv("TRITON_CACHE_DIR", str(where / "triton"))   # GPU: Triton compiles again too
        compiler.clear_memory_caches()
        runtime.clear_plans()
        return where / "tritonkv"

    yield start_cold
    compiler.clear_memory_caches()   # no module loaded from tmp_path outlives the test
    runtime.clear_plans()


def evict(policy, keys, values):
    return tkv.evict(keys, values, policy, BUDGET, backend="triton")


def single_threaded(make_policy, keys, values):
    """The result of one call, made from a cold start in this thread only."""
    return evict(make_policy(), keys, values)


def in_threads(calls):
    """Run ``calls`` (one per thread) released together by a barrier; their results, after
    failing with every thread's exception if any raised."""
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), [None] * len(calls)

    def work(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except BaseException as e:   # reported below, with the others
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [f"thread {i}: {type(e).__name__}: {e}" for i, e in enumerate(errors) if e is not None]
    assert not failed, f"{len(failed)} of {len(calls)} threads failed:\n" + "\n".join(failed)
    return results


def assert_same(got, expected, what):
    got, expected = on_cpu(got), on_cpu(expected)
    assert torch.equal(got.indices, expected.indices), f"{what}: indices differ"
    assert torch.equal(got.keys, expected.keys), f"{what}: keys differ"
    assert torch.equal(got.values, expected.values), f"{what}: values differ"


def on_cpu(result):
    return tkv.Evicted(result.keys.cpu(), result.values.cpu(), result.indices.cpu())


def kernel_files(cache: Path):
    """(generated modules, leftover temporaries) in a tritonkv cache directory."""
    names = [p.name for p in (cache / "kernels").iterdir() if p.is_file()]
    return sorted(n for n in names if n.endswith(".py")), sorted(n for n in names if n.endswith(".tmp"))


def first_and_repeat(policy, keys, values, calls=2):
    """A thread's work: a first call (plans, compiles) then repeats (the planned path)."""
    return lambda: [evict(policy, keys, values) for _ in range(calls)]


def check_threads(cold, makers, policies, calls=2):
    """Threads ``i`` evicting with ``policies[i]`` (made by ``makers[i]``) from a cold start
    all get what one thread gets alone; one generated file per structure, no temporaries."""
    keys, values = make_inputs()
    expected = {make: None for make in makers}
    for make in expected:
        cold()
        expected[make] = single_threaded(make, keys, values)
    cache = cold()
    results = in_threads([first_and_repeat(p, keys, values, calls) for p in policies])
    if CUDA:
        torch.cuda.synchronize()
    for i, (make, outs) in enumerate(zip(makers, results)):
        for j, out in enumerate(outs):
            assert_same(out, expected[make], f"thread {i}, call {j}")
    modules, temporaries = kernel_files(cache)
    assert len(modules) == len(expected) and not temporaries, (modules, temporaries)
    loaded = [m for m in sys.modules if m.startswith(compiler.GENERATED_PREFIX)]
    assert len(loaded) == len(expected), loaded


def test_threads_same_new_policy_object(cold):
    policy = anchor_policy()
    check_threads(cold, [anchor_policy] * THREADS, [policy] * THREADS)


def test_threads_equal_distinct_policy_objects(cold):
    check_threads(cold, [anchor_policy] * THREADS, [anchor_policy() for _ in range(THREADS)])


def test_threads_two_policies_at_once(cold):
    makers = [anchor_policy, norm_policy] * (THREADS // 2)
    check_threads(cold, makers, [make() for make in makers])


def test_threads_compile_a_structure_once(cold):
    """Compiling equal policies from many threads at once generates, writes and executes one
    module: every thread gets the same CompiledPolicy, whose module is fully executed."""
    cache = cold()
    makers = [anchor_policy, norm_policy] * 4
    compiled = in_threads([lambda make=make: compiler.compile_policy(make()) for make in makers])
    for make in (anchor_policy, norm_policy):
        mine = {id(c) for m, c in zip(makers, compiled) if m is make}
        assert len(mine) == 1, f"{make.__name__}: {len(mine)} CompiledPolicy objects, expected 1"
    for c in compiled:
        assert hasattr(c.module, "score") and sys.modules[c.module.__name__] is c.module
    modules, temporaries = kernel_files(cache)
    assert len(modules) == 2 and not temporaries, (modules, temporaries)


def test_threads_write_one_generated_file(tmp_path):
    """Threads of one process writing the same file at once each use their own temporary
    (a per-process name made the others' rename fail with FileNotFoundError)."""
    path = tmp_path / "tkv_same.py"
    text = "x = 1\n" * 10000
    in_threads([lambda: compiler._write_atomically(path, text)] * 8)
    assert path.read_text() == text and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_threads_share_one_evictor(cold, monkeypatch):
    """One Evictor called from every thread plans its signature once; every call gets the
    single-threaded result."""
    from tritonkv import planned
    keys, values = make_inputs()
    cold()
    expected = single_threaded(anchor_policy, keys, values)
    cold()
    plans = []
    plan_compiled = planned.plan_compiled
    monkeypatch.setattr(planned, "plan_compiled", lambda *a: plans.append(1) or plan_compiled(*a))
    ev = tkv.Evictor(anchor_policy(), BUDGET, backend="triton")
    results = in_threads([lambda: ev(keys, values)] * THREADS)
    for i, out in enumerate(results):
        assert_same(out, expected, f"thread {i}")
    # once: the others wait for it (on a GPU a first plan can be deferred to the next call
    # until the select kernel's occupancy is known; the single-threaded call learnt it)
    assert len(plans) == 1 and len(ev._plans) == 1


def test_threads_get_one_evictor_per_policy(cold):
    policy = anchor_policy()
    got = in_threads([lambda: runtime.evictor_for(policy, BUDGET, "triton")] * 8)
    assert all(ev is got[0] for ev in got)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="compiles and launches on the GPU, Triton's cache cold too")
def test_threads_on_gpu_cold_triton_cache(cold):
    """On the GPU: Triton compiles the new generated kernels from several threads at once
    (TRITON_CACHE_DIR fresh), then every thread replays its plan a few times."""
    makers = [anchor_policy, norm_policy] * (THREADS // 2)
    check_threads(cold, makers, [make() for make in makers], calls=4)


# A process of test_processes_share_one_cold_cache_dir: waits until all are ready (each
# has imported torch and tritonkv), evicts once, saves the result.
CHILD = """
import os, sys, time
import torch
import tritonkv as tkv
ready, out, count, repo = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, repo)
from tests.test_threads import BUDGET, anchor_policy, make_inputs
keys, values = make_inputs()
open(f"{ready}.{os.getpid()}", "w").close()
deadline = time.monotonic() + 120
while len([f for f in os.listdir(os.path.dirname(ready)) if f.startswith(os.path.basename(ready) + ".")]) < count:
    if time.monotonic() > deadline:
        sys.exit("the other processes did not get ready within 120 s")
    time.sleep(0.01)
got = tkv.evict(keys, values, anchor_policy(), BUDGET, backend="triton")
torch.save({"indices": got.indices.cpu(), "keys": got.keys.cpu(), "values": got.values.cpu()}, out)
"""


def test_processes_share_one_cold_cache_dir(cold, tmp_path):
    """Processes started together on one fresh TRITONKV_CACHE_DIR (which they inherit) write
    the same generated file at the same time: all succeed and get the single-threaded result."""
    procs = 3
    keys, values = make_inputs()
    cold()
    expected = single_threaded(anchor_policy, keys, values)
    cache = cold()
    repo = str(Path(__file__).resolve().parents[1])
    outs = [tmp_path / f"out{i}.pt" for i in range(procs)]
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "ready"), str(out), str(procs), repo],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for out in outs]
    reports = [child.communicate(timeout=300) for child in children]
    failed = [f"process {i} (rc {child.returncode}): {err.strip()[-2000:]}"
              for i, (child, (_, err)) in enumerate(zip(children, reports)) if child.returncode]
    assert not failed, f"{len(failed)} of {procs} processes failed:\n" + "\n".join(failed)
    for i, out in enumerate(outs):
        got = torch.load(out)
        assert_same(tkv.Evicted(got["keys"], got["values"], got["indices"]), expected, f"process {i}")
    modules, temporaries = kernel_files(cache)
    assert len(modules) == 1 and not temporaries, (modules, temporaries)
