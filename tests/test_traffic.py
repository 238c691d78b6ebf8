"""Bytes a compiled call moves, launch by launch, counted in Triton's interpreter
(tests/traffic.py): a score reduced across KV heads (TOVA) is reduced in the score kernel's
registers, so its call moves the slots as a single-pass policy's does (one float32 per token
and head, written once by the score kernel, read by select), with no pass over them between."""

import pytest
import torch

from tritonkv import dsl, policies
from tritonkv.budget import allocate
from tritonkv.compiler import compile_policy, prepare, score
from tritonkv.kernels.common import interpreting
from tritonkv.lowering import lower

from .traffic import Traffic

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts the interpreter's loads and stores")

B, H, G, N, D = 2, 4, 2, 300, 32   # N: a partial last tile; 3 programs per row on the CPU


def _inputs(dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(B, H, N, D, generator=gen).to(dtype)
    values = torch.randn(B, H, N, D, generator=gen).to(dtype)
    queries = torch.randn(B, H * G, 8, D, generator=gen).to(dtype)
    return keys, values, queries


def measured(policy, budget=0.1):
    keys, values, queries = _inputs()
    policy, alloc = lower(policy, allocate(policy, N, int(budget * N)))
    call = prepare(compile_policy(policy), alloc, keys, values, queries, 0)
    regions = dict(keys=keys, values=values, queries=queries, slots=call.priorities, scratch=call.scratch,
                   indices=call.indices, out_keys=call.keys, out_values=call.values)
    return Traffic(regions).run(call)


def test_tova_reads_each_key_once_per_pass_and_writes_one_float_per_token_and_head():
    tova, knorm = measured(policies.tova()), measured(policies.knorm())
    # the softmax statistics of the last query (stats_0 / merge_0), the score, select: no transform
    assert tova.kernels == ["stats_0", "merge_0", "score", "_select_kernel"]
    k_bytes, slot_bytes = B * H * N * D * 2, B * H * N * 4
    for kernel in ("stats_0", "score"):   # each pass reads every key of every head once
        assert tova.bytes[(kernel, "keys", "load")] == tova.unique[(kernel, "keys", "load")] == k_bytes
    assert tova.total("keys", "load") - tova.total("keys", "load", "_select_kernel") == 2 * k_bytes
    # of the queries only the last one of each query head (the window), re-read per tile from cache
    assert tova.unique[("score", "queries", "load")] == B * H * G * D * 2
    # the slots: one float32 per token and head, each written once by the score kernel and
    # never read back before select, as knorm's (a single-pass policy)
    for call in (tova, knorm):
        assert call.bytes[("score", "slots", "store")] == call.unique[("score", "slots", "store")] == slot_bytes
        assert ("score", "slots", "load") not in call.bytes
    assert tova.total("slots", "store") - tova.total("slots", "store", "stats_0") == slot_bytes   # stats_0: partials
    assert tova.total("slots", "load", "merge_0") + tova.total("slots", "load", "_select_kernel") \
        == tova.total("slots", "load")
    assert tova.bytes[("_select_kernel", "slots", "load")] <= knorm.bytes[("_select_kernel", "slots", "load")]


def test_head_reduce_in_the_score_kernel_equals_the_reduce_of_each_heads_score():
    """TOVA's priorities are the per-group scores (tova_per_group, the same kernel without the
    head reduce) added in head order and divided by H, bit for bit; NaN counts as -inf."""
    keys, values, queries = _inputs(torch.float32)
    per_head = score(compile_policy(lower(policies.tova_per_group(), allocate(policies.tova_per_group(), N, 30))[0]),
                     keys, values, queries, 0)[0].view(B, H, N)
    tova = score(compile_policy(lower(policies.tova(), allocate(policies.tova(), N, 30))[0]),
                 keys, values, queries, 0)[0].view(B, H, N)
    want = torch.zeros(B, N)
    for h in range(H):
        want = want + per_head[:, h].nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    assert torch.equal(tova, (want / H).unsqueeze(1).expand(B, H, N))


def _transform_heads(policy):
    return [s.transform_heads for s in compile_policy(dsl.as_policy(policy)).program.slots]


def test_which_head_reduces_the_score_kernel_does():
    """All but a head reduce of ``x.normalize()``, whose heads are standardized one by one after
    the score kernel (kernels/deferred.py) before the transform combines them."""
    assert compile_policy(policies.tova()).program.owns_heads and _transform_heads(policies.tova()) == [None]
    chunked = policies.chunkkv(window=8, head_reduce="sum")   # the transform then reduces chunks only
    assert compile_policy(chunked).program.owns_heads and _transform_heads(chunked) == [None]
    normalized = dsl.top(dsl.key_norm().normalize(), head_reduce="mean")
    assert not compile_policy(dsl.as_policy(normalized)).program.owns_heads
    assert _transform_heads(normalized) == ["mean"]
    assert not compile_policy(policies.knorm()).program.owns_heads
