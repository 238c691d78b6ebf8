"""The reference path: properties of every clause and primitive, and known answers."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import tritonkv as tkv
from tritonkv import policies, reference
from tritonkv.budget import resolve_budget

from .checks import assert_unchanged, check_evicted, named_kwargs, snapshot
from .strategies import caches
from .strategies import policies as policy_strategy


def evict_or_skip(keys, values, policy, budget, queries, seed=0):
    try:
        return tkv.evict(keys, values, policy, budget, queries=queries, seed=seed, backend="reference",
                         **named_kwargs(policy, keys, seed))
    except ValueError as e:  # a proxy window longer than the cache: a documented error
        assume("queries" not in str(e))
        raise


@given(caches(), policy_strategy(), st.one_of(st.integers(1, 400), st.floats(0.01, 1.0)), st.integers(0, 2 ** 40))
def test_reference_properties(cache, policy, budget, seed):
    keys, values, queries = cache
    before = snapshot(keys, values, queries)
    out = evict_or_skip(keys, values, policy, budget, queries, seed)
    assert_unchanged(before, keys, values, queries)
    check_evicted(out, keys, values, policy, resolve_budget(budget, keys.shape[2]))
    again = tkv.evict(keys, values, policy, budget, queries=queries, seed=seed, backend="reference",
                      **named_kwargs(policy, keys, seed))
    assert torch.equal(out.indices, again.indices), "same inputs and seed must give the same result"


@pytest.mark.parametrize("name", sorted(set(policies.PRESETS) - {"adakv"}))
def test_every_preset_keeps_the_budget(name):
    keys, values = torch.randn(2, 2, 700, 64), torch.randn(2, 2, 700, 32)
    queries = torch.randn(2, 4, 64, 64)
    policy = policies.PRESETS[name]()
    for budget in (1, 17, 0.25, 0.5, 700, 1000):
        out = tkv.evict(keys, values, policy, budget, queries=queries, **named_kwargs(policy, keys))
        check_evicted(out, keys, values, policy, resolve_budget(budget, 700))


def test_random_seeds_change_the_draw_and_fix_it():
    keys = torch.randn(1, 2, 500, 64)
    for policy in (policies.random(), tkv.sample(tkv.key_norm())):
        a = tkv.evict(keys, keys, policy, 0.2, seed=1).indices
        b = tkv.evict(keys, keys, policy, 0.2, seed=1).indices
        c = tkv.evict(keys, keys, policy, 0.2, seed=2).indices
        assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------- known answers


def test_keydiff_keeps_the_distinctive_keys():
    # 60 keys near one direction, 4 pointing elsewhere: those 4 are the least anchor-similar
    base = torch.zeros(64)
    base[0] = 1.0
    keys = base + 0.05 * torch.randn(1, 1, 64, 64)
    odd = [5, 17, 40, 63]
    keys[0, 0, odd] = torch.randn(4, 64)
    out = tkv.evict(keys, keys, policies.keydiff(), 4)
    assert out.indices.flatten().tolist() == odd


def test_knorm_keeps_the_lowest_norms():
    keys = torch.randn(1, 1, 50, 64)
    norms = torch.randperm(50).float() + 1
    keys = keys / keys.norm(dim=-1, keepdim=True) * norms.view(1, 1, 50, 1)
    out = tkv.evict(keys, keys, policies.knorm(), 5)
    assert out.indices.flatten().tolist() == sorted(torch.argsort(norms)[:5].tolist())


def test_streaming_llm_keeps_sinks_and_the_latest():
    keys = torch.randn(1, 3, 100, 64)
    out = tkv.evict(keys, keys, policies.streaming_llm(), 20)
    assert out.indices[0, 0].tolist() == [0, 1, 2, 3] + list(range(84, 100))


def _needle_cache(n=256, d=64, needles=(10, 77, 150), heads=2, group=2, w=16):
    """Keys of noise, proxy queries all aligned with a few needle keys."""
    g = torch.Generator().manual_seed(0)
    keys = 0.1 * torch.randn(1, heads, n, d, generator=g)
    direction = torch.randn(d, generator=g)
    keys[:, :, list(needles)] = direction * 0.5
    queries = direction * 1.0 + 0.05 * torch.randn(1, heads * group, w, d, generator=g)
    return keys, queries


def test_snapkv_keeps_window_and_attended_keys():
    keys, queries = _needle_cache(w=64)
    # pooling (kernel 5) spreads each needle's attention over its neighbours: SnapKV keeps clusters
    out = tkv.evict(keys, keys, policies.snapkv(window=64), 64 + 15, queries=queries)
    clusters = [i + j for i in (10, 77, 150) for j in range(-2, 3)]
    assert out.indices[0, 0].tolist() == clusters + list(range(192, 256))


def test_nacl_keeps_sinks_recent_proxy_top_and_samples():
    keys, queries = _needle_cache(n=1000, w=10)
    policy = policies.nacl(sinks=4, recent=0.01, proxy_window=0.01)
    out = tkv.evict(keys, keys, policy, 4 + 10 + 19, queries=queries, seed=3)
    kept = set(out.indices[0, 0].tolist())
    assert set(range(4)) | set(range(990, 1000)) <= kept
    assert {10, 77, 150} <= kept                     # 12 of 19 by proxy score: the needles win
    assert len(kept) == 33


def test_sample_draws_with_softmax_probabilities():
    # two tokens with score ratio e^1 : e^0, one kept: the first is kept ~73% of the time
    keys = torch.randn(1, 1, 2, 8)
    score = tkv.position() * -2.0   # token 0: 0, token 1: -1
    hits = sum(int(tkv.evict(keys, keys, tkv.sample(score), 1, seed=s).indices[0, 0, 0] == 0) for s in range(2000))
    p = math.exp(0) / (math.exp(0) + math.exp(-1))
    assert abs(hits / 2000 - p) < 4 * math.sqrt(p * (1 - p) / 2000)


def test_random_preset_is_uniform():
    keys = torch.randn(1, 4, 40, 8)
    counts = torch.zeros(40)
    for s in range(300):
        out = tkv.evict(keys, keys, policies.random(), 10, seed=s)
        counts += torch.bincount(out.indices.flatten(), minlength=40)
    expected = 300 * 4 * 10 / 40
    assert float((counts - expected).abs().max()) < 5 * math.sqrt(expected)


def test_h2o_and_tova_keep_attended_keys():
    keys, queries = _needle_cache(w=16)
    tova = tkv.evict(keys, keys, policies.tova(), 4, queries=queries).indices   # the last token, then 3
    assert tova[0, 0].tolist() == [10, 77, 150, 255]
    assert (tova == tova[:, :1]).all(), "TOVA: every KV head keeps the same tokens"
    assert tkv.evict(keys, keys, policies.tova_per_group(), 3, queries=queries).indices[0, 0].tolist() == [10, 77, 150]
    h2o = tkv.evict(keys, keys, policies.h2o(), 6, queries=queries).indices[0, 0].tolist()
    assert h2o == [10, 77, 150, 253, 254, 255]


def test_adakv_spreads_the_budget_across_heads():
    # head 0 attends sharply to 3 keys, head 1 spreads its attention: AdaKV gives head 1 more
    keys, queries = _needle_cache(n=256, heads=2, group=1, w=8)
    keys[0, 1] = 0.01 * torch.randn(256, 64)
    policy = tkv.top(tkv.proxy_attention()).adaptive(floor=0.2)
    out = tkv.evict(keys, keys, policy, 20, queries=queries)
    assert isinstance(out, tkv.EvictedVarlen)
    assert int(out.lengths.sum()) == 40
    assert out.lengths[0, 0] < out.lengths[0, 1]
    k0, _, i0 = out.head(0, 0)
    assert {10, 77, 150} <= set(i0.tolist())
    assert torch.equal(k0, keys[0, 0, i0])
    assert int(out.lengths.min()) >= 4  # floor: 20% of the uniform share


def test_proxy_attention_matches_an_explicit_loop():
    torch.manual_seed(0)
    b, h, g, n, d, w = 1, 2, 2, 12, 16, 4
    keys, queries = torch.randn(b, h, n, d), torch.randn(b, h * g, w, d)
    node = tkv.proxy_attention(window=3, causal=True, reduce="sum", pool=3, pool_mode="max", group_reduce="max")
    got = reference.proxy_attention(node, keys, queries)
    want = torch.empty(b, h, n)
    for kv in range(h):
        per_head = []
        for qh in range(kv * g, kv * g + g):
            acc = torch.zeros(n)
            for r in range(3):
                pos = n - 3 + r
                logits = torch.full((n,), float("-inf"))
                logits[: pos + 1] = queries[0, qh, w - 3 + r] @ keys[0, kv, : pos + 1].T / math.sqrt(d)
                acc += torch.softmax(logits, 0)
            pooled = torch.stack([acc[max(0, i - 1): i + 2].max() for i in range(n)])
            per_head.append(pooled)
        want[0, kv] = torch.stack(per_head).max(0).values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_normalize_and_softmax_semantics():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    z = reference.normalize(x)
    torch.testing.assert_close(z.mean(-1), torch.zeros(1, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.square().mean(-1), torch.ones(1, 1))
    assert torch.equal(reference.normalize(torch.ones(1, 1, 5)), torch.zeros(1, 1, 5))
    torch.testing.assert_close(reference.softmax(x, 2.0).sum(-1), torch.ones(1, 1))


def test_nan_scores_rank_lowest_and_ties_go_to_the_lower_index():
    keys = torch.ones(1, 1, 6, 4)
    keys[0, 0, 2] = float("nan")
    out = tkv.evict(keys, keys, tkv.top(tkv.key_norm()), 3)
    assert out.indices.flatten().tolist() == [0, 1, 3]  # equal norms: lowest indices; NaN last
