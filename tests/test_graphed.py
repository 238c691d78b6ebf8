"""Evictor.graph (tritonkv/graphed.py): a call over fixed tensors captured as a CUDA graph. Each
replay evicts the bound inputs' current contents exactly as a planned call on them does."""

import pytest
import torch

import tritonkv as tkv
from tritonkv import policies

from .checks import assert_unchanged, named_kwargs, snapshot
from .devices import CUDA
from .test_runtime import every_policy, make, same


def test_graph_refuses_what_it_cannot_capture():
    keys, values, _ = make(n=40, device="cpu")
    with pytest.raises(ValueError, match="keys: a CUDA graph replays CUDA work; expected a CUDA tensor, got cpu"):
        tkv.Evictor(policies.knorm(), 10).graph(keys, values)
    if CUDA:
        keys, values = keys.cuda(), values.cuda()
        with pytest.raises(ValueError, match="backend: the reference backend"):
            tkv.Evictor(policies.knorm(), 10, backend="reference").graph(keys, values)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", list(every_policy()))
def test_each_replay_evicts_the_current_contents(name):
    """Bound inputs rewritten in place between replays (three contents, two budgets): every
    replay's outputs equal a planned call's on the same contents, bit for bit, and the inputs
    are left as they were. AdaKV included: its kernel path sizes everything on the host and
    never syncs (tritonkv/adaptive.py), so it captures."""
    policy = every_policy()[name]
    for budget in (0.1, 37):
        keys, values, queries = make(b=2, n=700)
        kw = named_kwargs(policy, keys)
        queries = queries if policy.needs_queries else None
        ev = tkv.Evictor(policy, budget)
        graph = ev.graph(keys, values, queries=queries, seed=5, **kw)
        for seed in (1, 2, 3):
            new_keys, new_values, new_queries = make(b=2, n=700, seed=seed)
            keys.copy_(new_keys)
            values.copy_(new_values)
            if queries is not None:
                queries.copy_(new_queries)
            before = snapshot(keys, values, queries)
            got = graph()
            torch.cuda.synchronize()
            assert_unchanged(before, keys, values, queries)
            assert same(got, ev(keys, values, queries=queries, seed=5, **kw)), (name, budget, seed)
        assert graph() is graph.out
