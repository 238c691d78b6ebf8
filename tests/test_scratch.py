"""Scratch memory of a compiled call: about one float32 per token and head (the one slot that
the clauses rank), whatever the policy mixes: a sample clause shares its top clause's slot
(kernels/keys.py), and the statistics partials live in the slots' memory until the score
kernel writes them (tritonkv/geometry.py). One exception, by design: a one-query proxy
attention (TOVA) keeps its statistics pass's logits, G float32 per token and head, so that
its score pass reads them instead of K (16 bytes against a 256-byte key at G = 4, D = 128).
Measured from prepared calls; nothing is launched."""

import pytest
import torch

from tritonkv import geometry, policies
from tritonkv.adaptive import prepare_adaptive
from tritonkv.budget import allocate
from tritonkv.compiler import compile_policy, prepare
from tritonkv.kernels import select
from tritonkv.kernels.common import cdiv
from tritonkv.lowering import lower

B, H_KV, N, D = 1, 8, 131072, 128
H_Q, WINDOW = 32, 64                 # perf/test_evict.py's proxy queries: 4 per KV head, a 64-query window
LIMIT = 4.1                          # bytes per token and head
GPU_SMS, GPU_SELECT_PER_SM = 132, 2  # an H200, and the select launcher's occupancy before it learns one

NAMES = sorted(set(policies.PRESETS) - {"adakv"}) + sorted(policies.COMPOSITES)   # AdaKV: its own test below


def logits_kept(policy) -> float:
    """Bytes per token and head of logits a one-query proxy attention keeps (kernels/proxy.py)."""
    from tritonkv import dsl
    ones = any(isinstance(n, dsl.ProxyAttention) and n.window == 1 for s in policy.scores for n in dsl.walk(s))
    return 4.0 * (H_Q // H_KV) if ones else 0.0


def policy_named(name):
    if name in policies.COMPOSITES:
        return policies.COMPOSITES[name]
    if name == "nacl":
        return policies.nacl(proxy_window=WINDOW)   # its default window is 1% of N: 1311 queries here
    return policies.PRESETS[name]()


def scratch_per_token_head(policy, budget: float) -> float:
    keys = torch.empty(B, H_KV, N, D, dtype=torch.bfloat16)   # never touched: prepare only allocates
    queries = torch.empty(B, H_Q, WINDOW, D, dtype=torch.bfloat16)
    policy, alloc = lower(policy, allocate(policy, N, int(budget * N)))
    named = [torch.empty(H_KV, D) for _ in policy.directions]
    compiled = compile_policy(policy)
    call = prepare_adaptive(compiled, policy, alloc, keys, keys, queries, 0, named) if policy.heads == "adaptive" \
        else prepare(compiled, alloc, keys, keys, queries, 0, named)
    scratch = 0 if call.scratch is None else call.scratch.numel() * call.scratch.element_size()
    return scratch / (B * H_KV * N)


@pytest.fixture(params=["cpu", "gpu-like"])
def launch_rules(request, monkeypatch):
    """The CPU's programs per row, or those of a GPU with GPU_SMS multiprocessors (more
    statistics partials, more select programs and their per-program state)."""
    if request.param == "gpu-like":
        monkeypatch.setattr(geometry, "stats_splits",
                            lambda rows, n_tiles, device: max(1, min(n_tiles, cdiv(4 * GPU_SMS, rows))))
        monkeypatch.setattr(select, "programs_per_row", lambda rows, n, device, resident: max(1, min(
            GPU_SELECT_PER_SM * GPU_SMS // rows, cdiv(n, select.chunk_unit(n)), select.MAX_PROGRAMS_PER_ROW)))
    geometry.clear_geometry()
    yield request.param
    geometry.clear_geometry()


@pytest.mark.parametrize("name", NAMES)
def test_scratch_is_about_one_float_per_token_and_head(name, launch_rules):
    policy = policy_named(name)
    for budget in (0.1, 0.5):
        used = scratch_per_token_head(policy, budget)
        limit = LIMIT + logits_kept(policy)
        assert used <= limit, f"{name} at budget {budget} ({launch_rules}): {used:.4f} B per token and head"


def test_adakv_adds_one_byte_of_mask(launch_rules):
    """AdaKV (tritonkv/adaptive.py): the slot, both selects' state, and a uint8 mask of the kept
    tokens (its two selects mark it instead of writing indices; the pack reads it)."""
    for budget in (0.1, 0.5):
        used = scratch_per_token_head(policies.adakv(), budget)
        assert used <= LIMIT + 1.0, f"adakv at budget {budget} ({launch_rules}): {used:.4f} B per token and head"


def test_tova_keeps_its_logits_and_nothing_more(monkeypatch):
    """TOVA's scratch is its slot and select's state plus G = 4 logits per token and head;
    TRITONKV_PROXY_LOGITS=0 (two passes over K) takes them away again."""
    geometry.clear_geometry()
    kept = scratch_per_token_head(policies.tova(), 0.1)
    monkeypatch.setenv("TRITONKV_PROXY_LOGITS", "0")
    geometry.clear_geometry()
    try:
        plain = scratch_per_token_head(policies.tova(), 0.1)
    finally:
        geometry.clear_geometry()
    assert plain <= LIMIT and abs(kept - plain - 16.0) < 0.01, (kept, plain)


def test_a_sample_clause_shares_its_top_clause_slot():
    """NACL (top and sample of one score) and snapkv+sample (top of x, sample of x.normalize())
    store one slot; the sample clause's noise, and its normalize, are applied as select loads it."""
    for policy in (policies.nacl(), policies.snapkv_sampled()):
        program = compile_policy(policy).program
        assert len(program.slots) == 1
        top, sample = program.clause_keys
        assert (top.slot, top.sampled) == (0, False) and (sample.slot, sample.sampled) == (0, True)
    assert compile_policy(policies.snapkv_sampled()).program.clause_keys[1].normalized
