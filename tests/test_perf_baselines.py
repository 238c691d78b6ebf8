"""The perf suite's peer baseline (perf/baselines.py): on float32 caches, where the cache's
own dtype adds no rounding, the peer keeps exactly the reference's tokens for the presets
whose semantics it shares (SnapKV with its boundary rule, TOVA averaged over all heads: the
issue-14 differences); its outputs are K and V gathered at its indices. And the compile
time budget abandons a block that runs past it."""

import time

import pytest
import torch

from perf.baselines import PEER_SCORES, CompileBudgetExceeded, compile_within, peer_evict
from tritonkv import policies, reference
from tritonkv.budget import resolve_budget

SAME_SEMANTICS = ("knorm", "keydiff", "streaming_llm", "h2o", "snapkv", "tova", "qfilters")
NAMED = {"qfilters": lambda keys: {"qfilter": torch.randn(keys.shape[1], keys.shape[-1]).to(keys.dtype)},
         "h2o_signal": lambda keys: {"acc": torch.rand(keys.shape[:3]).to(keys.dtype)}}


def named_for(name, keys):
    return NAMED[name](keys) if name in NAMED else None


def cache(dtype, b=2, h=2, group=4, n=301, d=64, window=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return rand(b, h, n, d), rand(b, h, n, d), rand(b, h * group, window, d)


def mask(indices, n):
    return torch.zeros(*indices.shape[:2], n, dtype=torch.bool).scatter_(-1, indices, True)


@pytest.mark.parametrize("name", SAME_SEMANTICS)
@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 1.0])
def test_peer_keeps_the_reference_tokens_in_float32(name, budget):
    keys, values, queries = cache(torch.float32)
    k = resolve_budget(budget, keys.shape[2])
    if name == "snapkv" and k < 64:
        pytest.skip("a budget below SnapKV's 64-token window: the peer's topk picks among tied forced scores")
    policy = policies.PRESETS[name]()
    named = named_for(name, keys)
    kept = reference.select(policy, reference.Inputs(keys, values, queries, directions=named), k)
    out_keys, out_values, indices = peer_evict(name)(keys, values, queries, k, named)
    assert indices.shape == (2, 2, k)
    assert torch.equal(mask(indices, keys.shape[2]), kept)
    assert torch.equal(out_keys, reference.gather_rows(keys, indices))
    assert torch.equal(out_values, reference.gather_rows(values, indices))


@pytest.mark.parametrize("name", sorted(PEER_SCORES))
def test_peer_runs_in_the_cache_dtype(name):
    keys, values, queries = cache(torch.bfloat16)
    named = named_for(name, keys)
    scores = PEER_SCORES[name](keys, queries, 30) if named is None else PEER_SCORES[name](keys, queries, 30, named)
    assert scores.dtype == torch.bfloat16 and scores.shape == keys.shape[:3]
    out_keys, _, indices = peer_evict(name)(keys, values, queries, 30, named)
    assert out_keys.dtype == torch.bfloat16 and indices.unique(dim=-1).shape[-1] == 30


def test_peer_snapkv_and_tova_force_their_windows():
    keys, values, queries = cache(torch.bfloat16)
    n = keys.shape[2]
    assert (PEER_SCORES["snapkv"](keys, queries, 100)[..., n - 64:] == float("inf")).all()
    tova = PEER_SCORES["tova"](keys, queries, 100)
    assert (tova[..., -1] == float("inf")).all() and torch.equal(tova[:, 0], tova[:, 1])  # one set for all heads
    assert peer_evict("nacl") is None


def test_compile_budget_abandons_the_block():
    start = time.perf_counter()
    with pytest.raises(CompileBudgetExceeded, match="budget of 0.2 s"):
        with compile_within(0.2):
            while time.perf_counter() - start < 5:
                pass
    assert time.perf_counter() - start < 2
    with compile_within(5) as elapsed:   # a block within budget runs to its end; the alarm is cleared
        pass
    assert elapsed() < 1
    time.sleep(0.3)
