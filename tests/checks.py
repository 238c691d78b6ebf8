"""Properties every eviction result must have, whatever the policy or backend."""

import torch

from tritonkv.budget import allocate


def expected_count(policy, n, k):
    return allocate(policy, n, k).total


def check_evicted(out, keys, values, policy, k):
    """Count, forced tokens, ascending unique indices, rows equal to the inputs'."""
    b, h, n, _ = keys.shape
    alloc = allocate(policy, n, k)
    count = alloc.total
    assert out.indices.dtype == torch.int64
    assert out.indices.shape == (b, h, count), (out.indices.shape, count)
    assert out.keys.shape == (b, h, count, keys.shape[-1]) and out.keys.dtype == keys.dtype
    assert out.values.shape == (b, h, count, values.shape[-1]) and out.values.dtype == values.dtype
    idx = out.indices
    if count:
        assert int(idx.min()) >= 0 and int(idx.max()) < n
        assert bool((idx[..., 1:] > idx[..., :-1]).all()), "indices must be strictly ascending"
    kept = torch.zeros(b, h, n, dtype=torch.bool)
    kept.scatter_(-1, idx.cpu(), True)
    forced = list(range(alloc.n_sink)) + list(range(n - alloc.n_recent, n))
    assert bool(kept[..., forced].all()), "sink / recent tokens must be kept"
    gather = lambda x: torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))  # noqa: E731
    assert torch.equal(out.keys, gather(keys)), "kept keys must equal the input rows"
    assert torch.equal(out.values, gather(values)), "kept values must equal the input rows"


def snapshot(*tensors):
    return [None if t is None else (t.clone(), t.stride()) for t in tensors]


def assert_unchanged(before, *tensors):
    for saved, t in zip(before, tensors):
        if t is None:
            continue
        copy, stride = saved
        bits = lambda x: x.contiguous().view(torch.uint8)  # noqa: E731  (bitwise: NaN == NaN)
        assert t.stride() == stride and torch.equal(bits(t), bits(copy)), "an input was modified"


def named_kwargs(policy, keys, seed: int = 0) -> dict:
    """``signals=`` / ``directions=`` of evict for the names a policy reads (random tensors
    from tests/strategies.named_inputs; None where it reads none)."""
    from tritonkv.dsl import as_policy

    from .strategies import named_inputs
    signals, directions = named_inputs(as_policy(policy), keys, seed)
    return dict(signals=signals or None, directions=directions or None)
