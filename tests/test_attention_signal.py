"""kernels/attention_signal.py against reference.attention_signal, and the two together
(the decode kernel's scores reduced) against reference.proxy_attention(window=1): TOVA's
score from the logits of the decode step, equal to the one a proxy-attention pass computes."""

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonkv import dsl, reference
from tritonkv.kernels.attention_signal import attention_signal
from tritonkv.kernels.decode import decode_attention

from .devices import CUDA, DEVICE
from .strategies import GQA_RATIOS, HEAD_DIMS, examples

HOWS = ["mean", "sum", "max"]
# tl.exp2 on the GPU is ex2.approx.f32 (relative error < 2^-22, PTX ISA), torch.exp2 is within
# 1 ulp: 2^-21 relative per probability; a mean / sum of G of them adds G ulp of 2^-24.
RTOL = 2.0 ** -21 + 8 * 2.0 ** -24


@given(b=st.integers(1, 3), h=st.integers(1, 3), group=st.sampled_from(GQA_RATIOS + [3]),
       n=st.one_of(st.just(1), st.integers(2, 70), st.integers(1000, 2100)), how=st.sampled_from(HOWS),
       accumulate=st.booleans(), seed=st.integers(0, 2 ** 31))
@settings(max_examples=examples(16), deadline=None)
def test_attention_signal_matches_the_reference(b, h, group, n, how, accumulate, seed):
    """Every shape, reduction and seed; ``accumulate`` adds to a prior sum (one float32 addition
    more: half an ulp of the result)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, h * group, n, generator=g) * 4).to(DEVICE)
    lse = torch.logsumexp(logits * math.log(2), -1) / math.log(2)
    prior = (torch.rand(b, h, n, generator=g) * 3).to(DEVICE) if accumulate else None
    before = logits.clone(), lse.clone()
    want = reference.attention_signal(logits, lse, group, how) + (0 if prior is None else prior)
    got = attention_signal(logits, lse, group, how, out=prior, accumulate=accumulate)
    assert got.shape == (b, h, n) and got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=RTOL + 2.0 ** -24, atol=1e-38)
    assert torch.equal(before[0], logits) and torch.equal(before[1], lse)


@given(b=st.integers(1, 3), h=st.integers(1, 3), group=st.sampled_from(GQA_RATIOS),
       n=st.one_of(st.just(1), st.integers(2, 70), st.integers(1000, 2100)), data=st.data())
@settings(max_examples=examples(12), deadline=None)
def test_rank_is_the_sum_with_the_newest_positions_first(b, h, group, n, data):
    """``rank``: the accumulated sum, +inf where a slot's position is among the ``recent`` newest
    (above the fresh slot's position minus ``recent``; positions shuffled over the slots, as a
    cache that fills holes holds them), exactly reference.recency_ranked of the sum the
    launch wrote."""
    seed = data.draw(st.integers(0, 2 ** 31), "seed")
    fresh = data.draw(st.integers(0, n - 1), "fresh")
    recent = data.draw(st.integers(0, n), "recent")
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, h * group, n, generator=g) * 4).to(DEVICE)
    lse = torch.logsumexp(logits * math.log(2), -1) / math.log(2)
    acc = (torch.rand(b, h, n, generator=g) * 3).to(DEVICE)
    positions = torch.stack([torch.randperm(n, generator=g) + 7 for _ in range(b * h)]).view(b, h, n).to(DEVICE)
    before = positions.clone()
    slot = torch.tensor([fresh], device=DEVICE)
    rank = torch.full((b, h, n), -1.0, device=DEVICE)
    attention_signal(logits, lse, group, "sum", out=acc, accumulate=True, fresh=slot, rank=rank,
                     positions=positions, recent=recent)
    want = reference.recency_ranked(acc, positions, positions[:, :, fresh:fresh + 1], recent)
    assert torch.equal(rank, want) and torch.equal(positions, before)


def test_rank_refuses_what_it_cannot_rank():
    logits = torch.randn(1, 4, 9, device=DEVICE)
    lse = torch.logsumexp(logits, -1)
    acc = torch.zeros(1, 2, 9, device=DEVICE)
    slot = torch.tensor([3], device=DEVICE)
    positions = torch.arange(9, device=DEVICE).expand(1, 2, 9)
    with pytest.raises(ValueError, match="rank: ranks by the fresh slot's position"):
        attention_signal(logits, lse, 2, out=acc, accumulate=True, rank=torch.zeros_like(acc), positions=positions)
    with pytest.raises(ValueError, match="positions: expected an int64 tensor"):
        attention_signal(logits, lse, 2, out=acc, accumulate=True, fresh=slot, rank=torch.zeros_like(acc),
                         positions=positions.float(), recent=2)
    with pytest.raises(ValueError, match="recent: expected an int in"):
        attention_signal(logits, lse, 2, out=acc, accumulate=True, fresh=slot, rank=torch.zeros_like(acc),
                         positions=positions, recent=10)
    with pytest.raises(ValueError, match="positions, recent: they describe the rank output"):
        attention_signal(logits, lse, 2, out=acc, accumulate=True, fresh=slot, positions=positions)


def test_a_strided_output_is_filled_in_place():
    logits = torch.randn(2, 8, 33, device=DEVICE)
    lse = torch.logsumexp(logits * math.log(2), -1) / math.log(2)
    big = torch.zeros(2, 2, 40, device=DEVICE)
    out = attention_signal(logits, lse, 4, "mean", out=big[:, :, :33])
    assert out.data_ptr() == big.data_ptr() and (big[:, :, 33:] == 0).all()
    assert torch.allclose(big[:, :, :33], reference.attention_signal(logits, lse, 4, "mean"), rtol=RTOL)


@functools.lru_cache(maxsize=None)
def _decoded(d, dtype):
    """(query, keys, decode's logits and lse) of one decode launch per (D, dtype), shared by the
    three reductions below (the launch does not depend on them; the tests only read these)."""
    g = torch.Generator().manual_seed(d)
    # slots over two splits of the decode kernel (decode.splits_for; off the GPU: C > 256), the
    # last tile partly filled; the interpreter a shorter buffer
    b, h, group, c = 2, 2, 4, 777 if CUDA else 333
    q = torch.randn(b, h * group, 1, d, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(b, h, c, d, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(b, h, c, d, generator=g).to(dtype).to(DEVICE)
    logits = torch.empty(b, h * group, c, device=DEVICE)
    lse = torch.empty(b, h * group, device=DEVICE)
    decode_attention(q, k, v, torch.zeros(b, dtype=torch.int64, device=DEVICE),
                     torch.tensor(c, device=DEVICE), d ** -0.5, scores=(logits, lse))
    return q, k, logits, lse


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("how", HOWS)
def test_decode_scores_give_the_last_query_attention(d, dtype, how):
    """What StaticEvictingCache feeds TOVA: decode's scores reduced here equal the proxy
    attention of the same query (window 1) to the same keys. The reference rounds the bf16
    logits' float32 sums differently: 1e-5 relative covers (D + 2) 2^-24 per logit
    times |logit| <= ~10 in the exponent."""
    q, k, logits, lse = _decoded(d, dtype)
    group = q.shape[1] // k.shape[1]
    got = attention_signal(logits, lse, group, how)
    node = dsl.proxy_attention(window=1, group_reduce=how)
    want = reference.proxy_attention(node, k.float(), q.float())
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-12), f"max error {(got - want).abs().max().item():.3g}"


def test_bad_arguments_are_refused_before_any_kernel():
    logits, lse = torch.zeros(1, 4, 8), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="logits: expected a float32 tensor"):
        attention_signal(logits.double(), lse, 2)
    with pytest.raises(ValueError, match=r"lse: expected a float32 tensor \[1, 4\]"):
        attention_signal(logits, lse[:, :3], 2)
    with pytest.raises(ValueError, match="group: expected query heads per KV head"):
        attention_signal(logits, lse, 3)
    with pytest.raises(ValueError, match="how: expected one of"):
        attention_signal(logits, lse, 2, "median")
    with pytest.raises(ValueError, match=r"out: expected a float32 tensor \[1, 2, 8\]"):
        attention_signal(logits, lse, 2, out=torch.zeros(1, 2, 7))


@pytest.mark.parametrize("how", HOWS)
def test_accumulate_adds_the_signal_to_out(how):
    """accumulate=True: out + the signal, in place (H2O's attention summed over decode steps),
    every element once, a strided out included; without out it is refused."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 6, 1500, generator=g) * 3).to(DEVICE)
    lse = torch.logsumexp(logits * math.log(2), -1) / math.log(2)
    big = torch.rand(3, 2, 1600, generator=g).to(DEVICE)
    before = big.clone()
    out = attention_signal(logits, lse, 3, how, out=big[:, :, :1500], accumulate=True)
    assert out.data_ptr() == big.data_ptr() and torch.equal(big[:, :, 1500:], before[:, :, 1500:])
    want = before[:, :, :1500] + reference.attention_signal(logits, lse, 3, how)
    # one float32 addition more than the signal alone: half an ulp of the sum
    assert torch.allclose(big[:, :, :1500], want, rtol=RTOL + 2.0 ** -24, atol=1e-38)
    # the slot a step just wrote starts from 0 (fresh), in every row
    fresh = torch.tensor([777], device=DEVICE)
    again = before[:, :, :1500].clone()
    attention_signal(logits, lse, 3, how, out=again, accumulate=True, fresh=fresh)
    want[:, :, 777] = reference.attention_signal(logits, lse, 3, how)[:, :, 777]
    assert torch.allclose(again, want, rtol=RTOL + 2.0 ** -24, atol=1e-38)
    with pytest.raises(ValueError, match="fresh: expected .with accumulate=True. an int64 tensor of one slot"):
        attention_signal(logits, lse, 3, how, out=again, fresh=fresh)
    with pytest.raises(ValueError, match="fresh: expected"):
        attention_signal(logits, lse, 3, how, out=again, accumulate=True, fresh=torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="out: accumulate=True adds to out"):
        attention_signal(logits, lse, 3, how, accumulate=True)
    with pytest.raises(ValueError, match="accumulate: expected a bool"):
        attention_signal(logits, lse, 3, how, out=big[:, :, :1500], accumulate=1)
