"""Bad input gets a clear error before any kernel runs; edge cases have a documented result,
the same on the reference and the compiled path; inputs are never modified."""

import pytest
import torch

import tritonkv as tkv
from tritonkv import policies

from .checks import assert_unchanged, check_evicted, snapshot
from .devices import DEVICE

BACKENDS = ["reference", "triton"]


def cache(b=1, h=2, n=50, d=64, dv=None, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(b, h, n, d, generator=g).to(dtype).to(device)
    v = torch.randn(b, h, n, dv or d, generator=g).to(dtype).to(device)
    return k, v


K, V = cache()
Q = torch.randn(1, 4, 8, 64).to(DEVICE)
PROXY = tkv.top(tkv.proxy_attention())


@pytest.mark.parametrize("call,error,pattern", [
    (lambda: tkv.evict(K[0], V[0], policies.knorm(), 10), ValueError, r"keys: expected 4 dims"),
    (lambda: tkv.evict(K, V[:, :, :, :, None], policies.knorm(), 10), ValueError, r"values: expected 4 dims"),
    (lambda: tkv.evict(K, torch.cat([V, V]), policies.knorm(), 10), ValueError, r"values: expected \[B, H_kv, N\]"),
    (lambda: tkv.evict(K, V[:, :1], policies.knorm(), 10), ValueError, r"values: expected \[B, H_kv, N\]"),
    (lambda: tkv.evict(K, V[:, :, :40], policies.knorm(), 10), ValueError, r"values: expected \[B, H_kv, N\]"),
    (lambda: tkv.evict(K, V, PROXY, 10, queries=Q[:, :3]), ValueError, r"queries: H_q = 3 must be a multiple"),
    (lambda: tkv.evict(K, V, PROXY, 10, queries=Q[..., :32]), ValueError, r"queries: head dim 32 differs"),
    (lambda: tkv.evict(K, V, PROXY, 10, queries=torch.cat([Q, Q])), ValueError, r"queries: batch 2 differs"),
    (lambda: tkv.evict(K, V, PROXY, 10, queries=Q.half()), TypeError, r"queries: dtype"),
    (lambda: tkv.evict(K, V, PROXY, 10, queries=Q[:, :, :0]), ValueError, r"queries: expected at least one"),
    (lambda: tkv.evict(K, V, PROXY, 10), ValueError, r"queries: the policy uses proxy_attention\(\)"),
    (lambda: tkv.evict(K, V, tkv.top(tkv.proxy_attention(window=20)), 10, queries=Q), ValueError,
     r"needs the last 20 proxy queries, but queries has only 8"),
    (lambda: tkv.evict(K, V.half(), policies.knorm(), 10), TypeError, r"values: dtype torch.float16 differs"),
    (lambda: tkv.evict(K.double(), V.double(), policies.knorm(), 10), TypeError,
     r"keys: dtype torch.float64 is not supported; expected float16, bfloat16 or float32"),
    (lambda: tkv.evict(K.int(), V.int(), policies.knorm(), 10), TypeError, r"keys: dtype torch.int32 is not supported"),
    (lambda: tkv.evict(K.to(torch.float8_e4m3fn), V.to(torch.float8_e4m3fn), policies.knorm(), 10), TypeError,
     r"keys: dtype torch.float8_e4m3fn is not supported"),
    (lambda: tkv.evict(K, V, policies.knorm(), 0), ValueError, r"budget: expected at least 1 token"),
    (lambda: tkv.evict(K, V, policies.knorm(), -5), ValueError, r"budget: expected at least 1 token"),
    (lambda: tkv.evict(K, V, policies.knorm(), float("nan")), ValueError, r"budget: a fraction must be in \(0, 1\]"),
    (lambda: tkv.evict(K, V, policies.knorm(), 1.5), ValueError, r"budget: a fraction must be in \(0, 1\]"),
    (lambda: tkv.evict(K, V, policies.knorm(), 0.0), ValueError, r"budget: a fraction must be in \(0, 1\]"),
    (lambda: tkv.evict(K, V, policies.knorm(), True), TypeError, r"budget: expected an int token count"),
    (lambda: tkv.evict(K, V, policies.knorm(), "half"), TypeError, r"budget: expected an int token count"),
    (lambda: tkv.evict(K[:, :, :0], V[:, :, :0], policies.knorm(), 10), ValueError, r"keys: the cache is empty"),
    (lambda: tkv.evict(K, V, "keydiff", 10), TypeError, r"policy: expected a tritonkv Policy or clause, got str"),
    (lambda: tkv.evict(K, V, -tkv.key_norm(), 10), TypeError, r"wrap it in a clause"),
    (lambda: tkv.evict(K, V, policies.knorm(), 10, seed=-1), ValueError, r"seed: expected an int"),
    (lambda: tkv.evict(K, V, policies.knorm(), 10, backend="cuda"), ValueError, r"backend: expected one of"),
    (lambda: tkv.evict(K.numpy() if DEVICE == "cpu" else K.cpu().numpy(), V, policies.knorm(), 10), TypeError,
     r"keys: expected a torch.Tensor"),
])
def test_bad_input_raises_a_clear_error(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_device_mismatch():
    with pytest.raises(ValueError, match="values: on cpu, keys on cuda"):
        tkv.evict(K.cuda(), V.cpu(), policies.knorm(), 10)


def run(backend, keys, values, policy, budget, queries=None, seed=0):
    before = snapshot(keys, values, queries)
    out = tkv.evict(keys, values, policy, budget, queries=queries, seed=seed, backend=backend)
    assert_unchanged(before, keys, values, queries)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_rank_lowest(backend):
    """NaN scores count as -inf: a key with NaN or infinite entries gives a NaN norm / cosine
    and is kept last; ties among them go to the lower index."""
    keys, values = cache(n=12)
    keys[0, 0, 3] = float("nan")
    keys[0, 0, 5] = float("inf")
    keys[0, 1, :] = float("nan")            # a head of NaN: all scores NaN, lowest indices kept
    for policy in (policies.knorm(), policies.keydiff(), tkv.sample(-tkv.key_norm())):
        policy = tkv.dsl.as_policy(policy)
        out = run(backend, keys, values, policy, 9)
        head0 = out.indices[0, 0].tolist()
        assert 3 not in head0 or policy == policies.keydiff()
        assert out.indices[0, 1].tolist() == list(range(9))
    ref = run("reference", keys, values, policies.knorm(), 9)
    assert torch.equal(run(backend, keys, values, policies.knorm(), 9).indices.cpu(), ref.indices.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_queries_and_values(backend):
    keys, values = cache(n=30)
    values[0, 0, 7] = float("nan")
    q = torch.randn(1, 2, 4, 64).to(DEVICE)
    q[0, 0, 1] = float("nan")               # one proxy query of head 0 is NaN: its scores NaN
    out = run(backend, keys, values, tkv.dsl.as_policy(tkv.top(tkv.proxy_attention(group_reduce="max"))), 10, q)
    ref = run("reference", keys, values, tkv.dsl.as_policy(tkv.top(tkv.proxy_attention(group_reduce="max"))), 10, q)
    assert torch.equal(out.indices.cpu(), ref.indices.cpu())
    assert torch.equal(out.indices[0, 0].cpu(), torch.arange(10))       # all NaN: lowest indices
    out = run(backend, keys, values, tkv.dsl.as_policy(tkv.top(tkv.value_norm())), 10)
    assert 7 not in out.indices[0, 0].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_index(backend):
    keys = torch.ones(2, 2, 40, 64).to(DEVICE)
    for policy in (policies.knorm(), policies.keydiff(), tkv.sink(2) | tkv.top(tkv.key_norm()) | tkv.top(-tkv.key_norm())):
        out = run(backend, keys, keys, policy, 15)
        assert out.indices.cpu().tolist() == [[list(range(15))] * 2] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_budget_at_least_n(backend):
    keys, values = cache(n=1)
    for budget in (1, 5, 1.0, 0.01):
        out = run(backend, keys, values, policies.keydiff(), budget)
        assert out.indices.cpu().tolist() == [[[0], [0]]]
    keys, values = cache(n=37)
    out = run(backend, keys, values, policies.snapkv(window=4), 100, queries=torch.randn(1, 2, 4, 64).to(DEVICE))
    assert torch.equal(out.indices.cpu(), torch.arange(37).expand(1, 2, 37)) and torch.equal(out.keys, keys)


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_below_the_forced_windows(backend):
    """The budget caps the forced windows, filled in the order written."""
    keys, values = cache(n=100)
    out = run(backend, keys, values, tkv.sink(4) | tkv.recent(64) | tkv.top(tkv.key_norm()), 10)
    assert out.indices[0, 0].tolist() == [0, 1, 2, 3] + list(range(94, 100))
    out = run(backend, keys, values, tkv.recent(64) | tkv.sink(4) | tkv.top(tkv.key_norm()), 10)
    assert out.indices[0, 0].tolist() == list(range(90, 100))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_inputs(backend):
    base = torch.randn(1, 1, 64, 64).to(DEVICE)
    keys = base.expand(3, 2, 64, 64)                       # stride 0 over batch and heads
    values = torch.randn(3, 64, 2, 48).to(DEVICE).transpose(1, 2)
    q = torch.randn(3, 4, 8, 64).to(DEVICE)[..., ::1]
    for policy in (policies.keydiff(), policies.snapkv(window=8), policies.random()):
        out = run(backend, keys, values, policy, 20, q)
        ref = run("reference", keys.contiguous(), values.contiguous(), policy, 20, q)
        assert torch.equal(out.indices.cpu(), ref.indices.cpu())
        check_evicted(type(out)(out.keys.cpu(), out.values.cpu(), out.indices.cpu()), keys.cpu(), values.cpu(),
                      policy, 20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds(backend):
    keys, values = cache(n=400)
    for policy in (policies.random(), tkv.dsl.as_policy(tkv.sample(tkv.key_norm()))):
        a = run(backend, keys, values, policy, 0.2, seed=11).indices
        b = run(backend, keys, values, policy, 0.2, seed=11).indices
        c = run(backend, keys, values, policy, 0.2, seed=12).indices
        assert torch.equal(a, b) and not torch.equal(a, c)
        # the reference on CPU tensors: same seed, same kept set on the GPU, in the interpreter
        # and on the CPU (Philox is bit-exact; the scores here are tie-free)
        ref = run("reference", keys.cpu(), values.cpu(), policy, 0.2, seed=11).indices
        assert torch.equal(a.cpu(), ref)


def test_cpu_triton_without_interpreter_is_a_clear_error(monkeypatch):
    from tritonkv import compiled, compiler
    monkeypatch.setattr(compiler, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compiled.evict_compiled(K.cpu(), V.cpu(), None, policies.knorm(), 10, 0)
