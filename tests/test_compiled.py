"""The compiled path (generated Triton kernels; in the interpreter on CPU) against reference.py."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tritonkv as tkv
from tritonkv import policies, reference
from tritonkv.budget import allocate, resolve_budget
from tritonkv.compiled import evict_compiled
from tritonkv.kernels.launch import kernel_name
from tritonkv.lowering import lower
from tritonkv.results import pack_varlen
from tritonkv.validate import named_inputs as named_inputs_of

from .checks import assert_unchanged, check_evicted, snapshot
from .devices import CUDA, DEVICE, to_device
from .strategies import caches, examples, named_inputs
from .strategies import policies as policy_strategy
from .tolerances import normalize_allowance, tolerance, transform_allowance

def _chunk_boundary_is_clear(key, kept, count, chunk, err) -> bool:
    """A chunked clause: its tokens tie within a chunk (exactly, on both paths), so the cut
    may fall inside a chunk; what must be clear is the gap between that chunk and the
    candidates ranked just before and after it."""
    for row, taken in zip(key.reshape(-1, key.shape[-1]), kept.reshape(-1, kept.shape[-1])):
        tokens = (~taken).nonzero().flatten()
        order = torch.sort(row[tokens], descending=True, stable=True)
        vals, chunks = order.values, tokens[order.indices] // chunk
        block = (chunks == chunks[count]).nonzero().flatten()
        first, last = int(block.min()), int(block.max())
        if first > 0 and not vals[first - 1] - vals[first] > 2 * err:
            return False
        if last + 1 < len(vals) and not vals[last] - vals[last + 1] > 2 * err:
            return False
    return True


def boundaries_are_clear(policy, alloc, priorities, errors, shape) -> bool:
    """True when every clause's last kept reference priority beats the next candidate by
    more than twice the largest difference between compiled and reference priorities:
    then rounding cannot have changed the selection, and it must match exactly."""
    kept = reference.forced_mask(alloc, shape)
    for clause, p, count, err in zip(policy.selective, priorities, alloc.clause_counts, errors):
        key = reference.rank_key(p).masked_fill(kept, float("-inf"))
        candidates = int((~kept[0, 0]).sum())
        if 0 < count < candidates and getattr(clause, "chunk", 1) > 1:
            if not _chunk_boundary_is_clear(key, kept, count, clause.chunk, err):
                return False
        elif 0 < count < candidates:
            ordered = torch.sort(key, dim=-1, descending=True).values
            last, following = ordered[..., count - 1], ordered[..., count]
            gap = last - following
            gap = torch.where(torch.isinf(last) & torch.isinf(following), torch.zeros_like(gap), gap)
            if not bool((gap > 2 * err).all()):
                return False
        kept |= reference.take_top(p, kept, count)
    return True


def valid_or_skip(keys, values, queries, policy, budget, seed):
    """Draws whose proxy window exceeds the cache are a documented error, not a test case."""
    from tritonkv.validate import check_evict_args
    try:
        check_evict_args(keys, values, policy, budget, queries, seed, "triton", *named_inputs(policy, keys, seed))
    except ValueError as e:
        assume("queries" not in str(e))
        raise


def compare(keys, values, queries, policy, budget, seed=0):
    """Run both paths; check properties, priorities and selections. Returns whether the
    end-to-end kept sets were compared exactly."""
    b, h, n, _ = keys.shape
    k = resolve_budget(budget, n)
    keys, values, queries = to_device(keys, values, queries)
    signals, directions = named_inputs(policy, keys, seed)
    named = named_inputs_of(policy, signals, directions)
    before = snapshot(keys, values, queries, *named)
    out, prios = evict_compiled(keys, values, queries, policy, k, seed, named, return_priorities=True)
    assert_unchanged(before, keys, values, queries, *named)
    out_cpu = type(out)(out.keys.cpu(), out.values.cpu(), out.indices.cpu())
    check_evicted(out_cpu, keys.cpu(), values.cpu(), policy, k)

    cpu = lambda named: {name: t.cpu() for name, t in named.items()}  # noqa: E731
    inputs = reference.Inputs(keys.float().cpu(), values.float().cpu(),
                              None if queries is None else queries.float().cpu(), seed, cpu(signals), cpu(directions))
    # the kernels run the lowered policy (tritonkv/lowering.py: the same kept set, fewer clauses)
    written, (policy, alloc) = policy, lower(policy, allocate(policy, n, k))
    ref_prios = reference.clause_priorities(policy, inputs)
    got = [p.cpu().view(b, h, n) for p in prios]
    errors = []
    for j, (g, r) in enumerate(zip(got, ref_prios)):
        clause = policy.selective[j]
        allowance = normalize_allowance(clause, inputs)
        if getattr(clause, "transformed", False):   # summed over a chunk / the heads
            terms = clause.chunk * (h if clause.head_reduce else 1)
            allowance = allowance * terms + transform_allowance(clause, reference.score(clause.score, inputs))
        finite = torch.isfinite(r)
        assert torch.equal(torch.isinf(g) & ~torch.isnan(r), torch.isinf(r)), f"clause {j}: infinities differ"
        diff = (g - r).abs().masked_fill(~finite, 0.0)
        errors.append(float(diff.max()) if diff.numel() else 0.0)
        bad = finite & ~(diff <= tolerance(r, allowance))
        assert not bool(bad.any()), (
            f"clause {j}: {int(bad.sum())} priorities off, first at {bad.nonzero()[0].tolist()}: "
            f"got {g[bad][0].item()}, reference {r[bad][0].item()}")
    own = reference.kept_indices(reference.select_by_priority(alloc, got, (b, h, n)))
    if alloc.total < n:
        assert torch.equal(out_cpu.indices, own), "select kernel differs from the reference selection"
    if boundaries_are_clear(policy, alloc, ref_prios, errors, (b, h, n)):
        ref = tkv.evict(keys.cpu(), values.cpu(), written, budget, queries=None if queries is None else queries.cpu(),
                        seed=seed, signals=cpu(signals) or None, directions=cpu(directions) or None,
                        backend="reference")
        assert torch.equal(out_cpu.indices, ref.indices)
        return True
    return False


# ------------------------------------------------------------------------------ presets

PRESET_NAMES = sorted(set(policies.PRESETS) - {"adakv"}) + sorted(policies.COMPOSITES)


def preset(name):
    if name in policies.COMPOSITES:
        return policies.COMPOSITES[name]
    if name == "nacl":
        return policies.nacl(sinks=8, proxy_window=16)  # the 256 sinks of the default fill small caches
    if name in ("snapkv", "pyramidkv"):
        return policies.PRESETS[name]() if name == "pyramidkv" else policies.snapkv(window=32)
    return policies.PRESETS[name]()


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_preset_matches_reference(name, dtype):
    exact = []
    for attempt in range(3):   # a near-tie at a boundary skips the exact comparison; retry until one runs
        g = torch.Generator().manual_seed(1000 * attempt + sum(map(ord, name + str(dtype))))
        b, h, group, n, d = 2 if CUDA else 1, 2, 2, 301, 128   # odd N over two 256-token tiles (one row of
        # the batch in the interpreter: test_presets_across_shapes draws batches)
        keys = torch.randn(b, h, n, d, generator=g).to(dtype)
        values = torch.randn(b, h, n, 96, generator=g).to(dtype)
        queries = torch.randn(b, h * group, 64, d, generator=g).to(dtype)
        exact.append(compare(keys, values, queries, preset(name), 0.3, seed=5))
        if exact[-1]:
            break
    assert any(exact), "random caches should have clear selection boundaries; the exact check never ran"


@settings(max_examples=examples(12, cpu=6), deadline=None)
@given(n=st.sampled_from([1, 37, 300 if CUDA else 130]), window=st.sampled_from([1, 5, 16]), group=st.sampled_from([1, 2, 4]),
       scale=st.sampled_from([1.0, 30.0, 300.0]), causal=st.booleans(), exclude=st.booleans(),
       pool=st.sampled_from([1, 3]), seed=st.integers(0, 2 ** 16))
def test_proxy_probabilities_hold_at_extreme_logits(n, window, group, scale, causal, exclude, pool, seed):
    """The score pass forms each probability as 2^(s - lse) with no mask per logit
    (kernels/proxy.py): padding query rows (a window short of its power of two), lanes outside
    [0, N) and the window's own keys when excluded are left unmasked where no kept lane reads
    them. Keys scaled up to 300x make the softmax one-hot and the unmasked lanes' exponents
    overflow unless clamped; priorities stay the reference's."""
    assume(window <= n and not (exclude and window >= n))
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, n, 64, generator=g) * scale
    values = torch.randn(1, 2, n, 64, generator=g)
    queries = torch.randn(1, 2 * group, window, 64, generator=g)
    score = tkv.proxy_attention(window=window, causal=causal, reduce="mean", pool=pool, exclude_window=exclude,
                                group_reduce="mean")
    compare(keys, values, queries, tkv.dsl.as_policy(tkv.top(score)), 0.5, seed)


@given(cache=caches(max_n=260), budget=st.one_of(st.integers(1, 300), st.floats(0.05, 1.0)),
       seed=st.integers(0, 2 ** 40), name=st.sampled_from(PRESET_NAMES))
@settings(max_examples=examples(20, cpu=10))
def test_presets_across_shapes(cache, budget, seed, name):
    keys, values, queries = cache
    policy = preset(name)
    valid_or_skip(keys, values, queries, policy, budget, seed)
    compare(keys, values, queries, policy, budget, seed)


@given(cache=caches(max_n=200, head_dims=[64, 80], max_batch=2, max_heads=2),
       policy=policy_strategy(), budget=st.floats(0.05, 0.9), seed=st.integers(0, 2 ** 31))
@settings(max_examples=examples(25, cpu=12))
def test_random_policies_match_reference(cache, policy, budget, seed):
    keys, values, queries = cache
    valid_or_skip(keys, values, queries, policy, budget, seed)
    compare(keys, values, queries, policy, budget, seed)


def test_long_window_and_odd_group():
    """Windows longer than one query chunk, a GQA ratio that is not a power of two."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 700 if CUDA else 401, 64, generator=g)   # the interpreter: fewer key tiles
    queries = torch.randn(1, 6, 300, 64, generator=g)
    for node in (tkv.proxy_attention(window=300, causal=True, reduce="max", pool=3, pool_mode="max"),
                 tkv.proxy_attention(window=200, reduce="sum", group_reduce="max", pool=5)):
        compare(keys, keys, queries, tkv.dsl.as_policy(tkv.top(node)), 0.2)


def test_second_call_compiles_nothing():
    from tritonkv import compiler
    policy = tkv.sink(2) | tkv.top(-tkv.key_norm() + tkv.position())
    compiler.compile_policy(policy)
    before = dict(compiler._CACHE)
    compiler.compile_policy(tkv.sink(5) | tkv.top(-tkv.key_norm() + tkv.position()))  # same structure
    assert compiler._CACHE.keys() == before.keys()
    path = compiler.compile_policy(policy).path
    assert path.exists() and "def score(" in path.read_text()


def test_everything_kept_when_budget_covers_the_cache():
    keys = torch.randn(2, 2, 33, 64)
    out = evict_compiled(*to_device(keys, keys, None), policies.keydiff(), 33, 0)
    assert torch.equal(out.indices.cpu(), torch.arange(33).expand(2, 2, 33))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_evict_is_cuda_graph_capturable():
    """No host synchronization on the compiled path: evict can be captured and replayed."""
    keys, values = torch.randn(2, 4, 3000, 128, device="cuda"), torch.randn(2, 4, 3000, 64, device="cuda")
    queries = torch.randn(2, 8, 16, 128, device="cuda")
    policy = policies.nacl(sinks=4, proxy_window=16)
    want = tkv.evict(keys, values, policy, 0.3, queries=queries)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tkv.evict(keys, values, policy, 0.3, queries=queries)
        with torch.cuda.graph(graph, stream=stream):
            got = tkv.evict(keys, values, policy, 0.3, queries=queries)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


def test_adaptive_policy_matches_reference():
    """AdaKV: compiled scores, cross-head selection in PyTorch; same packed result."""
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 4, 300, 64, generator=g), torch.randn(2, 4, 300, 32, generator=g)
    queries = torch.randn(2, 8, 16, 64, generator=g)
    policy = policies.adakv(policies.snapkv(window=16))
    got = evict_compiled(*to_device(keys, values, queries), policy, 60, 0)
    want = tkv.evict(keys, values, policy, 60, queries=queries, backend="reference")
    assert torch.equal(got.lengths.cpu(), want.lengths) and torch.equal(got.indices.cpu(), want.indices)
    assert torch.equal(got.keys.cpu(), want.keys) and int(want.lengths.sum()) == 2 * 4 * 60


@pytest.mark.parametrize("name", ["keydiff", "snapkv", "nacl"])
def test_a_few_thousand_tokens(name):
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(1, 2, 3001, 64, generator=g).bfloat16()
    values = torch.randn(1, 2, 3001, 80, generator=g).bfloat16()
    queries = torch.randn(1, 8, 64, 64, generator=g).bfloat16()
    assert compare(keys, values, queries, preset(name), 0.1, seed=1)


@given(cache=caches(max_n=200, head_dims=[64, 80], max_batch=2, max_heads=2), policy=policy_strategy(),
       seed=st.integers(0, 2 ** 31))
@settings(max_examples=examples(15, cpu=8))
def test_a_budget_of_all_tokens_but_one_matches_reference(cache, policy, seed):
    """Budget N - 1 (an every-step eviction): select finds the token each row drops in one pass
    over the last clause (``drop_one``) instead of a radix select; the kept sets are the
    reference's, ties included."""
    keys, values, queries = cache
    n = keys.shape[2]
    assume(n >= 2)
    valid_or_skip(keys, values, queries, policy, n - 1, seed)
    compare(keys, values, queries, policy, n - 1, seed)


@pytest.mark.parametrize("name", ["tova", "h2o", "ties"])
def test_dropping_one_of_many_tokens(name, monkeypatch):
    """drop_one over rows long enough for several select programs per row on a GPU (their
    lowest keys meet in an atomic max), taken only where every row drops exactly one token;
    "ties": a signal of a few integer values, so the lowest key is shared by many tokens and
    the highest-index one goes (ties are kept by the lower index)."""
    import tritonkv.compiler as compiler
    from tritonkv.kernels.select import _select_kernel
    n = 20001 if DEVICE == "cuda" else 301   # the interpreter runs one program per row: any n
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 2, n, 64, generator=g).bfloat16()
    values = torch.randn(2, 2, n, 64, generator=g).bfloat16()
    queries = torch.randn(2, 8, 8, 64, generator=g).bfloat16()
    position = _select_kernel.arg_names.index("drop_one")
    flags, launch = [], compiler.select_launch

    def spy(*args, **kwargs):
        out = launch(*args, **kwargs)
        flags.append(out[1][position])
        return out
    monkeypatch.setattr(compiler, "select_launch", spy)
    for budget in (n - 1, n - 2):
        if name == "ties":
            policy = tkv.sink(1) | tkv.recent(2) | tkv.top(tkv.signal("s"))
            signals = {"s": torch.randint(0, 4, (2, 2, n), generator=g).float()}
            k, v, sg = to_device(keys, values, signals["s"])
            got = tkv.evict(k, v, policy, budget, signals={"s": sg}, backend="triton").indices.cpu()
            want = tkv.evict(keys, values, policy, budget, signals=signals, backend="reference").indices
            assert torch.equal(got, want), budget
        else:
            assert compare(keys, values, queries, preset(name), budget, seed=1)
    assert flags == [1, 0]


@given(cache=caches(max_n=200, head_dims=[64], max_batch=2, max_heads=3),
       budget=st.one_of(st.integers(1, 250), st.floats(0.05, 1.0)), floor=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
       score=st.sampled_from([-tkv.key_norm(), tkv.random(), tkv.position() * 0.0, tkv.position().pool(5)]),
       windows=st.booleans(), seed=st.integers(0, 2 ** 31))
@settings(max_examples=examples(25, cpu=12))
def test_adaptive_selection_is_the_reference_selection(cache, budget, floor, score, windows, seed):
    """AdaKV's two radix selects (per head, then over each row's H * N priorities) keep exactly
    what reference.select_adaptive_by_priority keeps on the same priorities: ties (an all-equal
    score) to the lower head, then token."""
    from tritonkv.compiler import compile_policy, score as compiled_score
    keys, values, _ = cache
    policy = ((tkv.sink(2) | tkv.recent(3) | tkv.top(score)) if windows else tkv.dsl.as_policy(tkv.top(score)))
    policy = policy.adaptive(floor)
    b, h, n, _ = keys.shape
    k = resolve_budget(budget, n)
    keys, values = to_device(keys, values)
    got = evict_compiled(keys, values, None, policy, k, seed)
    prios = compiled_score(compile_policy(policy), keys, values, None, seed)[0].view(b, h, n).cpu()
    alloc = allocate(policy, n, k)
    want = pack_varlen(keys.cpu(), values.cpu(), reference.select_adaptive_by_priority(policy, alloc, prios))
    assert torch.equal(got.lengths.cpu(), want.lengths) and torch.equal(got.indices.cpu(), want.indices)
    assert torch.equal(got.keys.cpu(), want.keys) and torch.equal(got.values.cpu(), want.values)
    assert int(got.lengths.sum()) == b * h * alloc.total


@pytest.mark.parametrize("d", [64, 80, 128, 256])
@given(group=st.sampled_from([1, 2, 4, 8, 16, 32]), n=st.one_of(st.just(1), st.integers(2, 300 if CUDA else 130)),
       causal=st.booleans(), pool=st.sampled_from([1, 3]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2 ** 31))
@settings(max_examples=examples(4), deadline=None)
def test_one_query_proxy_attention_reads_its_kept_logits(d, group, n, causal, pool, dtype, seed):
    """A one-query proxy attention (TOVA's) keeps its statistics pass's logits, and the score
    pass reads them instead of K, where the group's rows fit one 16-row chunk (G <= 16): the
    scores equal the reference's, as those of the two-pass kernels (TRITONKV_PROXY_LOGITS=0)
    do, within the compiled-vs-reference tolerance (tests/tolerances.py)."""
    import os
    from tritonkv import geometry
    from tritonkv.compiler import Layout, _geometry_of, compile_policy, score
    node = tkv.proxy_attention(window=1, causal=causal, pool=pool)
    compiled = compile_policy(tkv.sink(0) | tkv.top(node))
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, n, d, generator=g).to(dtype)
    queries = torch.randn(1, 2 * group, 3, d, generator=g).to(dtype)
    want = reference.proxy_attention(node, keys.float(), queries.float()).reshape(1, 2, n)
    keys, queries = to_device(keys, queries)
    try:
        for keep in ("1", "0"):
            os.environ["TRITONKV_PROXY_LOGITS"] = keep
            geometry.clear_geometry()
            geo = _geometry_of(compiled, keys, Layout.dense(keys, keys), queries)
            assert geo.constexprs["LG_0"] == (keep == "1" and group <= 16)
            got = score(compiled, keys, keys, queries, 0)[0].reshape(1, 2, n).cpu()
            assert (got - want).abs().le(tolerance(want)).all(), keep
    finally:
        os.environ.pop("TRITONKV_PROXY_LOGITS")
        geometry.clear_geometry()


HEAD_REDUCED = {
    "tova": policies.tova(),
    "two head-reduced tops": tkv.sink(3) | tkv.recent(2) | tkv.top(tkv.key_norm(), share=0.4, head_reduce="max")
    | tkv.top(-tkv.anchor_similarity(), head_reduce="sum", chunk=4),
}


@pytest.mark.parametrize("switches", [{}, {"TRITONKV_COPY_PAIRED": "0"}, {"TRITONKV_SELECT_COPY_ROWS": "16"},
                                      {"TRITONKV_SELECT_WARPS": "8"}], ids=["paired", "unpaired", "16-rows", "8-warps"])
@pytest.mark.parametrize("policy", [policies.keydiff(), policies.tova(), HEAD_REDUCED["two head-reduced tops"]],
                         ids=["keydiff", "tova", "two-head-reduced-tops"])
def test_select_copy_switches_gather_the_reference_rows(policy, switches, monkeypatch):
    """Select's fused copy (forced for the shared selections, which gather in a launch of their
    own by default) with a row's K and V tiles loaded before either is stored (the default), one
    tensor after the other (TRITONKV_COPY_PAIRED=0), 16 kept rows a step
    (TRITONKV_SELECT_COPY_ROWS), and select in programs of 8 warps (TRITONKV_SELECT_WARPS), per
    head (KeyDiff) and for every head of a shared selection (TOVA, two head-reduced clauses): the
    kept sets and the copied rows stay the reference's."""
    monkeypatch.setenv("TRITONKV_FUSED_GATHER", "1")
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    g = torch.Generator().manual_seed(5)
    b, heads, n = 2, 3, 301
    keys, values = torch.randn(b, heads, n, 80, generator=g), torch.randn(b, heads, n, 64, generator=g)
    queries = torch.randn(b, heads * 2, 8, 80, generator=g)
    assert compare(keys, values, queries, policy, 0.3)


def test_select_copy_rows_and_warps_refuse_other_counts(monkeypatch):
    from tritonkv.kernels.select import copy_rows, select_warps
    assert copy_rows(128, 128) == 64 and copy_rows(256, 64) == 32
    monkeypatch.setenv("TRITONKV_SELECT_COPY_ROWS", "16")
    assert copy_rows(128, 128) == 16 and copy_rows(512, 512) == 16
    monkeypatch.setenv("TRITONKV_SELECT_COPY_ROWS", "48")
    with pytest.raises(ValueError, match="TRITONKV_SELECT_COPY_ROWS: expected 16, 32 or 64 rows"):
        copy_rows(128, 128)
    assert select_warps() == 4
    monkeypatch.setenv("TRITONKV_SELECT_WARPS", "16")
    with pytest.raises(ValueError, match="TRITONKV_SELECT_WARPS: expected 4 or 8"):
        select_warps()


@pytest.mark.parametrize("name", sorted(HEAD_REDUCED))
@pytest.mark.parametrize("heads", [1, 3])
def test_head_reduced_policies_select_once_per_batch_row(name, heads):
    """When every clause ranks a head-reduced priority, every head keeps the same tokens: select
    runs one program row per batch row and writes every head's indices, and a gather launch
    copies the kept rows. The same kept sets as the reference."""
    from tritonkv.compiler import compile_policy, prepare, shared_selection
    policy = HEAD_REDUCED[name]
    g = torch.Generator().manual_seed(heads)
    b, group, n = 2, 2, 157
    keys = torch.randn(b, heads, n, 80, generator=g)
    values = torch.randn(b, heads, n, 64, generator=g)
    queries = torch.randn(b, heads * group, 8, 80, generator=g)
    assert compare(keys, values, queries, policy, 0.3)
    lowered, alloc = lower(policy, allocate(policy, n, resolve_budget(0.3, n)))
    compiled = compile_policy(lowered)
    assert shared_selection(compiled.program)
    for gather in (True, False):
        call = prepare(compiled, alloc, *to_device(keys, values, queries), 0, (), gather)
        names = [kernel_name(step.fn) for step in call.launches]
        assert call.launches[names.index("select")].grid[1] == b   # one program row per batch row
        # the kept rows: copied by a launch of their own over every head (compiler.fused_gather)
        assert names[-1] == ("gather" if gather else "select"), names
        # a score kernel that reduces the heads writes head 0's row alone: the one select ranks
        if compiled.program.score_heads:
            fused = [step for step in call.launches if step.fn is compiled.kernel("score_heads")]
            assert fused and all(not step.constexprs["ALL_HEAD_ROWS"] for step in fused)
    out = evict_compiled(*to_device(keys, values, queries), policy, resolve_budget(0.3, n), 0, gather=False)
    assert out.keys is None and (out.indices == out.indices[:, :1]).all()


def test_selection_is_per_head_otherwise():
    from tritonkv.compiler import compile_policy, shared_selection
    for policy in (policies.keydiff(), policies.tova_per_group(), policies.nacl(),
                   tkv.top(tkv.key_norm(), head_reduce="mean") | tkv.top(tkv.value_norm()),
                   tkv.top(tkv.key_norm(), head_reduce="mean") | tkv.sample(tkv.key_norm())):
        assert not shared_selection(compile_policy(lower(policy, allocate(policy, 100, 30))[0]).program), policy


def test_a_score_pass_of_kept_logits_runs_its_own_programs():
    """A score kernel that reads no K or V (TOVA's: the kept logits and row statistics) runs its
    own programs per row (geometry.score_splits: 5 off the GPU, against the statistics pass's
    3); one that reads the cache (SnapKV, KeyDiff) runs the statistics pass's off the GPU, and
    on the GPU, once a launch has taught its occupancy, its own whole waves
    (compiler.score_programs). The kept sets stay the reference's."""
    from tritonkv.compiler import compile_policy, prepare, score_programs
    g = torch.Generator().manual_seed(5)
    # 2560 tokens: TOVA's 10 tiles of 256 split 5 ways, the others' 40 tiles of 64 three ways
    b = 2 if CUDA else 1   # the interpreter: programs per row do not depend on the rows
    keys, values = torch.randn(b, 2, 2560, 64, generator=g), torch.randn(b, 2, 2560, 64, generator=g)
    queries = torch.randn(b, 4, 32, 64, generator=g)
    for name, own in (("tova", True), ("snapkv", False), ("keydiff", False)):
        policy = preset(name)
        assert compare(keys, values, queries, policy, 0.2)
        lowered, alloc = lower(policy, allocate(policy, 2560, resolve_budget(0.2, 2560)))
        compiled, inputs = compile_policy(lowered), to_device(keys, values, queries)
        call = prepare(compiled, alloc, *inputs, 0, (), True)
        grids = {kernel_name(launch.fn): launch.grid for launch in call.launches}
        score = grids.get("score_heads", grids.get("score"))   # TOVA's heads are reduced in its score kernel
        if DEVICE == "cpu":
            assert (score[0], grids["stats_0"][0]) == ((5, 3) if own else (3, 3)), (name, grids)
            assert score_programs(compiled, *inputs) == (None if not own else (5, 2)), name
        elif own:
            assert score[0] >= grids["stats_0"][0], (name, grids)
        else:   # compare() above launched it: the score kernel's own waves where they differ
            waves = score_programs(compiled, *inputs)
            assert score == ((waves[0], grids["stats_0"][1]) if waves else grids["stats_0"][:2]), (name, grids)


def test_window_rows_are_copied_whoever_holds_them():
    """With the gather fused into select, the forced windows' rows are copied in equal shares
    by a row's programs (kernels/select.py SPREAD_WINDOWS): H2O's recency half (half the kept
    rows, all in the row's last chunk) and NACL's sinks and recent window. On the GPU a row of
    4096 tokens has several select programs (one here, in the interpreter); the kept rows
    stay the reference's, and the results' K / V rows are those the indices name."""
    g = torch.Generator().manual_seed(11)
    n = 4096 if CUDA else 1031   # one select program per row in the interpreter at any length
    keys, values = torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 48, generator=g)
    queries = torch.randn(1, 4, 16, 64, generator=g)
    for policy in (policies.h2o(), policies.nacl(sinks=8, proxy_window=16)):
        for spread in ("1", "0"):
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("TRITONKV_SPREAD_WINDOWS", spread)
                compare(keys, values, queries, policy, 0.3)


@pytest.mark.parametrize("name", ["keydiff", "tova", "snapkv"])
def test_rows_gathered_by_select_or_after_it(name, monkeypatch):
    """Select copies the kept rows itself (the per-head selections' default;
    TRITONKV_FUSED_GATHER=1) or writes the indices and a gather launch copies the rows (the
    default where the heads share one selection, TOVA; =0). Either path's kept sets and rows are
    the reference's and the other path's, an Evictor (planned on a GPU, from its second call)
    returns them too, and a value the switch does not take is refused by name."""
    from tritonkv.compiler import compile_policy, fused_gather
    from tritonkv.runtime import Evictor
    g = torch.Generator().manual_seed(3)
    # the interpreter: fewer tiles and rows (a select program per row), the same launches
    b, n, k = (2, 1031, 300) if CUDA else (1, 401, 120)
    keys, values = torch.randn(b, 2, n, 64, generator=g), torch.randn(b, 2, n, 48, generator=g)
    queries = torch.randn(b, 8, 64, 64, generator=g)
    policy = policies.PRESETS[name]()
    program = compile_policy(policy).program
    fused = fused_gather(program)
    assert fused == (name != "tova")
    dev = to_device(keys, values, queries if policy.needs_queries else None)
    default = evict_compiled(*dev, policy, k, 0)
    monkeypatch.setenv("TRITONKV_FUSED_GATHER", "0" if fused else "1")
    assert fused_gather(program) != fused
    compare(keys, values, queries if policy.needs_queries else None, policy, k)
    evictor = Evictor(policy, k, backend="triton")
    for _ in range(2):
        out = evictor(dev[0], dev[1], queries=dev[2])
        for got, want in zip((out.indices, out.keys, out.values), (default.indices, default.keys, default.values)):
            assert torch.equal(got.cpu(), want.cpu()), name
    monkeypatch.setenv("TRITONKV_FUSED_GATHER", "yes")
    with pytest.raises(ValueError, match="TRITONKV_FUSED_GATHER: expected 0 or 1"):
        fused_gather(program)


@pytest.mark.parametrize("policy", [
    policies.nacl(sinks=8, proxy_window=16),
    tkv.sink(4) | tkv.top(-tkv.key_norm(), share=0.5) | tkv.top(tkv.value_norm()),
    tkv.recent(8) | tkv.sample(-tkv.key_norm().normalize(), temperature=0.5),
    tkv.sink(1) | tkv.sample(tkv.value_norm(), temperature=2.0),
], ids=["nacl", "two-tops", "sample-normalized", "sample-only"])
def test_last_clause_keys_are_drawn_once(policy, monkeypatch):
    """Select stores its last clause's keys in the clause's slot in its first pass and reads them
    in the passes after it and in the compaction (kernels/select.py cached_clause): a sample
    clause's noise is drawn once, not in each of its six passes. The kept sets are the
    reference's with the keys stored and without (TRITONKV_CACHE_KEYS=0), on rows long enough
    for several select programs per row on a GPU; the launch stores the last clause's keys."""
    import tritonkv.compiler as compiler
    g = torch.Generator().manual_seed(5)
    # the interpreter: rows past a 512-token scan block, fewer tiles, one batch row (a select program per row)
    b, n = (2, 12289) if DEVICE == "cuda" else (1, 771)
    keys, values = torch.randn(b, 2, n, 64, generator=g), torch.randn(b, 2, n, 32, generator=g)
    queries = torch.randn(b, 4, 16, 64, generator=g)
    cached, launch = [], compiler.select_launch

    def spy(*args, **kwargs):
        out = launch(*args, **kwargs)
        cached.append(out[2]["CACHED"])
        return out
    monkeypatch.setattr(compiler, "select_launch", spy)
    clauses = len(lower(policy, allocate(policy, n, n // 3))[0].selective)
    for setting in ("1", "0"):
        monkeypatch.setenv("TRITONKV_CACHE_KEYS", setting)
        compare(keys, values, queries, policy, n // 3, seed=7)
    assert cached == [clauses - 1, -1]


STATS_POLICIES = {"snapkv": lambda: policies.snapkv(window=1, kernel=5), "keydiff": policies.keydiff,
                  "keydiff_knorm": policies.keydiff_knorm, "h2o": policies.h2o, "tova": policies.tova,
                  "nacl": lambda: policies.nacl(sinks=2, proxy_window=0.01)}


@settings(max_examples=16, deadline=None)
@given(n=st.sampled_from([1, 31, 301, 1030 if CUDA else 700]), d=st.sampled_from([64, 80, 128, 256]),
       group=st.sampled_from([1, 4]), name=st.sampled_from(sorted(STATS_POLICIES)), seed=st.integers(0, 2**16))
def test_statistics_tile_the_tokens_without_halo(n, d, group, name, seed):
    """Statistics read each token alone (codegen.own_tiles), so their programs tile the tokens
    of their score tiles without the halo's overlap: SnapKV's pooled score (halo 2), whose
    statistics programs then end mid-tile, and the policies without a halo keep the
    reference's kept sets."""
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, 2, n, d, generator=g), torch.randn(1, 2, n, d, generator=g)
    queries = torch.randn(1, 2 * group, 1 if n == 1 else 4, d, generator=g)
    compare(keys, values, queries, STATS_POLICIES[name](), 0.3, seed)


@settings(max_examples=12, deadline=None)
@given(n=st.sampled_from([1, 31, 301, 700]), d=st.sampled_from([64, 80, 128, 256]), fold=st.sampled_from([2, 4, 8]),
       name=st.sampled_from(["keydiff", "keydiff_knorm"]), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       seed=st.integers(0, 2**16))
def test_anchor_accumulator_folded(n, d, fold, name, dtype, seed):
    """TRITONKV_ANCHOR_FOLD sums groups of a tile's rows before they reach the anchor's accumulator
    (kernels/stats.anchor_tile): the anchor's float32 sums change order, the priorities stay within
    the reference's tolerance and the kept sets equal the reference's where no boundary is close."""
    from tritonkv.geometry import clear_geometry
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(1, 2, n, d, generator=g).to(dtype), torch.randn(1, 2, n, d, generator=g).to(dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITONKV_ANCHOR_FOLD", str(fold))
        clear_geometry()
        try:
            compare(keys, values, None, STATS_POLICIES[name](), 0.3, seed)
        finally:
            clear_geometry()


@pytest.mark.parametrize("name,window", [("snapkv", 164), ("h2o", 164), ("snapkv", 100), ("h2o", 100)])
def test_query_rows_over_several_chunks(name, window):
    """Windows whose query rows (G = 4, bf16 D = 128) span several chunks, one head's window per
    chunk (geometry.proxy_tiling): 164 rows pad to 256 (four 64 KB chunks, reloaded per tile in an
    unpipelined loop, kernels/proxy.py), 100 to 128; SnapKV and a causal H2O window as long keep the
    reference's kept sets."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 301, 128, generator=g).to(torch.bfloat16)
    values = torch.randn(1, 2, 301, 64, generator=g).to(torch.bfloat16)
    queries = torch.randn(1, 8, window, 128, generator=g).to(torch.bfloat16)
    policy = policies.snapkv(window=window) if name == "snapkv" else policies.h2o()
    compare(keys, values, queries, policy, 0.3)


def test_pooled_statistics_keep_the_score_tiles():
    """A statistic of a pooled value needs its neighbours: its level keeps the score's tiles."""
    from tritonkv import dsl
    from tritonkv.codegen import generate
    pooled = dsl.Policy((dsl.top(dsl.key_norm().pool(5).normalize() + dsl.anchor_similarity().normalize()),))
    program = generate(pooled)
    assert not all(program.own_tiles)
    assert any(program.own_tiles)
    assert all(generate(getattr(policies, name)()).own_tiles
               for name in ("snapkv", "keydiff", "keydiff_knorm", "h2o", "tova", "nacl", "chunkkv", "adakv"))


def _score_launches(policy, keys, values, queries, named=()):
    """(slots as the launches leave them, the kernels' names) of one prepared call."""
    from tritonkv.compiler import compile_policy, prepare
    from tritonkv.compiler import run as run_call
    lowered, alloc = lower(policy, allocate(policy, keys.shape[2], max(1, keys.shape[2] // 3)))
    call = prepare(compile_policy(lowered), alloc, keys, values, queries, 0, named, True)
    names = [kernel_name(step.fn) for step in call.launches]
    call.launches = call.launches[:names.index("select")]   # select and what reads its indices left out
    run_call(call)
    return call.priorities.clone(), names[:len(call.launches)]


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), group=st.sampled_from([1, 2, 4]),
       n=st.sampled_from([3, 17, 301, 1024 if CUDA else 700]), d=st.sampled_from([64, 80, 128, 256]),
       reduce=st.sampled_from(["mean", "sum", "max"]), seed=st.integers(0, 2 ** 16))
def test_heads_reduced_in_the_score_kernel_equal_the_transform(b, h, group, n, d, reduce, seed):
    """A score that reads no cache and whose every slot is head-reduced (TOVA, a reduced signal)
    runs ``score_heads``: one program row per batch row that reduces the heads itself, with no
    transform launch. Its slots equal the score kernel's followed by the transform
    (``TRITONKV_SCORE_HEADS=0``), bit for bit: the same float32 sums in the same head order
    (NaN as -inf; a -0.0 may become +0.0, which select ranks the same), in the rows select ranks:
    its selection is shared, so the fused kernel writes each batch row's head 0 alone. Rows of 3
    tokens and more: a budget that keeps every token ranks nothing."""
    from tritonkv.geometry import clear_geometry
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    queries = torch.randn(b, h * group, 1, d, generator=g)
    signal = torch.randn(b, h, n, generator=g)
    signal[signal > 1.5] = float("nan")
    score = tkv.proxy_attention(window=1, causal=False, reduce="mean", group_reduce="mean")
    k, v, q, sg = to_device(keys, values, queries, signal)
    cases = [(tkv.recent(1) | tkv.top(score, head_reduce=reduce), q, ()),
             (tkv.dsl.as_policy(tkv.top(tkv.signal("s"), head_reduce=reduce)), None, (sg,))]
    for policy, q_or_none, named in cases:
        got = {}
        for fused in ("1", "0"):
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("TRITONKV_SCORE_HEADS", fused)
                clear_geometry()
                got[fused] = _score_launches(policy, k, v, q_or_none, named)
        clear_geometry()
        (fused_slots, fused_names), (plain_slots, plain_names) = got["1"], got["0"]
        assert "score_heads" in fused_names and "transform" not in fused_names, fused_names
        assert "score" in plain_names and "transform" in plain_names, plain_names
        ranked = (slice(None), slice(None, None, h))    # each batch row's head 0
        assert torch.equal(fused_slots[ranked] + 0.0, plain_slots[ranked] + 0.0), policy   # + 0.0: -0.0 as +0.0
