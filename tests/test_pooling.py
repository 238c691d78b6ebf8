"""kernels/pooling.py: a slot pooled in place after the score kernel, from the edges the score
kernel stores, against the same float32 operations in PyTorch (bit for bit) and reference.pool1d."""

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tritonkv import reference
from tritonkv.kernels.launch import launch
from tritonkv.kernels.pooling import edge_floats, pool_launch, pool_segment, row_edges, store_edges

from .devices import CUDA, to_device
from .strategies import examples

TILE = 32


@triton.jit
def _edges_of(x_ptr, ws_ptr, lse_off, rows, q_rows, N, SEG: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """What the score kernel stores beside a pooled slot: a row's edges, tile by tile."""
    i_t = tl.program_id(0)
    i_row = tl.program_id(1)
    o_n = i_t * BLOCK + tl.arange(0, BLOCK)
    m = o_n < N
    x = tl.load(x_ptr + i_row * N + o_n, mask=m, other=0.0)
    store_edges(row_edges(ws_ptr, lse_off, rows, q_rows, i_row, N, SEG, HALF), x, o_n, m, SEG, HALF)


def pooled_as_the_tile_does(x, kernel: int, divisor: int, n_pool: int, w_zero: int):
    """kernels/proxy.py's FINISH in PyTorch, operation for operation: pool (0 outside [0, n_pool)),
    then the group mean's division, then the keys from w_zero on set to 0."""
    n = x.shape[-1]
    half = kernel // 2
    padded = torch.zeros(x.shape[0], n + 2 * half, dtype=torch.float32)
    padded[:, half: half + n_pool] = x[:, :n_pool]
    acc = padded[:, 0:n].clone()
    for j in range(1, kernel):
        acc = acc + padded[:, j: j + n]
    acc = acc / kernel
    if divisor != 1:
        acc = acc / divisor
    acc[:, w_zero:] = 0.0
    return acc


@given(n=st.one_of(st.integers(1, 70), st.integers(1000, 2600)), rows=st.integers(1, 3),
       kernel=st.sampled_from([3, 5, 7, 15]), divisor=st.sampled_from([1, 4, 7]),
       exclude=st.booleans(), w_share=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 31))
@settings(max_examples=examples(12))
@example(n=1, rows=1, kernel=3, divisor=1, exclude=True, w_share=1.0, seed=0)   # the window is every key
@example(n=2049, rows=2, kernel=5, divisor=4, exclude=True, w_share=1.0, seed=1)
def test_pooled_in_place_from_edges_matches_the_tile(n, rows, kernel, divisor, exclude, w_share, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, n, generator=gen) * torch.randint(0, 2, (rows, n), generator=gen).float()
    w = int(w_share * n) if exclude else 0
    half, seg = kernel // 2, pool_segment(n)
    slots = torch.full((2, rows, n), float("nan"))
    slots[1] = x   # slot 1 pooled: slot 0 must stay as it is
    lse_at, q_rows = 5, 3   # the attention's row statistics in the workspace: its edges right after them
    workspace = torch.full((lse_at + rows * q_rows + rows * edge_floats(n, kernel, seg),), float("nan"))
    slots, workspace, xd = to_device(slots, workspace, x.contiguous())
    launch(_edges_of, (triton.cdiv(n, TILE), rows), [xd, workspace, lse_at, rows, q_rows, n],
           dict(SEG=seg, HALF=half, BLOCK=TILE))
    assert workspace[:lse_at + rows * q_rows].isnan().all(), "the edges lie after the row statistics"
    fn, grid, args, constexprs = pool_launch(slots, workspace, workspace, 1, rows, n, w, lse_at, q_rows, 1, kernel,
                                             divisor, divisor != 1, exclude, 0, seg)
    launch(fn, grid, args, constexprs)
    got = slots.cpu()
    assert got[0].isnan().all(), "only the pooled slot is written"
    expected = pooled_as_the_tile_does(x, kernel, divisor, n - w, n - w if exclude else n)
    if CUDA:   # Triton divides with div.full.f32 (within 2 ulp), PyTorch exactly: two divisions
        torch.testing.assert_close(got[1], expected, rtol=5e-7, atol=0.0)
    else:
        assert torch.equal(got[1], expected)
    # and what reference.proxy_attention does: pool the prefix before the window alone (none where
    # the window is every key: then all are 0, as asserted above)
    if n > w:
        prefix = reference.pool1d(x[:, :n - w], kernel, "avg") / divisor
        torch.testing.assert_close(got[1][:, :n - w], prefix, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n, expected", [(1, 16), (130, 32), (8192, 1024), (1 << 20, 2048)])
def test_segments_are_an_eighth_of_a_short_row_within_bounds(n, expected):
    assert pool_segment(n) == expected and pool_segment(n, paged=True) == 2048
    assert edge_floats(n, 5, expected) == triton.cdiv(n, expected) * 4


def test_snapkv_can_pool_after_its_score_pass_and_h2o_and_max_pooling_cannot():
    from tritonkv import dsl
    from tritonkv.codegen import generate
    from tritonkv.policies import snapkv
    from tritonkv.policies.attention import h2o
    program = generate(snapkv())
    assert program.pooled == (0,) and program.halo == 2 and program.halo_pooled_after == 0
    assert generate(h2o()).pooled == ()
    assert generate(snapkv(pool_mode="max")).pooled == () and generate(snapkv(pool_mode="max")).halo_pooled_after == 2
    # inside another score the tile needs it pooled: the halo stays
    attention = dsl.proxy_attention(window=8, causal=True, pool=5, exclude_window=True)
    mixed = generate(dsl.top(attention + dsl.key_norm()) | dsl.top(attention))
    assert mixed.pooled == () and mixed.halo_pooled_after == 2


@pytest.mark.parametrize("name", ["snapkv", "snapkv+sample", "pyramidkv", "adakv"])
def test_pooling_after_the_score_pass_keeps_what_the_tile_keeps(name, monkeypatch):
    """TRITONKV_POOL_AFTER=1 against the in-tile pooling: the same kept sets (and the same float32
    priorities, so also under ties), dense at lengths of one to several pooling segments, and paged."""
    import tritonkv as tkv
    from tritonkv import geometry, paged_plan, policies

    from .test_paged import Pool, check, run_both
    policy = policies.COMPOSITES[name] if name in policies.COMPOSITES else policies.PRESETS[name]()
    gen = torch.Generator()
    results = {}
    for after in ("0", "1"):
        monkeypatch.setenv("TRITONKV_POOL_AFTER", after)
        geometry.clear_geometry()
        paged_plan.clear_plans()
        for n in (70, 300, 1100):
            gen.manual_seed(n)   # the same inputs for both settings
            k, v = (torch.randn(1, 2, n, 32, generator=gen) for _ in range(2))
            q = torch.randn(1, 4, 64, 32, generator=gen)
            k, v, q = to_device(k, v, q)
            # a new Evictor: plans under the setting of the moment (tkv.evict's would be reused)
            out = tkv.Evictor(policy, n // 5, backend="triton")(k, v, queries=q, seed=1)
            results.setdefault(n, []).append(out.indices.cpu())
        if name == "snapkv":   # paged: a batch of lengths, one launch of each stage
            pool = Pool([64, 300, 129], 16, heads=1, d=32, dv=32, seed=4)
            before_k, before_v = pool.k.clone(), pool.v.clone()
            got, want = run_both(pool, policy, 20, "triton")
            check(pool, got, want, before_k, before_v)
    geometry.clear_geometry()
    paged_plan.clear_plans()
    for n, (tile, after) in results.items():
        assert torch.equal(tile, after), n


