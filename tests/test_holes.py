"""Filling the dropped slots of a fixed buffer with the kept rows past the budget
(tritonkv.kernels.holes) against reference.hole_sources: a copy, so equal exactly, across
shapes, head dims, dtypes, kept sets (nothing past the budget kept, all of it, one row moved,
every slot below the budget dropped), positions or none, and buffers that are strided views of
a larger storage (the stacked layers of StaticEvictingCache). Also what the reference means:
the first n_kept slots hold the kept set, and a kept slot below n_kept never moves."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonkv import reference
from tritonkv.kernels.holes import fill_holes

from .devices import DEVICE
from .strategies import DTYPES, HEAD_DIMS, examples


@st.composite
def buffers(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kept = draw(st.one_of(st.integers(1, 40), st.integers(100, 400)))
    extra = draw(st.one_of(st.integers(1, 3), st.integers(4, 80)))   # interval: every step, or a few
    kind = draw(st.sampled_from(["random", "oldest dropped", "newest dropped", "one past kept", "all past kept"]))
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.sampled_from([d, 64]))
    seed = draw(st.integers(0, 2 ** 31))
    return b, h, kept, extra, kind, d, dv, seed


def indices_of(b, h, kept, extra, kind, seed):
    n = kept + extra
    g = torch.Generator().manual_seed(seed)
    if kind == "oldest dropped":        # every row past the budget moves
        rows = [torch.arange(extra, n)] * (b * h)
    elif kind == "newest dropped":      # nothing moves
        rows = [torch.arange(kept)] * (b * h)
    elif kind == "one past kept":
        rows = [torch.cat([torch.arange(kept - 1), torch.tensor([n - 1])])] * (b * h)
    elif kind == "all past kept":       # as many holes as slots past the budget (or every slot below it)
        past = min(extra, kept)
        rows = [torch.cat([torch.arange(kept - past), torch.arange(n - past, n)])] * (b * h)
    else:
        rows = [torch.sort(torch.randperm(n, generator=g)[:kept]).values for _ in range(b * h)]
    return torch.stack(rows).view(b, h, kept)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(case=buffers(), with_positions=st.booleans(), with_accumulated=st.booleans())
@settings(max_examples=examples(12), deadline=None)
def test_fill_holes_matches_the_reference(case, dtype, with_positions, with_accumulated):
    b, h, kept, extra, kind, d, dv, seed = case
    n = kept + extra
    g = torch.Generator().manual_seed(seed + 1)
    # a strided view, as a layer of stacked storage: [2, B, H, N + 3, D][1, :, :, :N]
    storage_k = torch.randn(2, b, h, n + 3, d, generator=g).to(dtype).to(DEVICE)
    storage_v = torch.randn(2, b, h, n + 3, dv, generator=g).to(dtype).to(DEVICE)
    storage_p = torch.randint(0, 1 << 40, (2, b, h, n + 3), generator=g).to(DEVICE)
    storage_a = torch.rand(2, b, h, n + 3, generator=g).to(DEVICE)
    keys, values, positions = storage_k[1, :, :, :n], storage_v[1, :, :, :n], storage_p[1, :, :, :n]
    accumulated = storage_a[1, :, :, :n]
    index = indices_of(b, h, kept, extra, kind, seed).to(DEVICE)
    source = reference.hole_sources(index)
    want = [reference.gather_rows(keys, source), reference.gather_rows(values, source), positions.gather(-1, source),
            accumulated.gather(-1, source)]
    untouched = [storage_k[0].clone(), storage_k[1, :, :, n:].clone(), index.clone()]
    storage_p_before, storage_a_before = storage_p.clone(), storage_a.clone()
    fill_holes(index, keys, values, positions if with_positions else None, accumulated if with_accumulated else None)
    assert torch.equal(keys[:, :, :kept], want[0])
    assert torch.equal(values[:, :, :kept], want[1])
    if with_positions:
        assert torch.equal(positions[:, :, :kept], want[2])
        assert torch.equal(storage_p[0], storage_p_before[0])
    else:
        assert torch.equal(storage_p, storage_p_before)
    if with_accumulated:
        assert torch.equal(accumulated[:, :, :kept], want[3])
        assert torch.equal(storage_a[0], storage_a_before[0]) and torch.equal(storage_a[1, :, :, n:],
                                                                               storage_a_before[1, :, :, n:])
    else:
        assert torch.equal(storage_a, storage_a_before)
    # nothing outside the view's first `kept` rows is written, and the indices are not modified
    for before, after in zip(untouched, (storage_k[0], storage_k[1, :, :, n:], index)):
        assert torch.equal(before, after)


@given(case=buffers())
@settings(max_examples=examples(20), deadline=None)
def test_hole_sources_hold_the_kept_set_and_move_only_rows_past_the_budget(case):
    b, h, kept, extra, kind, _, _, seed = case
    index = indices_of(b, h, kept, extra, kind, seed)
    source = reference.hole_sources(index)
    assert torch.equal(source.sort(-1).values, index)                  # the kept set, each row once
    slots = torch.arange(kept).expand_as(source)
    stays = torch.zeros(b, h, kept + extra, dtype=torch.bool).scatter_(-1, index, True)[..., :kept]
    assert torch.equal(source[stays], slots[stays])                     # kept slots below n_kept stay
    assert (source[~stays] >= kept).all()                               # only rows past it move
    assert int((source != slots).sum()) == int((index >= kept).sum())   # one move per kept row past it


def test_fill_holes_when_nothing_is_dropped_is_a_no_op():
    keys = torch.randn(1, 2, 5, 64, device=DEVICE)
    before = keys.clone()
    fill_holes(torch.arange(5, device=DEVICE).expand(1, 2, 5).contiguous(), keys, keys.clone())
    assert torch.equal(keys, before)


@pytest.mark.skipif(DEVICE != "cuda", reason="the GPU's shapes: long rows, the every-step eviction")
def test_fill_holes_long_rows_on_the_gpu():
    """The wide model's stacked layers at a 128K prompt's 10% budget, one token dropped per row."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, kept, d = 8, 8, 13107, 64
    n = kept + 1
    keys = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    values = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    positions = torch.arange(n, device="cuda").expand(b, h, n).contiguous()
    drop = torch.randint(0, n, (b, h, 1), device="cuda", generator=g)
    index = reference.kept_indices(torch.ones(b, h, n, dtype=torch.bool, device="cuda").scatter_(-1, drop, False))
    source = reference.hole_sources(index)
    want = reference.gather_rows(keys, source), reference.gather_rows(values, source), positions.gather(-1, source)
    fill_holes(index, keys, values, positions)
    assert torch.equal(keys[:, :, :kept], want[0]) and torch.equal(values[:, :, :kept], want[1])
    assert torch.equal(positions[:, :, :kept], want[2])
