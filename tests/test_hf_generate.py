"""EvictingCache inside model.generate, on a randomly initialized tiny Llama (no weights needed).

The central check: decoding through an evicted cache equals the full model with a mask that,
per layer and KV head, hides exactly the evicted positions (positions true, attention over the
kept rows only), for prefill, chunked-prefill and decoding-time eviction alike."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tritonkv as tkv  # noqa: E402
from tritonkv import policies  # noqa: E402
from tritonkv.integrations import hf  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402
from .tiny_llama import tiny_llama, tokens  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def prompt(b=2, n=120, seed=1):
    return tokens(b, n, seed, low=1)


def generate(model, ids, cache=None, **kwargs):
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0) | kwargs
    with torch.no_grad():
        return model.generate(ids, past_key_values=cache, **kwargs)[:, ids.shape[1]:]


@pytest.mark.parametrize("kwargs", [dict(), dict(do_sample=True, top_k=0, temperature=1.5), dict(num_beams=3),
                                    dict(prefill_chunk_size=32)],
                         ids=["greedy", "sampling", "beams", "prefill-chunks"])
def test_full_budget_generates_like_transformers(model, kwargs):
    """Budget = everything (after the prompt and every 3 decoded tokens): token for token the
    output of generate without the cache."""
    ids = prompt()
    torch.manual_seed(7)
    want = generate(model, ids, **kwargs)
    torch.manual_seed(7)
    cache = hf.EvictingCache(model, policies.snapkv(window=8), budget=1.0, interval=3)
    got = generate(model, ids, cache, **kwargs)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == ids.shape[1] + got.shape[1] - 1   # the last token is never fed


class Visible:
    """Records, before each forward of each layer, the positions its held rows stand for."""

    def __init__(self, cache):
        self.forwards = []   # per forward: (first new position, q, [per layer [B, H_kv, held] or None])
        for layer in cache.layers:
            original = layer.update

            def update(k, v, *args, _layer=layer, _original=original, **kwargs):
                if _layer.index == 0:
                    self.forwards.append((_layer.seen, k.shape[2], []))
                held = _layer.positions().clone() if _layer.is_initialized and _layer.held else None
                self.forwards[-1][2].append(held)
                return _original(k, v, *args, **kwargs)

            layer.update = update


_MASKS = {}


def _masked_attention(module, query, key, value, attention_mask, **kwargs):
    return sdpa_attention_forward(module, query, key, value, _MASKS[module.layer_idx], **kwargs)


def masked_reference(model, sequence, visible: Visible):
    """Logits of the full model run forward by forward as the evicting cache was, each query
    seeing, per layer and head, the rows that cache held plus the new tokens up to itself."""
    AttentionInterface.register("tkv_test_masked", _masked_attention)
    AttentionMaskInterface.register("tkv_test_masked", sdpa_mask)
    model.set_attn_implementation("tkv_test_masked")
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    cache = transformers.DynamicCache(config=model.config)
    b = sequence.shape[0]
    logits = []
    try:
        with torch.no_grad():
            for start, q, held in visible.forwards:
                n = start + q
                for i, rows in enumerate(held):
                    h = model.config.num_key_value_heads
                    allowed = torch.zeros(b, h, q, n, dtype=torch.bool)
                    if rows is not None:
                        allowed.scatter_(-1, rows[:, :, None, :].expand(-1, -1, q, -1), True)
                    allowed[..., start:] = torch.ones(q, q, dtype=torch.bool).tril()
                    _MASKS[i] = allowed.repeat_interleave(group, dim=1)
                out = model(sequence[:, start:n], past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
    finally:
        model.set_attn_implementation("sdpa")
    return torch.stack(logits, 1)


@pytest.mark.parametrize("policy, budget, kwargs", [
    (policies.keydiff(sinks=2), 40, dict(interval=4)),                      # per-head selections, decoding
    (policies.snapkv(window=8), 0.3, dict(interval=5, target=30)),          # proxy queries from the buffer
    (policies.tova(), 30, dict(interval=1)),                                # every step (TOVA style)
    (policies.pyramidkv(policies.snapkv(window=8)), 0.4, dict(interval=3)),  # per-layer budgets
    (policies.keydiff(sinks=2), 24, dict(interval=4, prefill_chunk_size=32)),  # chunked prefill + decoding
    (policies.qfilters(recent=4), 30, dict(interval=4, directions={             # per-layer key_dot directions
        "qfilter": torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(3))})),
    (policies.chunkkv(window=8, chunk=5), 40, dict(interval=6, reuse_layers=2)),  # chunks, shared selections
], ids=["keydiff", "snapkv", "tova-every-step", "pyramid", "chunked", "qfilters", "chunkkv-reuse"])
def test_eviction_equals_masking(model, policy, budget, kwargs):
    ids = prompt(n=100)
    chunk = kwargs.pop("prefill_chunk_size", None)
    cache = hf.EvictingCache(model, policy, budget, **kwargs)
    visible = Visible(cache)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             prefill_chunk_size=chunk, output_logits=True, return_dict_in_generate=True)
    assert sum(layer.evictions for layer in cache.layers) >= 2 * 3   # after the prompt and while decoding
    assert max(layer.held for layer in cache.layers) < 100
    scores = torch.stack(out.logits, 1)
    want = masked_reference(model, out.sequences, visible)[:, -scores.shape[1]:]   # prompt chunks: the last one
    torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-4)   # fp32, another op order and mask layout
    assert torch.equal(scores.argmax(-1), want.argmax(-1))


def test_reused_layers_keep_the_rows_of_their_group_leader(model):
    """reuse_layers=2 on 3 layers: layer 1 keeps exactly layer 0's positions, layer 2 chooses."""
    ids = prompt(n=90)
    cache = hf.EvictingCache(model, policies.chunkkv(window=8, chunk=4), 30, interval=5, reuse_layers=2)
    generate(model, ids, cache, max_new_tokens=12)
    first, second, third = (layer.positions() for layer in cache.layers)
    assert torch.equal(first, second) and not torch.equal(first, third)
    assert cache.layers[1].evictions == cache.layers[0].evictions >= 3


def test_windows_are_sequence_positions(model):
    """sink / recent count positions of the whole sequence, however often the cache was evicted."""
    ids = prompt(n=80)
    cache = hf.EvictingCache(model, tkv.sink(3) | tkv.recent(0.1) | tkv.top(-tkv.anchor_similarity()), 30,
                             interval=8)
    generate(model, ids, cache, max_new_tokens=21)   # evictions at 80, 88 and 96 tokens seen
    seen = cache.get_seq_length()
    assert seen == 100
    for layer in cache.layers:
        positions = layer.positions()
        assert positions[..., :3].eq(torch.tensor([0, 1, 2])).all()
        recent = torch.arange(96 - 10, seen)              # 10% of 96 at the last eviction, then 4 decoded
        assert positions[..., -len(recent):].eq(recent).all()
        assert layer.last.indices.eq(positions[..., :30]).all() and layer.held == 34   # Evicted.indices are positions too


def test_query_buffer_holds_the_last_post_rope_queries(model):
    ids = prompt(b=1, n=60)
    cache = hf.EvictingCache(model, policies.snapkv(window=8), 20, interval=3)
    seq = torch.cat([ids, generate(model, ids, cache, max_new_tokens=9)], 1)[:, :-1]   # the tokens fed
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(seq))
        q = attn.q_proj(h).view(1, seq.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(seq.shape[1])[None])
        q, _ = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
    buffer = cache.layers[0].queries
    assert buffer.shape[2] == 64                    # the default window, more than snapkv's 8
    torch.testing.assert_close(buffer, q[:, :, -64:], rtol=1e-5, atol=1e-5)


def test_refusals(model):
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                 # a left-padded row
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, hf.EvictingCache(model, policies.keydiff(), 0.5), attention_mask=mask)
    with pytest.raises(ValueError, match="interval: an adaptive"):
        hf.EvictingCache(model, policies.adakv(), 0.5, interval=8)
    with pytest.raises(NotImplementedError, match="beam search"):
        generate(model, ids, hf.EvictingCache(model, policies.adakv(policies.snapkv(window=8)), 0.5), num_beams=2)
    with pytest.raises(ValueError, match="interval: expected"):
        hf.EvictingCache(model, policies.keydiff(), 0.5, interval=0)
    with pytest.raises(ValueError, match="target"):
        hf.EvictingCache(model, policies.keydiff(), interval=4)
    with pytest.raises(ValueError, match="budget: expected 3"):
        hf.EvictingCache(model, policies.keydiff(), [10, 10])
    with pytest.raises(ValueError, match="budget: a fraction"):
        hf.EvictingCache(model, policies.keydiff(), 1.5)
    with pytest.raises(ValueError, match=r"directions: the policy reads key_dot \['qfilter'\]; got \[\]"):
        hf.EvictingCache(model, policies.qfilters(), 0.5)
    with pytest.raises(ValueError, match=r"directions\['qfilter'\]: expected a tensor \[n_layers=3"):
        hf.EvictingCache(model, policies.qfilters(), 0.5, directions={"qfilter": torch.randn(2, 16)})
    with pytest.raises(ValueError, match="no source for"):
        hf.EvictingCache(model, tkv.top(tkv.signal("prior")), 0.5)
    with pytest.raises(ValueError, match="reuse_layers: layers that share a selection"):
        hf.EvictingCache(model, policies.pyramidkv(), 0.5, reuse_layers=2)
    with pytest.raises(ValueError, match="reuse_layers: expected an int"):
        hf.EvictingCache(model, policies.keydiff(), 0.5, reuse_layers=0)
    config = transformers.MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=32)
    with pytest.raises(ValueError, match="sliding-window"):
        hf.EvictingCache(transformers.MistralForCausalLM(config), policies.keydiff(), 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernels_match_the_reference_while_decoding(model):
    """On CUDA the cache evicts with the compiled kernels; they keep what the reference keeps."""
    gpu = model.to("cuda")
    ids = prompt(n=300).cuda()
    kept = {}
    try:
        for backend in ("triton", "reference"):
            cache = hf.EvictingCache(gpu, policies.snapkv(window=16), 64, interval=16, backend=backend, timing=True)
            tokens = generate(gpu, ids, cache, max_new_tokens=40)
            kept[backend] = (tokens, [layer.positions() for layer in cache.layers])
            assert cache.timer.calls == 3 * 3 and cache.timer.total_ms() > 0
    finally:
        model.to("cpu")
    assert torch.equal(kept["triton"][0], kept["reference"][0])
    for a, b in zip(kept["triton"][1], kept["reference"][1]):
        assert torch.equal(a, b)


def test_generation_benchmark_runs_at_toy_sizes(tmp_path):
    """perf/generation.py end to end on the CPU (the GPU run is the same code at real sizes)."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from perf import generation
    generation.main(["--out", str(tmp_path), "--toy", "--prompts", "64", "--steps", "3", "--warmup", "1"])
    data = json.loads((tmp_path / "generation.json").read_text())
    rows = data["rows"]
    assert [r["mode"] for r in rows] == [m for m, o in generation.modes(64, 3, 1) if generation.runs_here(o, False)]
    assert not any(r["graphs"] for r in rows)
    assert {r["cache"] for r in rows} == {"transformers", "dynamic", "static"}
    for r in rows:
        decoding = r["interval"] is not None and r["interval"] <= 3   # evicts within the 3 timed steps
        warmup = r["interval"] + 1 if decoding else 1
        assert r["tokens_per_s"] > 0 and r["seen"] == 64 + warmup + 3, r
        assert r["sdpa_backend"] == "default" and r["baseline"] == (r["mode"] == "DynamicCache")
        if not r["baseline"]:
            assert max(r["held_per_layer"]) < 64
        if "once" in r["mode"]:   # its buffer holds the warm-up and the timed tokens: no eviction while decoding
            assert r["evictions"] == 0, r
    (target,) = data["targets"]
    assert target["best_baseline"] == "DynamicCache" and target["speedup"] > 0
    generation.main(["--out", str(tmp_path / "merged"), "--merge", str(tmp_path / "generation.json"),
                     str(tmp_path / "generation.json")])   # runs split over device calls, one file
    merged = json.loads((tmp_path / "merged" / "generation.json").read_text())
    assert merged["rows"] == rows + rows and len(merged["targets"]) == 1
    assert (tmp_path / "generation.png").stat().st_size > 0
