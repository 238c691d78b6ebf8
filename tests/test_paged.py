"""tkv.paged.evict against tkv.evict on the dense gather of the same pages: every sequence keeps
exactly what evict keeps on its own dense copy (same backend: the compiled kernels read the same
values in the same tiles through the block table, so selections compare exactly), compacted in
place into its first pages; nothing else in the pool changes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tritonkv as tkv
from tritonkv import paged, policies

from .checks import named_kwargs
from .devices import CUDA, DEVICE
from .strategies import examples

PRESETS = {name: make() for name, make in policies.PRESETS.items() if name != "adakv"}   # AdaKV: issue 21 item 5
PRESETS["snapkv+sample"] = policies.COMPOSITES["snapkv+sample"]
WINDOW = 64   # proxy queries per sequence: the presets' default windows


class Pool:
    """A shuffled page pool holding ``lengths`` tokens per sequence, and the dense truth."""

    def __init__(self, lengths, page, heads=2, d=64, dv=48, layout="NHD", spare=3, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.lengths, self.page, self.heads, self.layout = list(lengths), page, heads, layout
        need = [-(-n // page) for n in lengths]
        num_pages = sum(need) + spare
        shape = (num_pages, page, heads) if layout == "NHD" else (num_pages, heads, page)
        self.k = torch.randn(*shape, d, generator=g).to(dtype).to(DEVICE)
        self.v = torch.randn(*shape, dv, generator=g).to(dtype).to(DEVICE)
        order = torch.randperm(num_pages, generator=g)
        self.table = torch.full((len(lengths), max(need) + 1), -7, dtype=torch.int32)   # -7: unused entries
        at = 0
        for b, count in enumerate(need):
            self.table[b, :count] = order[at:at + count].int()
            at += count
        self.table = self.table.to(DEVICE)
        self.queries = torch.randn(len(lengths), 2 * heads, WINDOW, d, generator=g).to(dtype).to(DEVICE)

    def dense(self, pages, b, n=None):
        """Sequence b's first n tokens of ``pages`` as [1, H, n, D]."""
        n = self.lengths[b] if n is None else n
        x = pages[self.table[b, : -(-self.lengths[b] // self.page)].long()]
        x = x.reshape(-1, self.heads, x.shape[-1]) if self.layout == "NHD" else \
            x.transpose(0, 1).reshape(self.heads, -1, x.shape[-1]).transpose(0, 1)
        return x[:n].transpose(0, 1).unsqueeze(0)

    def slots(self, b, n):
        """A bool mask of the pool's token slots [num_pages, page] that sequence b's first n tokens use."""
        mask = torch.zeros(self.k.shape[0], self.page, dtype=torch.bool)
        pages = self.table[b].cpu().long()
        for t in range(n):
            mask[pages[t // self.page], t % self.page] = True
        return mask


def run_both(pool: Pool, policy, budget, backend, seed=5):
    """(paged result, dense results per sequence) with the pool evicted in place."""
    kwargs = [dict(queries=pool.queries[b:b + 1] if policy.needs_queries else None,
                   **named_kwargs(policy, pool.dense(pool.k, b), seed + b)) for b in range(len(pool.lengths))]
    for kw in kwargs:   # directions are per head, one set for the batch
        kw["directions"] = kwargs[0]["directions"]
    want = [tkv.evict(pool.dense(pool.k, b), pool.dense(pool.v, b), policy, budget, seed=seed, backend=backend,
                      **kw) for b, kw in enumerate(kwargs)]
    signals = {name: torch.cat([torch.nn.functional.pad(kw["signals"][name], (0, max(pool.lengths) - n))
                                for kw, n in zip(kwargs, pool.lengths)]) for name in policy.signals}
    directions = {name: kwargs[0]["directions"][name] for name in policy.directions}
    got = paged.evict(pool.k, pool.v, pool.table, torch.tensor(pool.lengths, dtype=torch.int32), policy, budget,
                      queries=pool.queries if policy.needs_queries else None, seed=seed, backend=backend,
                      signals=signals or None, directions=directions or None, layout=pool.layout)
    return got, want


def check(pool: Pool, got, want, before_k, before_v):
    for b, w in enumerate(want):
        k = w.n_kept
        assert int(got.seq_lens[b]) == k
        assert torch.equal(got.positions[b, :, :k], w.indices[0]), f"sequence {b}: kept positions differ"
        assert bool((got.positions[b, :, k:] == -1).all())
        assert torch.equal(pool.dense(pool.k, b, k), w.keys), f"sequence {b}: keys not compacted in order"
        assert torch.equal(pool.dense(pool.v, b, k), w.values), f"sequence {b}: values not compacted in order"
        first, last = -(-k // pool.page), -(-pool.lengths[b] // pool.page)
        assert got.freed_counts[b] == last - first
    freed = torch.cat([pool.table[b, -(-w.n_kept // pool.page): -(-n // pool.page)]
                       for b, (w, n) in enumerate(zip(want, pool.lengths))])
    assert torch.equal(got.freed_pages, freed)
    written = torch.zeros(pool.k.shape[0], pool.page, dtype=torch.bool)
    for b, w in enumerate(want):
        written |= pool.slots(b, w.n_kept)
    for after, before in ((pool.k, before_k), (pool.v, before_v)):
        a, z = (after, before) if pool.layout == "NHD" else (after.transpose(1, 2), before.transpose(1, 2))
        assert torch.equal(a.cpu()[~written], z.cpu()[~written]), "a slot outside the kept ones changed"


@pytest.mark.parametrize("name", sorted(PRESETS))
@given(page=st.sampled_from([1, 16, 64, 128]), data=st.data())
@settings(max_examples=examples(2))
def test_paged_evict_keeps_what_dense_evict_keeps(name, page, data):
    policy = PRESETS[name]
    low = WINDOW if policy.needs_queries else 1
    top = max(low + 16, min(3 * page, 128))   # 1 .. 3 pages, within what the interpreter runs quickly
    lengths = data.draw(st.lists(st.integers(low, top), min_size=1, max_size=2), label="lengths")
    budget = data.draw(st.sampled_from([0.3, 0.5, 7, 1.0]), label="budget")
    layout = data.draw(st.sampled_from(["NHD", "HND"]), label="layout")
    pool = Pool(lengths, page, layout=layout, seed=data.draw(st.integers(0, 2 ** 16), label="seed"))
    before_k, before_v = pool.k.clone(), pool.v.clone()
    got, want = run_both(pool, policy, budget, "triton")
    check(pool, got, want, before_k, before_v)


@pytest.mark.parametrize("layout, dtype", [("NHD", torch.float16), ("HND", torch.bfloat16)])
def test_reference_backend_and_half_dtypes(layout, dtype):
    for backend in ("reference", "triton"):
        pool = Pool([70, 129], 16, layout=layout, dtype=dtype, d=80, seed=3)
        before_k, before_v = pool.k.clone(), pool.v.clone()
        got, want = run_both(pool, PRESETS["snapkv"], 0.4, backend)
        check(pool, got, want, before_k, before_v)


def test_everything_kept_moves_nothing_and_frees_nothing():
    pool = Pool([20, 50], 16)
    before = pool.k.clone()
    got = paged.evict(pool.k, pool.v, pool.table, [20, 50], policies.knorm(), 1.0)
    assert got.seq_lens.tolist() == [20, 50] and got.freed_counts.tolist() == [0, 0]
    assert torch.equal(pool.k, before) and got.freed_pages.numel() == 0


def errors_of(**change):
    pool = Pool([40, 20], 16)
    args = dict(k_pages=pool.k, v_pages=pool.v, block_table=pool.table, seq_lens=[40, 20],
                policy=policies.knorm(), budget=8)
    args.update(change)
    return args


@pytest.mark.parametrize("change, error, match", [
    (dict(block_table=torch.zeros(2, 4)), TypeError, "block_table: expected an int32 tensor"),
    (dict(seq_lens=[40]), ValueError, "seq_lens: 1 lengths for a block table of 2"),
    (dict(seq_lens=[40, 0]), ValueError, r"seq_lens\[1\] = 0"),
    (dict(seq_lens=[40, 200]), ValueError, r"seq_lens\[1\] = 200: needs 13 pages"),
    (dict(seq_lens=[40.0, 20]), TypeError, "seq_lens: expected"),
    (dict(layout="NDH"), ValueError, "layout: expected one of"),
    (dict(policy=policies.adakv()), ValueError, "per-head budgets"),
    (dict(budget=0), ValueError, "budget"),
    (dict(backend="cuda"), ValueError, "backend: expected"),
])
def test_bad_arguments_are_named(change, error, match):
    args = errors_of(**change)
    with pytest.raises(error, match=match):
        paged.evict(**args)


def test_block_table_entries_are_checked_before_any_kernel():
    pool = Pool([40, 20], 16)
    before = pool.k.clone()
    bad = pool.table.clone()
    bad[1, 0] = 999
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 999: outside the pool's"):
        paged.evict(pool.k, pool.v, bad, [40, 20], policies.knorm(), 8)
    bad = pool.table.clone()
    bad[1, 0] = bad[0, 2]
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = .*already used by block_table\[0, 2\]"):
        paged.evict(pool.k, pool.v, bad, [40, 20], policies.knorm(), 8)
    with pytest.raises(ValueError, match=r"v_pages: expected \[num_pages, page_size, H_kv\] = .* like k_pages"):
        paged.evict(pool.k, pool.v[:, :8], pool.table, [40, 20], policies.knorm(), 8)
    with pytest.raises(TypeError, match="v_pages: dtype"):
        paged.evict(pool.k, pool.v.half(), pool.table, [40, 20], policies.knorm(), 8)
    with pytest.raises(ValueError, match="queries: batch 1 differs"):
        paged.evict(pool.k, pool.v, pool.table, [40, 20], policies.snapkv(), 8, queries=pool.queries[:1])
    assert torch.equal(pool.k, before)


@pytest.mark.skipif(not CUDA, reason="a GPU seq_lens only exists on a GPU")
def test_a_gpu_seq_lens_is_refused():
    pool = Pool([40, 20], 16)
    with pytest.raises(ValueError, match="seq_lens: expected the host copy"):
        paged.evict(pool.k, pool.v, pool.table, torch.tensor([40, 20], dtype=torch.int32, device="cuda"),
                    policies.knorm(), 8)


def test_readme_example_decodes_like_the_dense_evicted_cache():
    """README "Paged KV caches": one call, freed pages back to the free list, attention over the
    compacted pages equal to attention over tkv.evict's dense result."""
    page, heads, dim = 16, 2, 64
    g = torch.Generator().manual_seed(0)
    k_pages = torch.randn(40, page, heads, dim, generator=g).to(DEVICE)
    v_pages = torch.randn(40, page, heads, dim, generator=g).to(DEVICE)
    free = list(range(40))
    lengths = [30, 100]
    table = torch.zeros(2, 8, dtype=torch.int32)
    for b, n in enumerate(lengths):
        table[b, : -(-n // page)] = torch.tensor([free.pop() for _ in range(-(-n // page))])
    table = table.to(DEVICE)
    policy = policies.knorm()
    dense = [tkv.evict(k_pages[table[b, : -(-n // page)].long()].flatten(0, 1)[:n].transpose(0, 1)[None],
                       v_pages[table[b, : -(-n // page)].long()].flatten(0, 1)[:n].transpose(0, 1)[None],
                       policy, 0.25, backend="triton") for b, n in enumerate(lengths)]
    out = paged.evict(k_pages, v_pages, table, lengths, policy, budget=0.25, backend="triton")
    free.extend(out.freed_pages.tolist())
    assert out.seq_lens.tolist() == [8, 25] and len(free) == 40 - 1 - 2
    query = torch.randn(heads, 1, dim, generator=g).to(DEVICE)
    for b, n in enumerate(out.seq_lens.tolist()):
        pages = table[b, : -(-n // page)].long()
        k = k_pages[pages].flatten(0, 1)[:n].transpose(0, 1)
        v = v_pages[pages].flatten(0, 1)[:n].transpose(0, 1)
        got = torch.nn.functional.scaled_dot_product_attention(query, k, v)
        want = torch.nn.functional.scaled_dot_product_attention(query, dense[b].keys[0], dense[b].values[0])
        assert torch.equal(got, want)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["knorm", "snapkv", "streaming_llm"])
def test_a_call_is_captured_in_a_cuda_graph(name):
    """For fixed lengths, paged.evict(check=False) records into one CUDA graph (no host sync), and a
    replay on refilled pools keeps what an eager call keeps on the same pools."""
    policy = PRESETS[name]
    lengths = [300, 1000, 77]
    pool = Pool(lengths, 16, dtype=torch.bfloat16)
    k0, v0 = pool.k.clone(), pool.v.clone()
    kwargs = dict(queries=pool.queries if policy.needs_queries else None, check=False)
    eager = paged.evict(pool.k, pool.v, pool.table, lengths, policy, 0.25, **kwargs)
    want_k, want_v = pool.k.clone(), pool.v.clone()
    pool.k.copy_(k0), pool.v.copy_(v0)
    stream = torch.cuda.Stream()   # warm-up outside the capture (compiles, plans, allocates)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        paged.evict(pool.k, pool.v, pool.table, lengths, policy, 0.25, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = paged.evict(pool.k, pool.v, pool.table, lengths, policy, 0.25, **kwargs)
    pool.k.copy_(k0), pool.v.copy_(v0)
    graph.replay()
    torch.cuda.synchronize()
    assert captured.seq_lens.tolist() == eager.seq_lens.tolist()
    assert torch.equal(captured.positions, eager.positions) and torch.equal(captured.freed_pages, eager.freed_pages)
    assert torch.equal(pool.k, want_k) and torch.equal(pool.v, want_v)


def counted_launches(monkeypatch) -> list:
    """Patch the launch helper (kernels/launch.py) wherever tritonkv imported it: the names of the
    kernels launched from now on, in order."""
    import sys

    import tritonkv.kernels.pages  # noqa: F401  (imported on a first call: patched here too)
    import tritonkv.paged_plan  # noqa: F401
    from tritonkv.kernels import launch as launch_module
    original, names = launch_module.launch, []

    def counting(fn, *args, **kwargs):
        names.append(getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", repr(fn)))
        return original(fn, *args, **kwargs)
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("tritonkv") and module is not launch_module and \
                getattr(module, "launch", None) is original:
            monkeypatch.setattr(module, "launch", counting)
    return names


# the presets whose statistics, score and select run once for a whole batch (tritonkv.paged_plan),
# and what one call launches: those stages, then compaction of the key and value pools
BATCHED = {"knorm": 4, "streaming_llm": 2, "snapkv": 6, "keydiff": 6, "random": 4, "h2o": 6, "qfilters": 4}


@pytest.mark.parametrize("name", sorted(BATCHED))
def test_a_batch_launches_as_many_kernels_as_one_sequence(name, monkeypatch):
    """Eight sequences of different lengths (two that keep everything) launch what one sequence
    launches, and keep what their dense copies keep."""
    policy = PRESETS[name]
    evict, launched, names = paged.evict, {}, counted_launches(monkeypatch)

    def counted_evict(*args, **kwargs):   # the paged call's launches only, not the dense ones
        start = len(names)
        out = evict(*args, **kwargs)
        launched[len(args[3])] = names[start:]
        return out
    monkeypatch.setattr(paged, "evict", counted_evict)
    for lengths in ([100], [64, 70, 100, 129, 160, 7, 81, 5]):
        lengths = [max(n, WINDOW) for n in lengths] if policy.needs_queries else lengths
        # the interpreter: one KV head (a select program per sequence and head; the launches per call do
        # not depend on the heads, test_paged_evict_keeps_what_dense_evict_keeps runs two)
        pool = Pool(lengths, 16, heads=2 if CUDA else 1, seed=len(lengths))
        before_k, before_v = pool.k.clone(), pool.v.clone()
        got, want = run_both(pool, policy, 8 if policy.needs_queries else 0.4, "triton")
        check(pool, got, want, before_k, before_v)
    assert len(launched[8]) == len(launched[1]) == BATCHED[name], launched


def test_a_repeat_call_reuses_its_plan(monkeypatch):
    """A second call with the same signature (an equal policy object, other pools of the same
    shapes) builds no plan, and keeps what the first call kept on the same values."""
    from tritonkv import paged_plan
    built = []
    plan = paged_plan.plan
    monkeypatch.setattr(paged_plan, "plan", lambda *a: built.append(1) or plan(*a))
    paged_plan.clear_plans()
    lengths = [64, 100, 70]
    pool = Pool(lengths, 16, seed=11)
    k0, v0 = pool.k.clone(), pool.v.clone()
    outs = []
    for _ in range(2):
        pool.k.copy_(k0), pool.v.copy_(v0)
        outs.append(paged.evict(pool.k, pool.v, pool.table, lengths, policies.snapkv(), 0.5, queries=pool.queries,
                                seed=3, backend="triton", check=False))
    assert len(built) == 1
    assert torch.equal(outs[0].positions, outs[1].positions) and torch.equal(outs[0].freed_pages, outs[1].freed_pages)
    assert outs[0].seq_lens.tolist() == outs[1].seq_lens.tolist() == [32, 50, 35]
    with pytest.raises(ValueError, match="seed"):   # a planned call still checks what can change
        paged.evict(pool.k, pool.v, pool.table, lengths, policies.snapkv(), 0.5, queries=pool.queries, seed=-1,
                    backend="triton")
