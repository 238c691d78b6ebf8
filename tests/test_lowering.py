"""tritonkv/lowering.py: rewrites the compiled path runs keep exactly the written policy's tokens."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tritonkv as tkv
from tritonkv import policies
from tritonkv.budget import allocate, resolve_budget
from tritonkv.compiled import evict_compiled
from tritonkv.lowering import lower

from .devices import to_device
from .strategies import examples


def test_h2o_recency_half_becomes_the_recent_window():
    policy = policies.h2o()
    alloc = allocate(policy, 1000, 100)
    low, low_alloc = lower(policy, alloc)
    assert len(low.selective) == 1 and low.selective[0] == policy.selective[1]
    assert low_alloc.n_recent == alloc.n_recent + alloc.clause_counts[0] == 50
    assert low_alloc.total == alloc.total and low_alloc.clause_counts == alloc.clause_counts[1:]
    assert lower(policy, alloc)[0] is low   # one lowered object per policy: compiled-policy cache hits


@pytest.mark.parametrize("policy", [
    tkv.top(tkv.position()) | tkv.sample(-tkv.key_norm()),              # a Gumbel stream keyed by clause index
    tkv.top(-tkv.key_norm()) | tkv.top(tkv.position()),                 # not first: not a suffix
    tkv.top(tkv.position(), chunk=4) | tkv.top(-tkv.key_norm()),        # transformed
    tkv.top(tkv.position() * 2.0) | tkv.top(-tkv.key_norm()),           # another expression
    tkv.dsl.as_policy(tkv.top(tkv.position())),                          # the only clause
], ids=["sample-follows", "not-first", "chunked", "scaled", "alone"])
def test_left_as_written(policy):
    policy = tkv.dsl.as_policy(policy)
    alloc = allocate(policy, 100, 30)
    assert lower(policy, alloc) == (policy, alloc)


@given(n=st.integers(1, 300), budget=st.one_of(st.integers(1, 320), st.floats(0.01, 1.0)),
       sinks=st.integers(0, 6), recent=st.integers(0, 10), share=st.floats(0.1, 0.9), seed=st.integers(0, 99))
@settings(max_examples=examples(25))
def test_lowered_kernels_keep_the_written_policys_tokens(n, budget, sinks, recent, share, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, n, 64, generator=g)
    policy = tkv.sink(sinks) | tkv.recent(recent) | tkv.top(tkv.position(), share=round(share, 2)) \
        | tkv.top(-tkv.key_norm())
    k = resolve_budget(budget, n)
    got = evict_compiled(*to_device(keys, keys), None, policy, k, 0)
    want = tkv.evict(keys, keys, policy, budget, backend="reference")
    assert torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.keys.cpu(), want.keys)


def test_a_repeated_clause_object_is_folded_once():
    recency = tkv.top(tkv.position(), share=0.5)
    policy = recency | recency      # the same clause object twice: only the first is a suffix
    alloc = allocate(policy, 100, 40)
    low, low_alloc = lower(policy, alloc)
    assert len(low.selective) == 1 and low_alloc.clause_counts == alloc.clause_counts[1:]
    keys = torch.randn(1, 2, 100, 64)
    got = evict_compiled(*to_device(keys, keys), None, policy, 40, 0)
    assert torch.equal(got.indices.cpu(), tkv.evict(keys, keys, policy, 40, backend="reference").indices)
