"""The split-KV decode attention of StaticEvictingCache (tritonkv.kernels.decode) against
reference.slot_attention, across shapes, GQA ratios, dtypes, fills and empty leading slots."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonkv import reference
from tritonkv.kernels.decode import decode_attention, splits_for

from .devices import DEVICE
from .strategies import DTYPES, GQA_RATIOS, HEAD_DIMS, examples


@st.composite
def slot_buffers(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    group = draw(st.sampled_from(GQA_RATIOS + [3]))
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.sampled_from([d, 64]))
    c = draw(st.one_of(st.integers(1, 70), st.integers(250, 1300)))
    length = draw(st.integers(1, c))
    start = [draw(st.integers(0, length - 1)) for _ in range(b)]
    seed = draw(st.integers(0, 2 ** 31))
    return b, h, group, d, dv, c, length, start, seed


def inputs(case, dtype):
    b, h, group, d, dv, c, length, start, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h * group, 1, d, generator=g)
    k, v = torch.randn(b, h, c, d, generator=g), torch.randn(b, h, c, dv, generator=g)
    q, k, v = (x.to(dtype).to(DEVICE) for x in (q, k, v))
    return q, k, v, torch.tensor(start, device=DEVICE), torch.tensor(length, device=DEVICE)


def tolerance(values, dtype):
    """The kernel accumulates in float32 but, on the GPU, rounds the probabilities to the
    cache's dtype before the P.V product (as flash attention does): each weight is off by up
    to one half-ulp of that dtype (relative), so the output, a convex combination of value
    rows, is off by at most eps * max|v| of the row, plus its own rounding to the dtype
    (eps * |out| <= eps * max|v|). 2 eps max|v|, with 1e-6 max|v| for float32's different
    summation order."""
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-6
    return 2 * eps * values.double().abs().amax(dim=(2, 3))      # [B, H_kv]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(case=slot_buffers())
@settings(max_examples=examples(12), deadline=None)
def test_decode_attention_matches_the_reference(case, dtype):
    q, k, v, start, length = inputs(case, dtype)
    scale = q.shape[-1] ** -0.5
    got = decode_attention(q, k, v, start, length, scale)
    want = reference.slot_attention(q, k, v, start, length, scale)
    assert got.shape == want.shape and got.dtype == dtype
    group = q.shape[1] // k.shape[1]
    allowed = tolerance(v, dtype).repeat_interleave(group, 1)[:, None, :, None]
    err = (got.double() - want).abs()
    assert (err <= allowed).all(), f"max error {err.max().item():.3g}, allowed {allowed.min().item():.3g}"


def test_inputs_are_left_alone_and_splits_follow_shapes_only():
    case = (2, 2, 4, 64, 64, 600, 500, [0, 37], 5)
    q, k, v, start, length = inputs(case, torch.float16)
    before = [x.clone() for x in (q, k, v, start, length)]
    decode_attention(q, k, v, start, length, 0.125)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, start, length)))
    device = torch.device(DEVICE)
    assert splits_for(4, 600, device) == splits_for(4, 600, device) >= 1
    assert splits_for(4, 100, device) == 1      # a chunk is never under MIN_CHUNK slots


@pytest.mark.parametrize("splits", [1, 3])
def test_one_split_writes_the_output_without_a_merge(monkeypatch, splits):
    """With one split the split kernel normalizes and writes the output (and lse) itself: one
    launch instead of two, and the same result as the reference, as with the merge."""
    from tritonkv.kernels import decode
    monkeypatch.setattr(decode, "splits_for", lambda *_: splits)
    q, k, v, start, length = inputs((2, 2, 3, 80, 64, 700, 650, [0, 301], 11), torch.float32)
    c, hq = k.shape[2], q.shape[1]
    logits, lse = torch.empty(2, hq, c, device=DEVICE), torch.empty(2, hq, device=DEVICE)
    launches, _ = decode.decode_launches(q, k, v, start, length, 0.125, (logits, lse))
    assert len(launches) == (1 if splits == 1 else 2)
    got = decode_attention(q, k, v, start, length, 0.125, scores=(logits, lse))
    want = reference.slot_attention(q, k, v, start, length, 0.125)
    assert (got.double() - want).abs().max() <= tolerance(v, torch.float32).max()
    seen = (torch.arange(c, device=DEVICE) >= start[:, None]) & (torch.arange(c, device=DEVICE) < length)
    want_lse = torch.logsumexp(logits.double().masked_fill(~seen[:, None], float("-inf")) * math.log(2), -1)
    assert torch.allclose(lse.double(), want_lse / math.log(2), rtol=0, atol=1e-4)


def test_bad_shapes_are_refused():
    q, k, v, start, length = inputs((1, 2, 2, 64, 64, 10, 5, [0], 0), torch.float32)
    with pytest.raises(ValueError, match="query: expected one query per row"):
        decode_attention(q.expand(-1, -1, 2, -1), k, v, start, length, 0.1)
    with pytest.raises(ValueError, match="keys / values"):
        decode_attention(q[:, :3], k, v, start, length, 0.1)


def logits_tolerance(q, k, group, factor):
    """|error| of a logit q . k * factor computed from float32 products and sums: the products
    of two float16 / bfloat16 numbers are exact in float32 (float32 operands round once),
    and a sum of D terms in any order is off by at most (D - 1) 2^-24 sum_d |q_d k_d|; the
    final scaling rounds once more. (D + 2) 2^-24 sum_d |q_d k_d| |factor| bounds it all."""
    d = q.shape[-1]
    kk = k.double().abs().repeat_interleave(group, 1)             # [B, H_q, C, D]
    mass = torch.einsum("bhqd,bhnd->bhqn", q.double().abs(), kk)[:, :, 0]
    return (d + 2) * 2.0 ** -24 * mass * abs(factor) + 1e-30


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(case=slot_buffers())
@settings(max_examples=examples(8), deadline=None)
def test_decode_scores_are_the_logits_and_their_log_sum_exp(case, dtype):
    """``scores=``: base-2 logits of the slots read (the others untouched) and their lse, which
    make 2^(logits - lse) the attention the output was computed with."""
    q, k, v, start, length = inputs(case, dtype)
    b, hq, c = q.shape[0], q.shape[1], k.shape[2]
    group = hq // k.shape[1]
    scale = q.shape[-1] ** -0.5
    factor = scale * math.log2(math.e)
    logits = torch.full((b, hq, c), float("nan"), device=DEVICE)
    lse = torch.full((b, hq), float("nan"), device=DEVICE)
    plain = decode_attention(q, k, v, start, length, scale)
    out = decode_attention(q, k, v, start, length, scale, scores=(logits, lse))
    assert torch.equal(out, plain)                                   # the output does not change
    want = torch.einsum("bhqd,bhnd->bhqn", q.double(), k.double().repeat_interleave(group, 1))[:, :, 0] * factor
    slots = torch.arange(c, device=DEVICE)
    seen = ((slots >= start[:, None]) & (slots < length))[:, None, :].expand(-1, hq, -1)
    assert torch.isnan(logits[~seen]).all()                          # slots not read are not written
    err = (logits.double() - want).abs()
    allowed = logits_tolerance(q, k, group, factor)
    assert (err[seen] <= allowed[seen]).all(), f"max logit error {err[seen].max().item():.3g}"
    want_lse = torch.logsumexp(logits.double().masked_fill(~seen, float("-inf")) * math.log(2), -1) / math.log(2)
    # the kernel's sum of 2^(s - m) over C terms, merged over the splits, then log2: relative
    # error C * 2^-23 in the sum (exp2 of float32 adds 2 ulp per term), |log2(1 + e)| <= 1.5 e
    sum_err = 1.5 * (c + 4) * 2.0 ** -23
    assert torch.allclose(lse.double(), want_lse, rtol=0, atol=sum_err + 1e-6), \
        f"max lse error {(lse.double() - want_lse).abs().max().item():.3g}"


def test_bad_scores_are_refused():
    q, k, v, start, length = inputs((1, 2, 2, 64, 64, 10, 5, [0], 0), torch.float32)
    logits, lse = torch.empty(1, 4, 10, device=DEVICE), torch.empty(1, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"scores\[0\] \(logits\): expected a float32 tensor \[1, 4, 10\]"):
        decode_attention(q, k, v, start, length, 0.1, scores=(logits[:, :, :9], lse))
    with pytest.raises(ValueError, match=r"scores\[1\] \(lse\)"):
        decode_attention(q, k, v, start, length, 0.1, scores=(logits, lse.double()))
