"""What the DSL reaches beyond the cache: outside signals, per-head directions, chunk and
cross-head ranking, SnapKV's window boundary, and tkv.gather. Each against reference.py (the
compiled path in the interpreter on CPU), plus known answers and the errors of bad input."""

import pytest
import torch

import tritonkv as tkv
from tritonkv import policies, reference

from .checks import assert_unchanged, snapshot
from .devices import DEVICE, to_device
from .test_compiled import compare

BACKENDS = ["reference", "triton"]


def cache(b=2, h=2, n=61, d=64, group=2, w=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, n, d, generator=g).to(dtype)
    values = torch.randn(b, h, n, 80, generator=g).to(dtype)
    queries = torch.randn(b, h * group, w, d, generator=g).to(dtype)
    return keys, values, queries


def kept(out):
    return out.indices.cpu().tolist()


# ------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ["full", "heads broadcast", "batch broadcast", "strided"])
def test_signal_any_dtype_and_layout(dtype, shape):
    keys, values, _ = cache()
    b, h, n, _ = keys.shape
    g = torch.Generator().manual_seed(1)
    sizes = {"full": (b, h, n), "heads broadcast": (b, 1, n), "batch broadcast": (1, h, n), "strided": (n, h, b)}
    s = torch.randn(*sizes[shape], generator=g).to(dtype)
    if shape == "strided":
        s = s.permute(2, 1, 0)
    policy = tkv.sink(2) | tkv.top(tkv.signal("prior") * 2.0 - tkv.key_norm().normalize())
    before = snapshot(s)
    for backend in BACKENDS:
        out = tkv.evict(*to_device(keys, values), policy, 20, signals={"prior": s.to(DEVICE)}, backend=backend)
        assert out.indices.shape == (b, h, 20)
        if backend == "reference":
            want = kept(out)
        assert kept(out) == want, backend
    assert_unchanged(before, s)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_an_integer_signal_ranks_as_its_values(dtype):
    """Integer signals (true token positions, token types) read as float32: a top clause on
    positions keeps the largest, whatever slot they sit in, on every backend."""
    keys = torch.randn(2, 3, 40, 16)
    g = torch.Generator().manual_seed(5)
    positions = torch.stack([torch.randperm(40, generator=g) + 100_000 for _ in range(6)]).view(2, 3, 40).to(dtype)
    before = snapshot(positions)
    policy = tkv.top(tkv.signal("position"), share=0.5) | tkv.top(-tkv.key_norm())
    want = None
    for backend in BACKENDS:
        out = tkv.evict(*to_device(keys, keys), policy, 10, signals={"position": positions.to(DEVICE)},
                        backend=backend)
        kept_positions = positions.gather(-1, out.indices.cpu())
        assert (kept_positions >= 100_035).sum(-1).eq(5).all(), backend   # the 5 latest of each row
        want = kept(out) if want is None else want
        assert kept(out) == want, backend
    assert_unchanged(before, positions)


def test_signal_alone_keeps_its_top_tokens_and_nan_ranks_last():
    keys = torch.randn(1, 2, 10, 64)
    s = torch.arange(10.0).flip(0).expand(1, 2, 10).clone()   # token 0 scores highest
    s[0, 0, 1] = float("nan")
    for backend in BACKENDS:
        out = tkv.evict(*to_device(keys, keys), tkv.top(tkv.signal("s")), 3, signals={"s": s.to(DEVICE)},
                        backend=backend)
        assert kept(out) == [[[0, 2, 3], [0, 1, 2]]], backend


def test_signals_in_random_score_trees_match_the_reference():
    keys, values, queries = cache(n=77, dtype=torch.bfloat16)
    for policy in (tkv.top(tkv.signal("s0").softmax(0.5) + tkv.signal("s1").pool(3)),
                   tkv.recent(4) | tkv.sample(tkv.signal("s0").normalize(), temperature=2.0),
                   tkv.top(tkv.proxy_attention(window=8) * tkv.signal("s1"), share=0.5) | tkv.top(tkv.signal("s0"))):
        for seed in (0, 1, 2, 3):
            compare(keys, values, queries, tkv.dsl.as_policy(policy), 0.3, seed)


# ------------------------------------------------------------------------------ directions


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_key_dot_is_k_dot_u(batched, dtype):
    keys, values, _ = cache(dtype=dtype)
    b, h, n, d = keys.shape
    u = torch.randn(b, h, d) if batched else torch.randn(h, d)
    score = reference.key_dot(keys.float(), u)
    want = torch.topk(score, 15, dim=-1).indices.sort(-1).values
    for backend in BACKENDS:
        out = tkv.evict(*to_device(keys, values), tkv.top(tkv.key_dot("u")), 15, directions={"u": u.to(DEVICE)},
                        backend=backend)
        assert torch.equal(out.indices.cpu(), want), backend


def test_qfilters_preset_with_estimated_filters():
    """estimate_filters: the filter of queries along one direction v is -v (the paper's sign)
    and the preset keeps the keys most aligned with v."""
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(2, 64, generator=g), dim=-1)        # one per KV head
    queries = 3.0 * v.repeat_interleave(2, 0)[None, :, None, :] + 0.3 * torch.randn(1, 4, 200, 64, generator=g)
    filters = policies.estimate_filters(queries, kv_heads=2)
    assert torch.allclose(filters, -v, atol=0.05)
    keys = torch.randn(1, 2, 50, 64, generator=g)
    keys[0, 0, 7] += 4 * v[0]
    keys[0, 1, 33] += 4 * v[1]
    out = tkv.evict(keys, keys, policies.qfilters(), 1, directions={"qfilter": filters})
    assert kept(out) == [[[7], [33]]]


# ------------------------------------------------------------------------------ chunks and heads


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunks_known_answers(backend):
    keys = torch.randn(1, 1, 10, 64)
    keys, = to_device(keys)
    score = tkv.position()   # chunks of 4: [0-3] [4-7] [8-9]
    run = lambda clause, k: kept(tkv.evict(keys, keys, clause, k, backend=backend))[0][0]  # noqa: E731
    # sums 0.6, 2.2, 1.7: chunk 1, then chunk 2
    assert run(tkv.top(score, chunk=4), 6) == [4, 5, 6, 7, 8, 9]
    # means .15, .55, .85: chunk 2, then the first 3 tokens of chunk 1 (cut to the count)
    assert run(tkv.top(score, chunk=4, chunk_reduce="mean"), 5) == [4, 5, 6, 8, 9]
    assert run(tkv.top(-score, chunk=4, chunk_reduce="max"), 4) == [0, 1, 2, 3]
    # a sink window inside chunk 0: its tokens are kept, chunk 0's other tokens still rank as chunk 0
    assert run(tkv.sink(2) | tkv.top(-score, chunk=4), 5) == [0, 1, 2, 3, 8]   # then chunk 2 (-1.7 > -2.2)
    # equal chunk scores: the lower chunk first
    assert run(tkv.top(tkv.key_norm() * 0.0, chunk=3), 4) == [0, 1, 2, 3]


def test_chunk_reduce_reference_formula():
    x = torch.tensor([[[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0, 7.0]]])
    assert reference.chunk_reduce(x, 3, "sum").tolist() == [[[float("-inf")] * 3 + [15.0] * 3 + [7.0]]]
    assert reference.chunk_reduce(x, 3, "max").tolist() == [[[2.0] * 3 + [6.0] * 3 + [7.0]]]
    assert reference.chunk_reduce(x[..., 3:], 3, "mean").tolist() == [[[5.0] * 3 + [7.0]]]


@pytest.mark.parametrize("how", ["mean", "sum", "max"])
def test_head_reduce_keeps_the_same_tokens_in_every_head(how):
    keys, values, queries = cache(h=4, n=90, dtype=torch.bfloat16)
    policy = tkv.dsl.as_policy(tkv.top(tkv.proxy_attention(window=2) - 0.1 * tkv.key_norm(), head_reduce=how))
    for backend in BACKENDS:
        k, v, q = to_device(keys, values, queries)
        idx = tkv.evict(k, v, policy, 20, queries=q, backend=backend).indices
        assert (idx == idx[:, :1]).all(), backend
    compare(keys, values, queries, policy, 20)


def test_chunks_and_heads_in_presets_match_the_reference():
    keys, values, queries = cache(b=1, h=2, n=300, w=32, dtype=torch.bfloat16)
    for policy in (policies.chunkkv(window=32), policies.chunkkv(window=32, chunk=7, head_reduce="sum"),
                   policies.tova()):
        assert compare(keys, values, queries, policy, 0.3, seed=0) or compare(keys, values, queries, policy, 0.5)


# ------------------------------------------------------------------------------ SnapKV's boundary


def test_exclude_window_pools_only_the_prefix():
    """SnapKV's code: attention of the window to the keys before it, pooled with zero padding
    where the window starts; the window's keys score 0."""
    keys, values, queries = cache(b=1, h=1, n=40, group=1, w=8)
    node = tkv.proxy_attention(window=8, causal=True, pool=5, exclude_window=True)
    got = reference.proxy_attention(node, keys, queries)
    probs = reference.proxy_attention(tkv.proxy_attention(window=8, causal=True), keys, queries)   # mean over window
    prefix = torch.nn.functional.avg_pool1d(probs[..., :32], 5, stride=1, padding=2)
    assert torch.allclose(got[..., :32], prefix, atol=1e-7) and (got[..., 32:] == 0).all()
    # the difference that matters: without the cut, token 31 is pooled with the window's own keys
    inside = reference.proxy_attention(tkv.proxy_attention(window=8, causal=True, pool=5), keys, queries)
    assert not torch.allclose(inside[..., 30:32], prefix[..., 30:32])


# ------------------------------------------------------------------------------ gather


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_applies_a_kept_set_to_other_tensors(backend):
    keys, values, _ = cache(n=50)
    out = tkv.evict(keys, values, policies.keydiff(), 12)
    other_k, other_v = torch.randn(2, 2, 50, 32), torch.randint(-128, 127, (2, 2, 50, 4), dtype=torch.int8)
    before = snapshot(other_k, other_v, out.indices)
    got = tkv.gather(*to_device(other_k, other_v), out.indices.to(DEVICE), backend=backend)
    assert_unchanged(before, other_k, other_v, out.indices)
    assert torch.equal(got.keys.cpu(), reference.gather_rows(other_k, out.indices))
    assert torch.equal(got.values.cpu(), reference.gather_rows(other_v, out.indices)) and got.values.dtype == torch.int8
    # an Evicted, int32 indices in any order, a strided source
    shuffled = out.indices.flip(-1).to(torch.int32)
    strided = other_k.transpose(1, 2).contiguous().transpose(1, 2)
    again = tkv.gather(*to_device(strided, other_k), shuffled.to(DEVICE), backend=backend)
    assert torch.equal(again.keys.cpu(), reference.gather_rows(other_k, shuffled.long()))
    on_device = tkv.Evicted(*to_device(out.keys, out.values, out.indices))
    assert torch.equal(tkv.gather(*to_device(keys, values), on_device, backend=backend).keys.cpu(), out.keys)


def test_gather_errors():
    keys = torch.randn(1, 2, 10, 8)
    idx = torch.tensor([[[0, 3], [1, 9]]])
    with pytest.raises(ValueError, match=r"indices: expected positions in \[0, N\) = \[0, 10\), got values in \[1, 10\]"):
        tkv.gather(keys, keys, idx + 1)
    with pytest.raises(TypeError, match="indices: expected int64 or int32"):
        tkv.gather(keys, keys, idx.float())
    with pytest.raises(ValueError, match="indices: expected 3 dims"):
        tkv.gather(keys, keys, idx[0])
    with pytest.raises(ValueError, match=r"values: \[B, H\] = \(1, 3\) differs"):
        tkv.gather(keys, torch.randn(1, 3, 10, 8), idx)
    with pytest.raises(ValueError, match="values: N = 11 differs"):
        tkv.gather(keys, torch.randn(1, 2, 11, 8), idx)
    with pytest.raises(TypeError, match="keys: dtype torch.bool is not supported"):
        tkv.gather(keys > 0, keys, idx)
    with pytest.raises(ValueError, match="backend: expected one of"):
        tkv.gather(keys, keys, idx, backend="cuda")
    with pytest.raises(RuntimeError, match="out of bounds"):   # check=False: no range check of its own
        tkv.gather(keys, keys, idx + 1, check=False, backend="reference")


# ------------------------------------------------------------------------------ bad input


def test_named_input_errors():
    keys = torch.randn(1, 2, 10, 8)
    sig = tkv.top(tkv.signal("prior"))
    kd = tkv.top(tkv.key_dot("u"))
    good = torch.randn(1, 2, 10)
    cases = [
        (sig, {}, {}, ValueError, r"signals: the policy uses signal\('prior'\); pass signals=\{'prior': tensor\}"),
        (sig, {"prior": good, "other": good}, {}, ValueError, "signals: 'other' is not used by the policy"),
        (sig, {"prior": torch.randn(1, 2, 9)}, {}, ValueError, r"signals\['prior'\]: expected shape \[B, H_kv, N\]"),
        (sig, {"prior": torch.randn(1, 2, 10, 1)}, {}, ValueError, r"signals\['prior'\]: expected shape"),
        (sig, {"prior": torch.ones(1, 2, 10, dtype=torch.int16)}, {}, TypeError,
         "dtype torch.int16 is not supported; expected one of float16, bfloat16, float32, float64, int32, int64"),
        (kd, {}, {"u": torch.ones(2, 8, dtype=torch.int32)}, TypeError, "expected a float dtype"),
        (sig, {"prior": good.to("meta")}, {}, ValueError, r"signals\['prior'\]: on meta, keys on cpu"),
        (sig, {"prior": good.numpy()}, {}, TypeError, r"signals\['prior'\]: expected a torch.Tensor"),
        (sig, [good], {}, TypeError, "signals: expected a dict"),
        (kd, {}, {}, ValueError, r"directions: the policy uses key_dot\('u'\)"),
        (kd, {}, {"u": torch.randn(2, 7)}, ValueError, r"directions\['u'\]: expected shape \[H_kv, D\] = \[2, 8\]"),
        (kd, {}, {"u": torch.randn(3, 2, 8)}, ValueError, r"directions\['u'\]: expected shape"),
    ]
    for policy, signals, directions, error, message in cases:
        for backend in BACKENDS:
            with pytest.raises(error, match=message):
                tkv.evict(keys, keys, policy, 3, signals=signals, directions=directions, backend=backend)


def test_dsl_refusals():
    with pytest.raises(TypeError, match="signal name: expected a non-empty str"):
        tkv.signal("")
    with pytest.raises(TypeError, match="key_dot name"):
        tkv.key_dot(3)
    with pytest.raises(ValueError, match=r"chunk: expected an int in \[1, 4096\]"):
        tkv.top(tkv.key_norm(), chunk=0)
    with pytest.raises(ValueError, match="chunk_reduce: expected one of"):
        tkv.top(tkv.key_norm(), chunk=4, chunk_reduce="median")
    with pytest.raises(ValueError, match="head_reduce: expected None or one of"):
        tkv.top(tkv.key_norm(), head_reduce="all")
    with pytest.raises(ValueError, match="does not combine with top"):
        tkv.top(tkv.key_norm(), chunk=4).adaptive()
    with pytest.raises(TypeError, match="exclude_window: expected a bool"):
        tkv.proxy_attention(exclude_window=1)
    policy = tkv.top(tkv.signal("a") + tkv.key_dot("u") * tkv.signal("b"), chunk=8, head_reduce="max")
    assert repr(policy) == "top((signal('a') + (key_dot('u') * signal('b'))), chunk=8, head_reduce='max')"
    assert tkv.dsl.as_policy(policy).signals == ("a", "b") and tkv.dsl.as_policy(policy).directions == ("u",)
