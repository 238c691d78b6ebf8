"""In-place compaction of kept rows (tritonkv.kernels.compact) against reference.gather_rows:
a copy, so equal exactly, across shapes, head dims, dtypes, kept sets (none dropped, all but one,
runs of drops at the front / back), programs per row (the stash between programs), and buffers
that are strided views of a larger storage (the stacked layers of StaticEvictingCache)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonkv import reference
from tritonkv.kernels.compact import compact_in_place

from .devices import DEVICE
from .strategies import DTYPES, HEAD_DIMS, examples


@st.composite
def kept_sets(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    n = draw(st.one_of(st.integers(1, 70), st.integers(120, 700)))
    kind = draw(st.sampled_from(["random", "all", "one dropped", "front dropped", "back dropped"]))
    kept = n if kind == "all" else max(1, n - 1) if kind == "one dropped" else draw(st.integers(1, n))
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.sampled_from([d, 64]))
    programs = draw(st.integers(0, 4))
    seed = draw(st.integers(0, 2 ** 31))
    return b, h, n, kept, kind, d, dv, programs, seed


def indices_of(case):
    b, h, n, kept, kind, _, _, _, seed = case
    g = torch.Generator().manual_seed(seed)
    if kind == "front dropped":
        rows = [torch.arange(n - kept, n)] * (b * h)
    elif kind == "back dropped":
        rows = [torch.arange(kept)] * (b * h)
    else:
        rows = [torch.sort(torch.randperm(n, generator=g)[:kept]).values for _ in range(b * h)]
    return torch.stack(rows).view(b, h, kept).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(case=kept_sets())
@settings(max_examples=examples(12), deadline=None)
def test_compact_in_place_matches_the_gather(case, dtype):
    b, h, n, kept, _, d, dv, programs, seed = case
    g = torch.Generator().manual_seed(seed + 1)
    # a strided view, as a layer of stacked storage: [2, B, H, N + 3, D][1, :, :, :N]
    storage_k = torch.randn(2, b, h, n + 3, d, generator=g).to(dtype).to(DEVICE)
    storage_v = torch.randn(2, b, h, n + 3, dv, generator=g).to(dtype).to(DEVICE)
    keys, values = storage_k[1, :, :, :n], storage_v[1, :, :, :n]
    index = indices_of(case)
    want_k, want_v = reference.gather_rows(keys, index), reference.gather_rows(values, index)
    untouched = storage_k[0].clone(), storage_k[1, :, :, n:].clone(), index.clone()
    compact_in_place(index, keys, values, programs)
    assert torch.equal(keys[:, :, :kept], want_k)
    assert torch.equal(values[:, :, :kept], want_v)
    # nothing outside the view's rows is written, and the indices are not modified
    for before, after in zip(untouched, (storage_k[0], storage_k[1, :, :, n:], index)):
        assert torch.equal(before, after)


def test_compact_in_place_with_nothing_kept_is_a_no_op():
    keys = torch.randn(1, 2, 5, 64, device=DEVICE)
    before = keys.clone()
    compact_in_place(torch.empty(1, 2, 0, dtype=torch.int64, device=DEVICE), keys, keys.clone())
    assert torch.equal(keys, before)


@pytest.mark.skipif(DEVICE != "cuda", reason="many programs per row run at once only on a GPU")
def test_compact_in_place_long_rows_on_the_gpu():
    """Rows long enough for many concurrent programs per row (the GPU's choice), each dropping
    a few tokens spread over the row: every program's stash is used while others write."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, n, d = 8, 8, 13108, 64
    keys = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    values = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    drop = torch.rand(b, h, n, device="cuda", generator=g).argsort(-1)[..., :64]
    kept = torch.ones(b, h, n, dtype=torch.bool, device="cuda").scatter_(-1, drop, False)
    index = reference.kept_indices(kept)
    want_k, want_v = reference.gather_rows(keys, index), reference.gather_rows(values, index)
    compact_in_place(index, keys, values)
    assert torch.equal(keys[:, :, :n - 64], want_k) and torch.equal(values[:, :, :n - 64], want_v)
