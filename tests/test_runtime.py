"""Planned calls (tkv.Evictor, and evict through it): the same results as unplanned calls,
plans reused per signature and re-made when it changes, safe across streams and graphs."""

import pytest
import torch

import tritonkv as tkv
from tritonkv import planned, policies, runtime
from tritonkv.compiled import evict_compiled
from tritonkv.kernels import batch_launch

from tritonkv.validate import named_inputs

from .checks import assert_unchanged, named_kwargs, snapshot
from .devices import CUDA, DEVICE

needs_gpu = pytest.mark.skipif(not CUDA, reason="planned launches replay compiled kernels: GPU only")


def every_policy():
    named = {name: make() for name, make in policies.PRESETS.items()}
    named["nacl"] = policies.nacl(sinks=4, proxy_window=16)
    named.update(policies.COMPOSITES)
    named["windows"] = tkv.sink(3) | tkv.recent(20)
    named["signal"] = tkv.sink(2) | tkv.top(tkv.signal("s0") - tkv.key_norm().normalize())
    return named


def make(b=1, h=4, n=700, d=64, dv=48, group=2, w=64, seed=0, dtype=torch.bfloat16, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=g).to(dtype)
    values = torch.randn(b, h, n, dv, generator=g).to(dtype)
    queries = torch.randn(b, h * group, w, d, generator=g).to(dtype)
    return keys.to(device), values.to(device), queries.to(device)


def same(a, b):
    if isinstance(a, tkv.EvictedVarlen):
        return torch.equal(a.lengths, b.lengths) and torch.equal(a.indices, b.indices) \
            and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    return torch.equal(a.indices, b.indices) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_evictor_checks_its_arguments_when_made():
    with pytest.raises(TypeError, match="policy: expected a tritonkv Policy"):
        tkv.Evictor("keydiff", 10)
    with pytest.raises(ValueError, match="budget: a fraction must be in"):
        tkv.Evictor(policies.knorm(), 1.5)
    with pytest.raises(TypeError, match="budget: expected an int"):
        tkv.Evictor(policies.knorm(), [3])
    with pytest.raises(ValueError, match="backend: expected one of"):
        tkv.Evictor(policies.knorm(), 10, backend="cuda")
    assert "Evictor(top(-key_norm()), budget=10" in repr(tkv.Evictor(policies.knorm(), 10))


def test_evictor_checks_each_new_signature():
    ev = tkv.Evictor(policies.knorm(), 10)
    keys, values, _ = make(n=50, dtype=torch.float32)
    ev(keys, values)
    with pytest.raises(TypeError, match="keys: expected a torch.Tensor"):
        ev(keys.cpu().numpy(), values)
    with pytest.raises(ValueError, match=r"values: expected \[B, H_kv, N\]"):
        ev(keys, values[:, :, :40])
    with pytest.raises(ValueError, match="seed: expected an int"):
        ev(keys, values, seed=-1)
    with pytest.raises(ValueError, match="queries: the policy uses"):
        tkv.Evictor(policies.snapkv(), 10)(keys, values)


@pytest.mark.parametrize("name", sorted(every_policy()))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_evictor_equals_evict_and_keeps_inputs(backend, name):
    policy = every_policy()[name]
    keys, values, queries = make(h=4 if CUDA else 2, n=150, dtype=torch.float32)   # the interpreter: fewer rows
    q = queries if policy.needs_queries else None
    ev = tkv.Evictor(policy, 0.3, backend=backend)
    named = named_kwargs(policy, keys, 5)
    before = snapshot(keys, values, q)
    first, second = ev(keys, values, queries=q, seed=5, **named), ev(keys, values, queries=q, seed=5, **named)
    assert_unchanged(before, keys, values, q)
    want = tkv.evict(keys, values, policy, 0.3, queries=q, seed=5, backend=backend, **named)
    assert same(first, want) and same(second, want), name


@pytest.mark.parametrize("name", sorted(set(every_policy()) - {"adakv"}))
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("budget", [0.3, 1.0])
def test_evictor_without_gather_returns_the_same_indices(backend, name, budget):
    """gather=False: the indices evict returns, no rows (first call and planned repeat)."""
    policy = every_policy()[name]
    keys, values, queries = make(h=4 if CUDA else 2, n=150, dtype=torch.bfloat16)   # the interpreter: fewer rows
    q = queries if policy.needs_queries else None
    named = named_kwargs(policy, keys, 5)
    ev = tkv.Evictor(policy, budget, backend=backend, gather=False)
    want = tkv.evict(keys, values, policy, budget, queries=q, seed=5, backend=backend, **named)
    for _ in range(2):
        got = ev(keys, values, queries=q, seed=5, **named)
        assert got.keys is None and got.values is None
        assert torch.equal(got.indices, want.indices), name


def test_evictor_without_gather_refusals():
    with pytest.raises(TypeError, match="gather: expected a bool"):
        tkv.Evictor(policies.knorm(), 10, gather=0)
    with pytest.raises(ValueError, match="gather: False is for uniform-budget policies"):
        tkv.Evictor(policies.adakv(), 10, gather=False)


def test_a_new_signature_gets_a_new_plan():
    ev = tkv.Evictor(policies.keydiff(), 0.5)
    for n in (100, 101, 100):
        keys, values, _ = make(n=n, dtype=torch.float32)
        assert same(ev(keys, values), tkv.evict(keys, values, policies.keydiff(), 0.5, backend="reference"))
    assert len(ev._plans) == 2


def test_evict_reuses_one_evictor_per_policy_object_and_budget():
    policy = policies.knorm()
    keys, values, _ = make(n=64, dtype=torch.float32)
    tkv.evict(keys, values, policy, 10)
    ev = runtime.evictor_for(policy, 10, "auto")
    assert runtime.evictor_for(policy, 10, "auto") is ev
    assert runtime.evictor_for(policy, 11, "auto") is not ev
    assert runtime.evictor_for(policy, 10.0 / 64, "auto") is not ev


@needs_gpu
@pytest.mark.parametrize("name", list(every_policy()))
def test_planned_calls_equal_unplanned_ones(name):
    """Replays with new tensors, seeds (one above 2**31) and the same signature are bit-exact
    with the unplanned compiled path."""
    policy = every_policy()[name]
    ev = tkv.Evictor(policy, 0.25)
    for i, seed in enumerate((0, 7, 2 ** 40 + 3, 7)):
        keys, values, queries = make(seed=i)
        q = queries if policy.needs_queries else None
        named = named_kwargs(policy, keys, 4 * i)   # new tensors, the same shapes and dtypes: replays
        got = ev(keys, values, queries=q, seed=seed, **named)
        ordered = named_inputs(tkv.dsl.as_policy(policy), named["signals"] or {}, named["directions"] or {})
        want = evict_compiled(keys, values, q, tkv.dsl.as_policy(policy), ev_budget(policy, keys), seed, ordered)
        assert same(got, want), (name, seed)
    plans = list(ev._plans.values())
    assert any(isinstance(p, planned.Plan) for p in plans), plans   # AdaKV too (tritonkv/adaptive.py)
    mod = batch_launch.module()
    if mod is not None:   # the launches went through one call into C, as one re-pointed CUDA graph
        states = [p.graph_status() for p in plans if isinstance(p, planned.Plan)]
        # a plan launched at least once is on its graph (1); one recorded by the last call of its
        # signature (the seed above 2**31 changes the seed's type) has not launched yet (0)
        assert all(s and s[0] in (0, 1) and s[1][0] == 0 for s in states), (states, mod.graphs_found())
        assert any(s[0] == 1 for s in states), (states, mod.graphs_found())


@needs_gpu
@pytest.mark.parametrize("switch", [("TRITONKV_GRAPH_LAUNCH", "0"), ("TRITONKV_GRAPH_SPLIT", "1")],
                         ids=["plain", "split"])
@pytest.mark.parametrize("name", ["snapkv", "adakv", "windows", "tova"])
def test_graph_launches_equal_plain_ones(name, switch, monkeypatch):
    """A plan launching its kernels as a re-pointed CUDA graph gives, call after call on new
    tensors, what the same plan gives through plain launches (TRITONKV_GRAPH_LAUNCH=0) and as two
    graphs cut where the outputs are first written (TRITONKV_GRAPH_SPLIT=1; a plan of one launch,
    the windows' copy, stays whole)."""
    policy = every_policy()[name]
    graphed, other = tkv.Evictor(policy, 0.25), tkv.Evictor(policy, 0.25)
    outs = []
    for i in range(4):
        keys, values, queries = make(seed=i)
        q = queries if policy.needs_queries else None
        got = graphed(keys, values, queries=q, seed=i)
        monkeypatch.setenv(*switch)   # read where a plan is built (the second call)
        outs.append((got, other(keys, values, queries=q, seed=i)))
        monkeypatch.delenv(switch[0])
        del keys, values, queries   # freed: later calls may get the same addresses, or others
    torch.cuda.synchronize()
    assert all(same(a, b) for a, b in outs)
    plans = [p for ev in (graphed, other) for p in ev._plans.values()]
    assert all(isinstance(p, planned.Plan) for p in plans), plans
    splitting = switch[0] == "TRITONKV_GRAPH_SPLIT"
    assert [p.whole is not None for p in plans] == [True, splitting and name == "windows"]
    if batch_launch.module() is not None:   # graphed: the whole plan, or its late graph when split
        assert [p.graph_status() is not None for p in plans] == [True, splitting]


def ev_budget(policy, keys):
    from tritonkv.budget import resolve_budget
    return resolve_budget(0.25, keys.shape[2])


@needs_gpu
def test_misaligned_and_strided_inputs_get_their_own_plans():
    ev = tkv.Evictor(policies.keydiff(), 100)
    keys, values, _ = make(n=701)
    for k, v in ((keys, values), (keys[:, :, 1:], values[:, :, 1:]), (keys.transpose(1, 2).contiguous().transpose(1, 2),
                                                                      values), (keys, values)):
        want = tkv.evict(k, v, policies.keydiff(), 100, backend="reference")
        got = ev(k, v)
        assert torch.equal(got.indices.cpu(), want.indices.cpu())
        assert torch.equal(got.keys, k.gather(2, got.indices[..., None].expand(-1, -1, -1, k.shape[-1])))


@needs_gpu
def test_concurrent_calls_on_two_streams():
    """Each call owns its buffers: two streams evicting at once give what each gives alone."""
    policy = policies.snapkv_sampled()
    ev = tkv.Evictor(policy, 0.2)
    inputs = [make(n=20000, h=8, seed=s) for s in range(4)]
    want = [ev(k, v, queries=q, seed=3) for k, v, q in inputs]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    got = [None] * len(inputs)
    for _ in range(3):
        for i, (k, v, q) in enumerate(inputs):
            with torch.cuda.stream(streams[i % 2]):
                got[i] = ev(k, v, queries=q, seed=3)
        torch.cuda.synchronize()
        assert all(same(a, b) for a, b in zip(got, want))


@needs_gpu
def test_planned_calls_capture_in_a_cuda_graph():
    ev = tkv.Evictor(policies.keydiff(), 0.3)
    keys, values, _ = make(n=3000)
    want = ev(keys, values)
    ev(keys, values)    # the signature is planned now: the capture records the planned launches
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            got = ev(keys, values)
    keys2, values2, _ = make(n=3000, seed=9)
    keys.copy_(keys2)
    values.copy_(values2)
    graph.replay()
    torch.cuda.synchronize()
    assert same(got, ev(keys2, values2)) and not torch.equal(got.indices, want.indices)


@needs_gpu
def test_profiler_hooks_see_every_launch():
    """With a launch hook installed (profilers), planned calls go through Triton's launch path."""
    from triton import knobs
    ev = tkv.Evictor(policies.knorm(), 0.5)
    keys, values, _ = make()
    ev(keys, values)
    ev(keys, values)
    seen = []
    hook = seen.append
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        out = ev(keys, values)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 2 and same(out, ev(keys, values))   # score, select (+ gather)


def test_seed_argument_position():
    """Plans patch the seed at codegen.SEED_ARG: it must be where launch_args puts it."""
    from tritonkv.codegen import SEED_ARG
    from tritonkv.compiler import compile_policy, launch_args
    keys = torch.empty(1, 2, 64, 32, device="meta")
    priorities = torch.empty(1, 2, 64, device="meta")
    _, args = launch_args(compile_policy(policies.nacl(sinks=1, proxy_window=4)), keys, keys,
                          torch.empty(1, 4, 4, 32, device="meta"), 123457, priorities)
    ints = [a for i, a in enumerate(args) if i != SEED_ARG and type(a) is int]
    assert args[SEED_ARG] == 123457 and 123457 not in ints


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_stacked_layers_keep_what_separate_calls_keep(backend):
    """README: layers stacked as batch rows = one call per layer, for policies without draws."""
    layers = [make(n=90, h=2, seed=s, dtype=torch.float32) for s in range(3)]
    stacked = [torch.cat(parts) for parts in zip(*layers)]
    for policy in (policies.keydiff(), policies.snapkv(window=16)):
        q = stacked[2] if policy.needs_queries else None
        together = tkv.evict(stacked[0], stacked[1], policy, 30, queries=q, backend=backend)
        for i, (k, v, q1) in enumerate(layers):
            alone = tkv.evict(k, v, policy, 30, queries=q1 if policy.needs_queries else None, backend=backend)
            assert torch.equal(together.indices[i:i + 1], alone.indices)
