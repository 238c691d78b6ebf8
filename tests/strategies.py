"""Hypothesis strategies: caches of every shape and dtype, random score trees, policies."""

import os

import torch
from hypothesis import strategies as st

import tritonkv as tkv

THOROUGH = os.environ.get("TKV_PROFILE") == "thorough"


def examples(n: int, cpu: int = None) -> int:
    """A test's example count in the CI profile, x100 in the thorough one; ``cpu``: the CI
    count where the kernels run in the interpreter (no GPU), for tests whose examples take
    seconds there."""
    if THOROUGH:
        return n * 100
    return n if cpu is None or torch.cuda.is_available() else cpu


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 80, 96, 128, 256]
GQA_RATIOS = [1, 2, 4, 8]

primitives = st.one_of(
    st.just(tkv.anchor_similarity()),
    st.just(tkv.key_norm()),
    st.just(tkv.value_norm()),
    st.just(tkv.position()),
    st.builds(tkv.random, st.integers(0, 3)),
    st.builds(tkv.proxy_attention,
              window=st.one_of(st.none(), st.integers(1, 8)),
              causal=st.booleans(),
              reduce=st.sampled_from(["mean", "sum", "max"]),
              pool=st.sampled_from([1, 1, 3, 5]),
              pool_mode=st.sampled_from(["avg", "max"]),
              group_reduce=st.sampled_from(["mean", "sum", "max"]),
              exclude_window=st.booleans()),
    st.just(tkv.signal("s0")),
    st.just(tkv.signal("s1")),
    st.just(tkv.key_dot("u0")),
)
constants = st.floats(-3, 3, allow_nan=False).filter(lambda x: abs(x) > 0.05).map(lambda x: round(x, 2))


def _extend(children):
    return st.one_of(
        st.builds(lambda a, b: a + b, children, children),
        st.builds(lambda a, b: a - b, children, children),
        st.builds(lambda a, c: a * c, children, constants),
        st.builds(lambda a, b: a * b, children, children),
        st.builds(lambda a, c: a / c, children, constants),
        children.map(lambda a: -a),
        st.builds(lambda a, k, m: a.pool(k, m), children, st.sampled_from([3, 5, 7]), st.sampled_from(["avg", "max"])),
        children.map(lambda a: a.normalize()),
        st.builds(lambda a, t: a.softmax(t), children, st.sampled_from([0.5, 1.0, 2.0])),
    )


scores = st.recursive(primitives, _extend, max_leaves=4)


@st.composite
def policies(draw, score_strategy=scores):
    clauses = []
    if draw(st.booleans()):
        clauses.append(tkv.sink(draw(st.one_of(st.integers(0, 8), st.floats(0.01, 0.2)))))
    if draw(st.booleans()):
        clauses.append(tkv.recent(draw(st.one_of(st.integers(0, 16), st.floats(0.01, 0.2)))))
    for i in range(draw(st.integers(1, 2))):
        score = draw(score_strategy)
        share = draw(st.one_of(st.none(), st.floats(0.2, 0.8).map(lambda x: round(x, 2))))
        if draw(st.booleans()):
            clauses.append(tkv.top(score, share=share, chunk=draw(st.sampled_from([1, 1, 2, 3, 8])),
                                   chunk_reduce=draw(st.sampled_from(["sum", "mean", "max"])),
                                   head_reduce=draw(st.sampled_from([None, None, "mean", "sum", "max"]))))
        else:
            clauses.append(tkv.sample(score, share=share, temperature=draw(st.sampled_from([0.5, 1.0, 3.0]))))
    return tkv.Policy(tuple(clauses))


@st.composite
def caches(draw, max_n=300, head_dims=HEAD_DIMS, dtypes=DTYPES, max_batch=3, max_heads=3, window=8):
    """(keys, values, queries) on CPU, as a cache would hold them; sometimes strided views."""
    b = draw(st.integers(1, max_batch))
    h = draw(st.integers(1, max_heads))
    ratio = draw(st.sampled_from(GQA_RATIOS))
    n = draw(st.one_of(st.just(1), st.integers(1, max_n)))
    d = draw(st.sampled_from(head_dims))
    dv = draw(st.sampled_from([d, draw(st.sampled_from(head_dims))]))
    w = min(window, n)
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=gen).to(dtype)
    values = torch.randn(b, h, n, dv, generator=gen).to(dtype)
    queries = (torch.randn(b, h * ratio, w, d, generator=gen) * 2).to(dtype)
    if draw(st.booleans()):  # a strided view: heads and tokens swapped in memory
        keys = keys.transpose(1, 2).contiguous().transpose(1, 2)
        values = values.transpose(1, 2).contiguous().transpose(1, 2)
    return keys, values, queries


NAMED_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def named_inputs(policy, keys, seed: int):
    """(signals, directions) for the names a policy reads, made from ``seed``: every float
    dtype, broadcast shapes ([B, 1, N], [1, H, N]), strided views, directions [H, D] and
    [B, H, D]."""
    b, h, n, d = keys.shape
    gen = torch.Generator().manual_seed(seed % (2 ** 63))
    signals, directions = {}, {}
    for i, name in enumerate(policy.signals):
        pick = (seed + i) % 4
        shape = [(b, h, n), (b, 1, n), (1, h, n), (b, h, n)][pick]
        x = torch.randn(*shape, generator=gen)
        if pick == 3:   # a strided view: tokens outermost in memory
            x = x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        signals[name] = x.to(NAMED_DTYPES[(seed + 2 * i) % 4]).to(keys.device)
    for i, name in enumerate(policy.directions):
        shape = (h, d) if (seed + i) % 2 else (b, h, d)
        directions[name] = (torch.randn(*shape, generator=gen) / d ** 0.5).to(NAMED_DTYPES[(seed + i) % 4]).to(keys.device)
    return signals, directions
