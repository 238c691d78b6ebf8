"""Budget arithmetic: counts per head, per clause, per layer."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tritonkv as tkv
from tritonkv.budget import Allocation, allocate, fraction_to_count, pyramid_budgets, resolve_budget

from .devices import DEVICE

forced_counts = st.one_of(st.integers(0, 300), st.floats(0.001, 1.0))


@st.composite
def policies_with_windows(draw):
    clauses = []
    for _ in range(draw(st.integers(0, 2))):
        n = draw(forced_counts)
        clauses.append(draw(st.sampled_from([tkv.sink(n), tkv.recent(n), tkv.recent()])))
    for _ in range(draw(st.integers(0, 3))):
        share = draw(st.one_of(st.none(), st.floats(0.05, 0.4)))
        clauses.append(tkv.top(tkv.key_norm(), share=share))
    if not clauses:
        clauses.append(tkv.top(tkv.key_norm()))
    return tkv.Policy(tuple(clauses))


@given(policies_with_windows(), st.integers(1, 500), st.data())
def test_allocation_fills_the_budget_in_order(policy, n, data):
    k = data.draw(st.integers(1, n))
    a = allocate(policy, n, k)
    assert a.n_sink >= 0 and a.n_recent >= 0 and all(c >= 0 for c in a.clause_counts)
    assert a.n_sink + a.n_recent <= n               # the two windows never overlap
    assert a.total == k                             # the fill rule: every head keeps exactly k


def test_allocation_examples():
    nacl = tkv.policies.nacl()
    a = allocate(nacl, 10000, 2000)
    assert (a.n_sink, a.n_recent) == (256, 100)
    assert a.clause_counts == (round(1644 * 12 / 19), 1644 - round(1644 * 12 / 19))
    # the budget caps forced windows, in the order written
    assert allocate(tkv.sink(4) | tkv.recent(64) | tkv.top(tkv.key_norm()), 100, 10).clause_counts == (0,)
    assert allocate(tkv.sink(4) | tkv.recent(64), 100, 10).n_recent == 6
    assert allocate(tkv.recent(64) | tkv.sink(4), 100, 10).n_sink == 0
    # the fill rule: windows that leave budget over hand it to the latest tokens
    assert allocate(tkv.sink(4) | tkv.recent(8), 100, 30) == Allocation(4, 26, ())
    # windows larger than the cache: sinks first, recent gets the rest, no overlap
    a = allocate(tkv.sink(8) | tkv.recent(8), 10, 10)
    assert (a.n_sink, a.n_recent) == (8, 2)
    # streaming: recent() takes everything after the sinks
    assert allocate(tkv.policies.streaming_llm(), 1000, 100).n_recent == 96
    # open shares split what explicit shares leave
    p = tkv.top(tkv.key_norm(), share=0.5) | tkv.top(tkv.position()) | tkv.top(tkv.random())
    assert allocate(p, 1000, 100).clause_counts == (50, 25, 25)


@pytest.mark.parametrize("budget,n,expected", [
    (0.5, 10, 5), (0.5, 5, 3), (0.1, 30, 3), (1.0, 7, 7), (0.01, 10, 1), (3, 10, 3), (50, 10, 10),
])
def test_resolve_budget(budget, n, expected):
    assert resolve_budget(budget, n) == expected


@pytest.mark.parametrize("budget,error", [
    (0, ValueError), (-1, ValueError), (0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError),
    (float("inf"), ValueError), (True, TypeError), ("0.5", TypeError), (None, TypeError),
])
def test_bad_budgets_name_the_argument(budget, error):
    with pytest.raises(error, match="budget"):
        resolve_budget(budget, 10)


def test_fraction_rounds_half_up():
    assert fraction_to_count(0.5, 5) == 3 and fraction_to_count(0.25, 2) == 1 and fraction_to_count(0.1, 30) == 3


@given(st.integers(1, 100_000), st.integers(1, 80), st.floats(1.0, 50.0))
def test_pyramid_budgets_keep_the_total_and_fall(budget, layers, beta):
    out = pyramid_budgets(budget, layers, beta)
    assert len(out) == layers
    assert sum(out) == budget * layers or min(out) == 1  # exact unless the floor of 1 token binds
    assert all(a >= b - 1 for a, b in zip(out, out[1:]))  # non-increasing up to rounding


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_windows_that_cannot_fill_the_budget_are_filled_with_the_latest_tokens(backend):
    """Issue 14 item 8: sink(4) at budget 10 keeps 10 tokens (4 sinks + the last 6), not 4."""
    keys = torch.randn(1, 2, 40, 16, device=DEVICE if backend == "triton" else "cpu")
    out = tkv.evict(keys, keys, tkv.sink(4), 10, backend=backend)
    expected = list(range(4)) + list(range(34, 40))
    assert out.indices.tolist() == [[expected, expected]]
    out = tkv.evict(keys, keys, tkv.recent(3) | tkv.sink(2), 0.25, backend=backend)   # 10 of 40
    assert out.indices[0, 0].tolist() == [0, 1] + list(range(32, 40))
