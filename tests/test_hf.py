"""Hugging Face integration on a randomly initialized tiny Llama (no weights needed)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tritonkv as tkv  # noqa: E402
from tritonkv import policies  # noqa: E402
from tritonkv.budget import pyramid_budgets  # noqa: E402
from tritonkv.integrations import hf  # noqa: E402
from tritonkv.integrations.cache import _attend_packed  # noqa: E402
from .tiny_llama import tiny_llama, tokens  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def prompt(b=2, n=240, seed=1):
    return tokens(b, n, seed, low=0)


def test_full_cache_decodes_like_transformers(model):
    ids = prompt()
    state = hf.prefill(model, ids)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(hf.generate(model, state, 6), ref)


def test_extend_continues_the_prompt(model):
    """Prefill + extend with the full cache equals prefilling the whole prompt; after an
    eviction, extend appends at the true positions and never evicts."""
    ids = prompt(n=150)
    whole = hf.prefill(model, ids)
    state = hf.extend(model, hf.prefill(model, ids[:, :-3]), ids[:, -3:])
    assert state.position == 150
    torch.testing.assert_close(state.logits, whole.logits, rtol=1e-4, atol=1e-4)   # fp32, another op order
    evicted = hf.prefill(model, ids[:, :-3], policies.streaming_llm(sinks=4), 40)
    calls = []
    hook = model.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        hf.extend(model, evicted, ids[:, -3:])
    finally:
        hook.remove()
    assert len(calls) == 1                    # all the tokens in one forward
    assert evicted.position == evicted.cache.get_seq_length() == 150   # tokens seen
    assert [layer.held for layer in evicted.cache.layers] == [43] * 3     # tokens held
    with pytest.raises(ValueError, match="input_ids"):
        hf.extend(model, evicted, ids[:1, -3:])


def test_eviction_equals_masking_at_true_positions(model):
    """StreamingLLM keeps the same tokens in every layer and head, so decoding on the evicted
    cache must equal the full model run with a mask that is causal over the prompt (prefill
    saw everything) and, for the decoded tokens, hides the evicted ones: this checks that
    decoding resumes at the true positions (RoPE) and attends to exactly the kept tokens."""
    ids = prompt(n=200)
    state = hf.prefill(model, ids, policies.streaming_llm(sinks=4), 40)
    kept = state.kept[0].indices[0, 0]
    assert kept.tolist() == [0, 1, 2, 3] + list(range(164, 200))
    tokens = hf.generate(model, state, 5)
    visible = torch.zeros(205, dtype=torch.bool)
    visible[kept] = True
    visible[200:] = True
    allowed = torch.ones(205, 205, dtype=torch.bool).tril()
    allowed[200:] &= visible                  # decoded tokens see only what the cache kept
    seq = torch.cat([ids, tokens], dim=1)
    with torch.no_grad():
        logits = model(seq, attention_mask=allowed[None, None].expand(2, 1, -1, -1),
                       position_ids=torch.arange(205)[None].expand(2, -1)).logits
    want = logits[:, 199:204].argmax(-1)
    assert torch.equal(tokens, want)


def test_proxy_queries_are_the_last_post_rope_queries(model):
    """SnapKV's scores on the captured queries equal the reference on queries recomputed by hand."""
    ids = prompt(b=1, n=150)
    policy = policies.snapkv(window=16)
    state = hf.prefill(model, ids, policy, 0.3)
    # recompute layer 0's queries: embeddings -> norm -> q_proj -> RoPE
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        q = attn.q_proj(h).view(1, 150, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(1, 150, -1, attn.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(150)[None])
        q, k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    want = tkv.evict(k, k, policy, 0.3, queries=q[:, :, -16:], backend="reference")
    assert torch.equal(state.kept[0].indices, want.indices)


def test_pyramid_budgets_per_layer(model):
    ids = prompt(n=300)
    state = hf.prefill(model, ids, policies.pyramidkv(policies.snapkv(window=16)), 0.2)
    assert [layer.keys.shape[2] for layer in state.cache.layers] == pyramid_budgets(60, 3, 20.0)
    explicit = hf.prefill(model, ids, policies.keydiff(), None, layer_budgets_=[100, 50, 10])
    assert [layer.keys.shape[2] for layer in explicit.cache.layers] == [100, 50, 10]
    assert hf.generate(model, explicit, 3).shape == (2, 3)


def test_chunked_prefill_bounds_the_cache(model, monkeypatch):
    ids = prompt(n=330)
    seen = []
    original = hf.EvictingLayer.evict

    def spy(layer, k):
        seen.append(layer.held)
        return original(layer, k)

    monkeypatch.setattr(hf.EvictingLayer, "evict", spy)
    state = hf.prefill(model, ids, policies.keydiff(sinks=4), 64, chunk_size=50)
    assert max(seen) <= 64 + 50                  # never more than budget + one chunk
    assert all(layer.keys.shape[2] == 64 for layer in state.cache.layers)
    assert state.position == 330 and state.cache.get_seq_length() == 330
    assert state.kept[0].indices[0, 0, :4].tolist() == [0, 1, 2, 3]   # sinks are the sequence's first tokens
    # with a budget covering the prompt, chunked prefill equals one forward pass
    full = hf.prefill(model, ids)
    chunked = hf.prefill(model, ids, policies.keydiff(), 330, chunk_size=64)
    torch.testing.assert_close(chunked.logits, full.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(hf.generate(model, chunked, 4), hf.generate(model, full, 4))


def test_adaptive_heads_use_a_packed_layout(model):
    ids = prompt(n=256)
    state = hf.prefill(model, ids, policies.adakv(policies.snapkv(window=16)), 0.25)
    packed = state.cache.layers[0].packed
    assert packed.keys.shape[0] == int(packed.lengths.sum()) == 2 * 2 * 64   # no padding
    assert len(set(packed.lengths.flatten().tolist())) > 1                    # budgets differ by head
    hf.extend(model, state, prompt(n=3, seed=5))                              # several tokens in one forward
    assert hf.generate(model, state, 4).shape == (2, 4)


@pytest.mark.parametrize("t", [1, 3])
def test_packed_attention_matches_dense_per_head(t):
    """T new queries see every packed row of their head and the dense rows causally."""
    torch.manual_seed(0)
    b, h, g, d = 2, 3, 2, 16
    lengths = torch.tensor([[5, 9, 2], [7, 1, 4]])
    keys = [[torch.randn(int(n), d) for n in row] for row in lengths]
    values = [[torch.randn(int(n), d) for n in row] for row in lengths]
    packed = tkv.EvictedVarlen(torch.cat([k for row in keys for k in row]), torch.cat([v for row in values for v in row]),
                               torch.zeros(int(lengths.sum()), dtype=torch.long), lengths)
    segment = torch.repeat_interleave(torch.arange(b * h), lengths.reshape(-1))
    new_k, new_v = torch.randn(b, h, 4, d), torch.randn(b, h, 4, d)
    q = torch.randn(b, h * g, t, d)
    out = _attend_packed(packed, segment, q, new_k, new_v, 0.25)
    assert out.shape == (b, t, h * g, d)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                seen = 4 - t + ti + 1      # dense rows visible to query ti
                k_all = torch.cat([keys[bi][hi], new_k[bi, hi, :seen]])
                v_all = torch.cat([values[bi][hi], new_v[bi, hi, :seen]])
                for gi in range(g):
                    p = torch.softmax(q[bi, hi * g + gi, ti] @ k_all.T * 0.25, -1)
                    torch.testing.assert_close(out[bi, ti, hi * g + gi], p @ v_all, rtol=1e-5, atol=1e-5)


def test_errors(model):
    with pytest.raises(ValueError, match="chunk_size"):
        hf.prefill(model, prompt(), policies.adakv(policies.snapkv(window=16)), 0.5, chunk_size=64)
    with pytest.raises(ValueError, match="layer_budgets: expected 3"):
        hf.prefill(model, prompt(), policies.keydiff(), None, layer_budgets_=[10, 10])
