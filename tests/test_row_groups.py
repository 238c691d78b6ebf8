"""row_groups.py: an evict call cut into groups of rows (TRITONKV_ROW_GROUPS) keeps what the whole
call keeps, its launches ordered as the module says; on a GPU, planned calls launch the groups
as one CUDA graph and equal unplanned whole calls."""

from types import SimpleNamespace

import pytest
import torch

import tritonkv as tkv
from tritonkv import planned, policies
from tritonkv.budget import allocate, resolve_budget
from tritonkv.compiled import evict_compiled
from tritonkv.compiler import compile_policy
from tritonkv.kernels import batch_launch
from tritonkv.kernels.launch import kernel_name
from tritonkv.lowering import lower
from tritonkv import row_groups as row_groups_module
from tritonkv.row_groups import cut, group_inputs, merge, prepare_call, row_groups, split

from .checks import assert_unchanged, snapshot
from .devices import CUDA
from .test_runtime import make, same


def _cut(policy, shape, groups, k=30, named=()):
    policy, alloc = lower(tkv.dsl.as_policy(policy), allocate(tkv.dsl.as_policy(policy), shape[2], k))
    return cut(policy, compile_policy(policy), alloc, shape, groups, named)


def test_the_cut():
    """The batch where B >= 2, else the heads of a policy whose heads select apart; at most one
    group per batch row or head; whole where nothing is ranked, noise is drawn, named inputs are
    read, AdaKV, or one group is asked for."""
    assert split(7, 3) == [(0, 3), (3, 2), (5, 2)] and split(2, 2) == [(0, 1), (1, 1)]
    assert _cut(policies.keydiff(), (1, 4, 100, 64), 2) == (1, [(0, 2), (2, 2)])
    assert _cut(policies.keydiff(), (1, 4, 100, 64), 8) == (1, [(0, 1), (1, 1), (2, 1), (3, 1)])
    assert _cut(policies.keydiff(), (3, 4, 100, 64), 2) == (0, [(0, 2), (2, 1)])
    assert _cut(policies.tova(), (2, 4, 100, 64), 4) == (0, [(0, 1), (1, 1)])
    assert _cut(policies.tova(), (1, 4, 100, 64), 2) is None   # its heads share one selection
    assert _cut(policies.keydiff(), (2, 4, 100, 64), 1) is None
    assert _cut(policies.streaming_llm(), (2, 4, 100, 64), 2) is None   # nothing to rank
    assert _cut(policies.keydiff(), (2, 4, 100, 64), 2, k=100) is None   # keeps every token
    assert _cut(tkv.sink(2) | tkv.top(tkv.key_norm() + tkv.random()), (2, 4, 100, 64), 2) is None
    assert _cut(tkv.sink(2) | tkv.top(tkv.key_norm(), 0.5) | tkv.sample(tkv.key_norm()), (2, 4, 100, 64), 2) is None
    assert _cut(policies.keydiff().adaptive(), (2, 4, 100, 64), 2) is None
    assert _cut(policies.keydiff(), (2, 4, 100, 64), 2, named=(torch.empty(1),)) is None


def test_group_inputs_are_views_of_the_call_inputs(monkeypatch):
    """Each group's keys, values and queries (a KV head's query heads with it), as views."""
    policy, alloc = lower(policies.snapkv(), allocate(policies.snapkv(), 100, 30))
    keys, values, queries = make(b=1, h=4, n=100, group=2)
    compiled = compile_policy(policy)
    assert group_inputs(policy, compiled, alloc, keys, values, queries) == [(keys, values, queries)]
    monkeypatch.setenv("TRITONKV_ROW_GROUPS", "2")
    groups = group_inputs(policy, compiled, alloc, keys, values, queries)
    assert [[tuple(t.shape[:2]) for t in g] for g in groups] == [[(1, 2), (1, 2), (1, 4)]] * 2
    k, v, q = groups[1]
    assert torch.equal(k, keys[:, 2:]) and torch.equal(q, queries[:, 4:]) and k.data_ptr() == keys[:, 2:].data_ptr()


def test_the_switch_is_checked(monkeypatch):
    assert row_groups() == 1
    monkeypatch.setenv("TRITONKV_ROW_GROUPS", "3")
    assert row_groups() == 3
    for bad in ("0", "two", "-1", ""):
        monkeypatch.setenv("TRITONKV_ROW_GROUPS", bad)
        with pytest.raises(ValueError, match="TRITONKV_ROW_GROUPS: expected a whole number >= 1"):
            row_groups()


def test_the_groups_launches_edges(monkeypatch):
    """Group g's first launch waits for group g-1's first, its select also for group g-1's select,
    its other launches for the one before them; the groups' scratch buffers are listed apart and
    their views of the inputs named as aliases."""
    monkeypatch.setenv("TRITONKV_ROW_GROUPS", "3")
    policy, alloc = lower(policies.keydiff(), allocate(policies.keydiff(), 64, 20))
    keys, values, _ = make(b=1, h=3, n=64)
    call = prepare_call(policy, compile_policy(policy), alloc, keys, values, None, 0)
    names = [kernel_name(step.fn) for step in call.launches]
    per_group = len(names) // 3
    assert names == names[:per_group] * 3 and names[per_group - 1] == "select", names
    s = per_group - 1
    for g in range(3):
        base = g * per_group
        first = () if g == 0 else (base - per_group,)
        want = [first] + [(base + i - 1,) for i in range(1, per_group)]
        if g:
            want[s] += (base - per_group + s,)
        assert [step.after for step in call.launches[base:base + per_group]] == want, (g, names)
    assert len(call.scratch) == 3 and len(call.aliases) == 6   # keys' and values' views per group
    assert call.indices.shape == (1, 3, alloc.total)


@pytest.mark.parametrize("name,shape", [("keydiff", (1, 4, 97, 64)), ("snapkv", (1, 4, 80, 80)),
                                        ("tova", (3, 2, 64, 64)), ("knorm", (3, 2, 70, 128)),
                                        ("h2o", (2, 3, 64, 64))])
def test_groups_keep_what_the_whole_call_keeps(name, shape, monkeypatch):
    """Keys strided as a [B, N, H, D] cache; the budget and windows of the preset; two groups and
    one per batch row (or head) against the whole call, bit for bit; inputs untouched."""
    b, h, n, d = shape
    policy = policies.PRESETS[name]()
    keys, values, queries = make(b=b, h=h, n=n, d=d, seed=3)
    keys = keys.transpose(1, 2).contiguous().transpose(1, 2)   # [B, N, H, D] in memory
    q = queries if policy.needs_queries else None
    before = snapshot(keys, values, q)
    k = n // 3
    want = evict_compiled(keys, values, q, policy, k, 0)
    merged = []
    monkeypatch.setattr(row_groups_module, "merge", lambda calls, *out: merged.append(len(calls)) or merge(calls, *out))
    rows = b if b >= 2 else h   # what is cut: the batch, or the heads of B = 1
    for groups in ("2", str(rows)):
        monkeypatch.setenv("TRITONKV_ROW_GROUPS", groups)
        got = evict_compiled(keys, values, q, policy, k, 0)
        assert same(got, want), (name, groups)
        got = evict_compiled(keys, values, q, policy, k, 0, gather=False)
        assert got.keys is None and torch.equal(got.indices, want.indices), (name, groups)
    assert merged == [2, 2, rows, rows]   # the calls were cut
    assert_unchanged(before, keys, values, q)


needs_gpu = pytest.mark.skipif(not CUDA, reason="planned launches replay compiled kernels: GPU only")


@needs_gpu
@pytest.mark.parametrize("name,b", [("keydiff", 1), ("snapkv", 1), ("tova", 2), ("keydiff", 3)])
def test_planned_groups_launch_as_one_graph(name, b, monkeypatch):
    """Planned calls of a call cut into groups (its scratch one buffer, each group's part at its
    offset; the inputs' views re-pointed per call) equal the whole unplanned call on new tensors,
    launched as one CUDA graph of the groups' edges, and plainly."""
    policy = policies.PRESETS[name]()
    monkeypatch.setenv("TRITONKV_ROW_GROUPS", "2")
    ev = tkv.Evictor(policy, 0.25)
    monkeypatch.setenv("TRITONKV_GRAPH_LAUNCH", "0")
    plain = tkv.Evictor(policy, 0.25)
    for i in range(4):
        keys, values, queries = make(b=b, seed=i)
        q = queries if policy.needs_queries else None
        monkeypatch.delenv("TRITONKV_ROW_GROUPS")
        want = evict_compiled(keys, values, q, policy, resolve_budget(0.25, keys.shape[2]), i)
        monkeypatch.setenv("TRITONKV_ROW_GROUPS", "2")
        monkeypatch.delenv("TRITONKV_GRAPH_LAUNCH")
        got = ev(keys, values, queries=q, seed=i)
        monkeypatch.setenv("TRITONKV_GRAPH_LAUNCH", "0")
        assert same(got, want) and same(plain(keys, values, queries=q, seed=i), want), (name, i)
    plans = list(ev._plans.values())
    assert all(isinstance(p, planned.Plan) for p in plans), plans
    assert any(any(s.after for s in p.steps) for p in plans)   # the groups' edges reached the plan
    if batch_launch.module() is not None:
        states = [p.graph_status() for p in plans]
        assert any(s and s[0] == 1 and s[1][0] == 0 for s in states), states


def test_a_plan_records_the_groups(monkeypatch):
    """planned.record on a call cut in two (its kernels stood in for: recording reads only their
    parameters): each group's view of K is K's role at the view's offset, each group's scratch
    the one scratch role at its own 512-byte aligned offset, and the steps keep the edges."""
    monkeypatch.setenv("TRITONKV_ROW_GROUPS", "2")
    monkeypatch.setenv("TRITONKV_BATCH_LAUNCH", "0")   # Triton's launchers: nothing is packed for C
    policy, alloc = lower(policies.keydiff(), allocate(policies.keydiff(), 64, 20))
    keys, values, _ = make(b=1, h=4, n=64, d=64)
    call = prepare_call(policy, compile_policy(policy), alloc, keys, values, None, 0)
    stand_in = SimpleNamespace(run=SimpleNamespace(launch=None), function=None, packed_metadata=None)
    monkeypatch.setattr(planned, "compiled_entry", lambda fn, args, constexprs, *rest: (stand_in, []))
    plan = planned.record(call, keys, values, None)
    assert [s.after for s in plan.steps] == [launch.after for launch in call.launches]
    sizes = [-(-s.numel() // 128) * 128 for s in call.scratch]
    assert plan.scratch_numel == sum(sizes)
    half = len(plan.steps) // 2
    group_view = 2 * 64 * 64 * keys.element_size()   # heads 2, 3 start two heads of [N, D] into K
    for g, steps in enumerate((plan.steps[:half], plan.steps[half:])):
        roles = [(role, offset) for step in steps for _, role, offset in step.patches]
        assert {offset for role, offset in roles if role == planned.KEYS} == {g * group_view}
        scratch = [offset for role, offset in roles if role == planned.SCRATCH]
        assert scratch and all(g * sizes[0] * 4 <= offset < (sizes[0] + g * sizes[1]) * 4 for offset in scratch)


def test_lanes_follow_the_groups():
    """Where a capturing stream records a plan, each group's steps share a lane (a stream) and a
    plan without edges has none."""
    def step(after):
        return SimpleNamespace(after=after)
    groups = [step(()), step((0,)), step((1,)), step((2,)), step((0,)), step((4,)), step((5,)), step((6, 3))]
    assert planned.lanes_of(groups) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert planned.lanes_of([step(None), step(None)]) is None


@needs_gpu
@pytest.mark.parametrize("name", ["keydiff", "snapkv"])
def test_groups_in_a_captured_graph(name, monkeypatch):
    """A planned call cut into groups, captured in the caller's CUDA graph (its steps on lanes,
    joined by events) and through Evictor.graph, replays what the whole call keeps."""
    policy = policies.PRESETS[name]()
    monkeypatch.setenv("TRITONKV_ROW_GROUPS", "4")
    ev = tkv.Evictor(policy, 0.25)
    keys, values, queries = make(b=1, seed=5)
    q = queries if policy.needs_queries else None
    for _ in range(2):   # plan
        ev(keys, values, queries=q)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph, stream=side):
            out = ev(keys, values, queries=q)
    torch.cuda.current_stream().wait_stream(side)
    replayed = ev.graph(keys, values, queries=q)
    fresh = make(b=1, seed=6)
    for t, new in zip((keys, values, queries), fresh):
        t.copy_(new)
    graph.replay()
    got = replayed()
    torch.cuda.synchronize()
    monkeypatch.delenv("TRITONKV_ROW_GROUPS")
    want = evict_compiled(keys, values, q, policy, resolve_budget(0.25, keys.shape[2]), 0)
    assert same(out, want) and same(got, want)
    plans = [p for p in ev._plans.values() if isinstance(p, planned.Plan)]
    assert plans and all(p.lanes is not None and p.lanes.streams for p in plans)
