"""StaticEvictingCache (fixed-capacity layer buffers) inside model.generate, on a randomly
initialized tiny Llama (no weights needed): equality with plain generate when nothing is
evicted (left-padded batches included, per row), with EvictingCache at real budgets, with each
row generated alone; shapes that never change; decode steps that read no GPU value."""

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tritonkv as tkv  # noqa: E402
from tritonkv import policies, reference  # noqa: E402
from tritonkv.integrations import hf  # noqa: E402
from tritonkv.integrations import static as static_module  # noqa: E402
from tritonkv.integrations import step_scores  # noqa: E402
from tritonkv.integrations.buffer import copy_slots  # noqa: E402
from tritonkv.runtime import Evictor  # noqa: E402
from .devices import CUDA, DEVICE, to_device  # noqa: E402
from .tiny_llama import tiny_llama, tokens  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@contextlib.contextmanager
def on_device(model):
    """The model on DEVICE (where the compiled kernels run: CUDA, or the CPU interpreter)."""
    try:
        yield model.to(DEVICE)
    finally:
        model.to("cpu")


def prompt(b=2, n=120, seed=1):
    return tokens(b, n, seed, low=1)


# rows of the equal-length prompt of tests whose point holds per row (one in the interpreter,
# where every row costs its programs in every decode step; the left-padded batches keep three)
ROWS = 2 if CUDA else 1


LENGTHS = [90, 60, 20]   # a left-padded batch: real tokens per row


def padded(lengths=LENGTHS, seed=2):
    n = max(lengths)
    ids = prompt(len(lengths), n, seed)
    mask = torch.ones_like(ids)
    for b, real in enumerate(lengths):
        ids[b, :n - real] = 0
        mask[b, :n - real] = 0
    return ids, mask


def generate(model, ids, cache=None, mask=None, **kwargs):
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0) | kwargs
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, past_key_values=cache, **kwargs)[:, ids.shape[1]:]


@pytest.mark.parametrize("kwargs", [dict(), dict(do_sample=True, top_k=0, temperature=1.5), dict(num_beams=3),
                                    dict(prefill_chunk_size=32)],
                         ids=["greedy", "sampling", "beams", "prefill-chunks"])
@pytest.mark.parametrize("pad", [False, True], ids=["equal-lengths", "left-padded"])
def test_everything_fits_generates_like_transformers(model, kwargs, pad):
    """A budget that holds the whole sequence: token for token plain generate, per row of a
    left-padded batch too (pad tokens never enter the buffer, the mask hides the empty slots)."""
    ids, mask = padded() if pad else (prompt(), None)
    torch.manual_seed(7)
    want = generate(model, ids, mask=mask, **kwargs)
    torch.manual_seed(7)
    cache = hf.StaticEvictingCache(model, policies.snapkv(window=8), 200, interval=3)
    got = generate(model, ids, cache, mask=mask, **kwargs)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == ids.shape[1] + got.shape[1] - 1
    assert all(layer.buffer.keys.shape[2] == 203 for layer in cache.layers)


CASES = [
    (policies.keydiff(sinks=2), 40, dict(interval=4)),
    (policies.snapkv(window=8), 30, dict(interval=5)),
    (policies.tova(), 30, dict(interval=1)),
    (policies.streaming_llm(sinks=4), 24, dict(interval=7)),
    (policies.pyramidkv(policies.snapkv(window=8)), 40, dict(interval=3)),
    (policies.qfilters(recent=4), 30, dict(interval=4, directions={
        "qfilter": torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(3))})),
]
IDS = ["keydiff", "snapkv", "tova-every-step", "streaming", "pyramid", "qfilters"]


@pytest.mark.parametrize("policy, budget, kwargs", CASES, ids=IDS)
def test_same_tokens_as_the_growing_cache(model, policy, budget, kwargs):
    """Prompt >= budget, int budget, deterministic policy: the same evictions at the same steps
    as EvictingCache, so the same kept positions in every layer and the same tokens."""
    ids = prompt(b=ROWS, n=100)
    dynamic = hf.EvictingCache(model, policy, budget, **kwargs)
    static = hf.StaticEvictingCache(model, policy, budget, **kwargs)
    # the interpreter: fewer decode steps (two evictions or more: the prompt's, then every interval)
    new = 13 if CUDA else (9 if kwargs["interval"] > 1 else 7)
    want = generate(model, ids, dynamic, max_new_tokens=new)
    got = generate(model, ids, static, max_new_tokens=new)
    assert torch.equal(got, want)
    for a, b in zip(dynamic.layers, static.layers):
        assert a.evictions == b.evictions >= 2
        assert torch.equal(a.positions(), b.positions())


@pytest.mark.parametrize("budget, interval, chunk", [(16, 1, None), (33, 8, None), (50, 2, 40), (20, 16, 25)])
def test_budgets_and_intervals(model, budget, interval, chunk):
    ids = prompt(b=ROWS, n=80, seed=budget)
    policy = tkv.sink(2) | tkv.recent(3) | tkv.top(-tkv.anchor_similarity())
    dynamic = hf.EvictingCache(model, policy, budget, interval=interval)
    static = hf.StaticEvictingCache(model, policy, budget, interval=interval)
    new = 12 if CUDA or interval > 1 else 7   # the interpreter: fewer every-step evictions
    want = generate(model, ids, dynamic, max_new_tokens=new, prefill_chunk_size=chunk)
    got = generate(model, ids, static, max_new_tokens=new, prefill_chunk_size=chunk)
    assert torch.equal(got, want)
    assert static.layers[0].held == dynamic.layers[0].held <= budget + interval
    assert torch.equal(static.layers[2].positions(), dynamic.layers[2].positions())


@pytest.mark.parametrize("policy, budget, interval", [(policies.keydiff(sinks=2), 40, 4),
                                                      (policies.snapkv(window=8), 30, 5)], ids=["keydiff", "snapkv"])
def test_padded_rows_keep_their_own_budget(model, policy, budget, interval):
    """Every row of a left-padded batch generates what it generates alone, keeping the same
    positions: pad tokens are never kept, and a short row keeps all of its real tokens."""
    ids, mask = padded()
    cache = hf.StaticEvictingCache(model, policy, budget, interval=interval)
    batch = generate(model, ids, cache, mask=mask, max_new_tokens=14)
    for b, real in enumerate(LENGTHS):
        alone_ids = ids[b:b + 1, ids.shape[1] - real:]
        alone = hf.StaticEvictingCache(model, policy, budget, interval=interval)
        assert torch.equal(generate(model, alone_ids, alone, max_new_tokens=14)[0], batch[b])
        for layer, single in zip(cache.layers, alone.layers):
            positions = layer.positions()[b]
            kept = positions[positions >= 0].view(positions.shape[0], -1)
            assert torch.equal(kept, single.positions()[0])
            assert kept.min() >= 0 and kept.max() == real + 12    # positions of the row's own sequence
            assert kept.shape[1] == (real + 13 if real + 13 <= budget + interval else single.held)


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_shapes_never_change_while_decoding(model, monkeypatch, attention):
    """Decode attention (SDPA with its mask, or the decode kernel with its fill tensors) sees
    one key shape at every decode step; the buffers keep their storage."""
    ids = to_device(prompt(b=ROWS, n=60))[0]
    lengths, pointers = set(), set()
    from tritonkv.integrations import attention as module
    name = "sdpa_attention_forward" if attention == "sdpa" else "decode_attention"
    original = getattr(module, name)

    def spy(*args, **kwargs):
        query, key, value, fill = args[1:5] if attention == "sdpa" else args[:4]
        if query.shape[2] == 1:
            lengths.add((tuple(key.shape), tuple(fill.shape)))
            pointers.add(key.data_ptr())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    with on_device(model) as on:
        cache = hf.StaticEvictingCache(on, policies.keydiff(sinks=2), 24, interval=5, attention=attention)
        generate(on, ids, cache, max_new_tokens=17 if CUDA else 12)   # the interpreter: fewer decode steps
    # SDPA's mask [B, 1, 1, C]; the kernel's first occupied slot per row [B]
    assert lengths == {((ROWS, 2, 29, 16), (ROWS, 1, 1, 29) if attention == "sdpa" else (ROWS,))}
    assert pointers == {layer.buffer.keys.data_ptr() for layer in cache.layers}
    assert sum(layer.evictions for layer in cache.layers) == 3 * (4 if CUDA else 3)   # the prompt, then every 5 tokens


class _NoHostReads:
    """Tensor methods that read a GPU value on the host raise while active (tkv.evict is exempt:
    its compiled path never syncs, checked on CUDA by test_decode_steps_as_cuda_graphs)."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.active = False
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def trap(t, *args, _name=name, _original=original, **kwargs):
                if self.active:
                    raise AssertionError(f"a decode step called Tensor.{_name}")
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, trap)
        call = Evictor.__call__

        def exempt(ev, *args, **kwargs):
            active, self.active = self.active, False
            try:
                return call(ev, *args, **kwargs)
            finally:
                self.active = active

        monkeypatch.setattr(Evictor, "__call__", exempt)


@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "per-layer"])
def test_decode_steps_read_no_gpu_value(model, monkeypatch, stack):
    """A decode step as DecodeGraphs runs it (input_ids and position_ids, no mask) calls no
    host read of a tensor — the write, the mask, attention and the eviction included — and its
    host bookkeeping is what advance_host() repeats for a replayed graph."""
    ids, mask = padded()
    cache = hf.StaticEvictingCache(model, policies.snapkv(window=8), 24, interval=3, stack_layers=stack)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache, use_cache=True)
    position = mask.sum(-1, keepdim=True)
    token = out.logits[:, -1:].argmax(-1)
    trap = _NoHostReads(monkeypatch)
    keys, evicting = set(), 0
    for _ in range(7):
        key = cache.step_key()
        keys.add(key)
        before = cache.host_state()
        trap.active = True
        with torch.no_grad():
            logits = model(token, position_ids=position, past_key_values=cache, use_cache=True).logits
        trap.active = False
        after = _facts(cache.host_state())
        evicting += bool(key[1])
        assert bool(key[1]) == any(a[2] != b[2] for a, b in zip(_facts(before), after))   # key says when it evicts
        cache.restore_host_state(before)
        cache.advance_host()
        assert _facts(cache.host_state()) == after
        token, position = logits[:, -1:].argmax(-1), position + 1
    assert evicting == 2 and len(keys) == 2 + 1   # plain; evicting with the short row's empty slots; then without
    trap.active = True
    with pytest.raises(AssertionError, match="Tensor.item"):   # the trap works
        torch.ones(1).item()
    trap.active = False


def _facts(state):
    return [(filled, seen, evictions, [tuple(getattr(r, n) for n in r.__slots__) for r in rows])
            for filled, seen, evictions, rows in state]


def test_stacked_layers_evict_in_one_call(model, monkeypatch):
    ids = prompt(n=70)
    calls = []
    original = Evictor.__call__

    def count(ev, keys, *args, **kwargs):
        calls.append(keys.shape[0])
        return original(ev, keys, *args, **kwargs)

    monkeypatch.setattr(Evictor, "__call__", count)
    tokens = {}
    for stack in (True, False):
        calls.clear()
        cache = hf.StaticEvictingCache(model, policies.keydiff(sinks=2), 30, interval=4, stack_layers=stack)
        tokens[stack] = generate(model, ids, cache, max_new_tokens=9)
        decode_calls = calls[3:]            # the prompt evicts layer by layer
        assert decode_calls == ([3 * 2] * 2 if stack else [2] * 6)
    assert torch.equal(tokens[True], tokens[False])   # no random draws: the same tokens either way


def test_a_short_prompt_evicts_when_the_buffer_is_full(model):
    """Where the two caches differ: a prompt shorter than the budget. This cache first evicts
    when its buffer is full (budget + interval tokens); EvictingCache, once past ``interval``
    decoded tokens, as soon as it holds more than the budget (then every ``interval``)."""
    ids = prompt(n=20)
    static = hf.StaticEvictingCache(model, policies.keydiff(), 30, interval=4)
    dynamic = hf.EvictingCache(model, policies.keydiff(), 30, interval=4)
    generate(model, ids, static, max_new_tokens=21)   # 20 decode steps: 40 tokens seen
    generate(model, ids, dynamic, max_new_tokens=21)
    assert static.layers[0].evictions == 2        # full at 34 tokens, then at 38
    assert dynamic.layers[0].evictions == 3       # at 31, 35 and 39 tokens
    assert static.layers[0].held == 32 and dynamic.layers[0].held == 31
    static.reset()
    assert static.get_seq_length() == 0 and static.layers[0].held == 0
    assert torch.equal(generate(model, ids, static, max_new_tokens=5),
                       generate(model, ids, hf.StaticEvictingCache(model, policies.keydiff(), 30, interval=4),
                                max_new_tokens=5))


def test_extend_and_pause(model):
    """A paused forward stores without evicting; the buffer must keep room for the next token."""
    ids = prompt(n=50)
    cache = hf.StaticEvictingCache(model, policies.keydiff(), 20, interval=8)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        with cache.pause():
            model(prompt(n=5, seed=9), past_key_values=cache, use_cache=True)
        assert cache.layers[0].held == 25 and cache.get_seq_length() == 55
        assert torch.equal(cache.positions(0)[..., -5:], torch.arange(50, 55).expand(2, 2, 5))
        with cache.pause(), pytest.raises(ValueError, match="capacity - 1 = 27"):
            model(prompt(n=5, seed=9), past_key_values=cache, use_cache=True)


def test_graph_runner_calls_the_models_own_forward(model):
    """Inside cuda_graphs, model.forward routes decode steps to the runner; the runner's own
    forward (warm-up, capture) must be the unpatched one, or a capture would start inside itself
    (the GPU failure of 1151e58: torch.cuda.graph entered during a capture)."""
    cache = hf.StaticEvictingCache(model, policies.knorm(), 40, interval=4)
    with hf.cuda_graphs(model, cache) as runner:
        assert model.forward is not runner.forward
        assert runner.forward.__func__ is type(model).forward
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("pad", [False, True], ids=["equal-lengths", "left-padded"])
def test_decode_kernel_generates_what_sdpa_does(model, pad, monkeypatch):
    """attention="triton" (the split-KV decode kernel, reading the fill on the device) and
    "sdpa" (a mask over every slot) decode the same tokens and keep the same positions, through
    evictions and with empty leading slots (left padding). float32: the kernel's products are
    IEEE, its error ~1e-6 relative, far below the gaps between the tiny model's logits."""
    ids, mask = padded() if pad else (prompt(b=ROWS), None)
    ids, mask = to_device(ids, mask)
    from tritonkv.integrations import attention
    calls = []
    kernel = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    with on_device(model) as on:
        caches = {a: hf.StaticEvictingCache(on, policies.snapkv(window=8), 32, interval=4, attention=a)
                  for a in ("sdpa", "triton")}
        new = 12 if CUDA else 9   # the interpreter: fewer decode steps (two evictions among them)
        out = {a: generate(on, ids, c, mask=mask, max_new_tokens=new) for a, c in caches.items()}
    assert len(calls) == 3 * (new - 1)   # every layer of every decode step after the first token
    assert torch.equal(out["triton"], out["sdpa"])
    for a, b in zip(caches["sdpa"].layers, caches["triton"].layers):
        assert torch.equal(a.positions(), b.positions())


def test_refusals(model):
    with pytest.raises(ValueError, match="budget: a fixed-capacity cache needs tokens per head"):
        hf.StaticEvictingCache(model, policies.keydiff(), 0.25, interval=8)
    with pytest.raises(ValueError, match="budget: expected 3"):
        hf.StaticEvictingCache(model, policies.keydiff(), [10, 10], interval=8)
    with pytest.raises(ValueError, match="interval: expected an int >= 1"):
        hf.StaticEvictingCache(model, policies.keydiff(), 10, interval=None)
    with pytest.raises(ValueError, match="interval: expected an int >= 1"):
        hf.StaticEvictingCache(model, policies.keydiff(), 10, interval=0)
    with pytest.raises(ValueError, match="policy: a StaticEvictingCache needs a policy"):
        hf.StaticEvictingCache(model, None, 10, interval=4)
    with pytest.raises(ValueError, match="interval: an adaptive"):
        hf.StaticEvictingCache(model, policies.adakv(), 10, interval=4)
    with pytest.raises(ValueError, match=r"attention: expected one of \('auto', 'triton', 'sdpa'\)"):
        hf.StaticEvictingCache(model, policies.keydiff(), 10, interval=4, attention="flash")
    with pytest.raises(ValueError, match="stack_layers: expected a bool"):
        hf.StaticEvictingCache(model, policies.keydiff(), 10, interval=4, stack_layers="yes")
    with pytest.raises(ValueError, match=r"directions: the policy reads key_dot \['qfilter'\]"):
        hf.StaticEvictingCache(model, policies.qfilters(), 10, interval=4)
    ids, mask = padded()
    right = mask.flip(-1)
    with pytest.raises(ValueError, match="attention_mask: expected left padding"):
        generate(model, ids.flip(-1), hf.StaticEvictingCache(model, policies.keydiff(), 10, interval=4), mask=right)
    with pytest.raises(TypeError, match="cache: expected a StaticEvictingCache"):
        hf.DecodeGraphs(model, hf.EvictingCache(model, policies.keydiff(), 10))
    with pytest.raises(ValueError, match="input_ids: CUDA graphs need CUDA tensors"):
        hf.DecodeGraphs(model, hf.StaticEvictingCache(model, policies.keydiff(), 10, interval=4))(
            prompt(n=1), torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pad", [False, True], ids=["equal-lengths", "left-padded"])
def test_decode_steps_as_cuda_graphs(model, pad):
    """On CUDA: a decode step (forward, cache write, and the stacked eviction when due) is one
    CUDA graph replay; replays generate what eager steps generate; an eager decode step,
    eviction included, never synchronizes with the host."""
    gpu = model.to("cuda")
    ids, mask = padded() if pad else (prompt(n=100), None)
    ids = ids.cuda()
    mask = None if mask is None else mask.cuda()
    try:
        eager = hf.StaticEvictingCache(gpu, policies.snapkv(window=8), 32, interval=4, backend="triton")
        # a padded row whose query window is not full yet makes every eviction a new kind of step
        # (its host facts change), run eagerly; once it is full (after ~44 tokens here) they repeat
        steps = 64 if pad else 30
        want = generate(gpu, ids, eager, mask=mask, max_new_tokens=steps)
        cache = hf.StaticEvictingCache(gpu, policies.snapkv(window=8), 32, interval=4, backend="triton")
        with hf.cuda_graphs(gpu, cache) as graphs:
            got = generate(gpu, ids, cache, mask=mask, max_new_tokens=steps)
        assert graphs.replays >= steps - 16 and 2 <= len(graphs.graphs) <= 3
        assert torch.equal(got, want)
        for a, b in zip(eager.layers, cache.layers):
            assert torch.equal(a.positions(), b.positions())
        if pad:
            return
        # eager decode steps (an eviction among them) never synchronize; then DecodeGraphs by hand
        steps = hf.StaticEvictingCache(gpu, policies.snapkv(window=8), 32, interval=4, backend="triton")
        with torch.no_grad():
            out = gpu(ids, attention_mask=mask, past_key_values=steps, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            position = torch.full_like(token, ids.shape[1])
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(5):   # plain steps and one eviction, eagerly: no host sync
                    logits = gpu(token, position_ids=position, past_key_values=steps, use_cache=True).logits
                    token, position = logits[:, -1:].argmax(-1), position + 1
            finally:
                torch.cuda.set_sync_debug_mode("default")
            runner = hf.DecodeGraphs(gpu, steps)
            replayed = []
            for _ in range(12):
                logits = runner(token, position)
                token, position = logits[:, -1:].argmax(-1), position + 1
                replayed.append(token)
            assert runner.replays >= 8
        want = generate(gpu, ids, hf.StaticEvictingCache(gpu, policies.snapkv(window=8), 32, interval=4,
                                                         backend="triton"), max_new_tokens=18)
        assert torch.equal(torch.cat(replayed, 1), want[:, 6:])   # 1 + 5 eager tokens, then the 12 replayed
    finally:
        model.to("cpu")


@pytest.mark.parametrize("dtype, d", [(torch.bfloat16, 64), (torch.float16, 80), (torch.float32, 3), (torch.int64, 2)])
def test_copy_slots_equals_copy(dtype, d):
    """copy_slots (8-byte words where the layout allows) writes what copy_ writes, and only there."""
    gen = torch.Generator().manual_seed(0)
    buffer = (torch.randn(2, 3, 9, d, generator=gen) * 100).to(dtype)
    src = (torch.randn(2, 3, 5, d, generator=gen) * 100).to(dtype)
    want = buffer.clone()
    want[:, :, 2:7].copy_(src)
    copy_slots(buffer[:, :, 2:7], src)
    assert torch.equal(buffer, want)


@pytest.mark.parametrize("stack", [True, False])
def test_decode_evictions_compact_the_buffer_in_place(model, monkeypatch, stack):
    """A decode-step eviction selects indices only (no gathered copy of the kept rows) and moves
    the kept rows within the buffer (kernels/compact.py); the tokens are those of the growing cache."""
    moved = []
    original = static_module.compact_in_place

    def spy(indices, keys, values, programs=0):
        moved.append(keys.data_ptr())
        return original(indices, keys, values, programs)

    monkeypatch.setattr(static_module, "compact_in_place", spy)
    ids = prompt(b=ROWS, n=60)
    policy = policies.tova()
    new = 6 if CUDA else 4   # the interpreter: fewer every-step evictions
    want = generate(model, ids, hf.EvictingCache(model, policy, 24, interval=1), max_new_tokens=new)
    cache = hf.StaticEvictingCache(model, policy, 24, interval=1, stack_layers=stack, keep_order=True)
    got = generate(model, ids, cache, max_new_tokens=new)
    assert torch.equal(got, want)
    buffers = {layer.buffer.keys.data_ptr() for layer in cache.layers}
    assert moved and set(moved) <= buffers   # stacked: layer 0's address starts every layer's slots


# scores without exact ties (KNorm ties the copies of a token in layer 0: RoPE keeps the norm, and
# a tie goes to the lower slot, which after a hole fill need not be the earlier token)
ORDER_FREE = [(policies.keydiff(sinks=2), 30, 4), (policies.tova(), 24, 1),
              (tkv.sink(2) | tkv.recent(3) | tkv.top(-tkv.anchor_similarity()), 20, 3)]


@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "per-layer"])
@pytest.mark.parametrize("policy, budget, interval", ORDER_FREE, ids=["keydiff", "tova", "windows"])
def test_order_free_policies_fill_the_dropped_slots(model, monkeypatch, policy, budget, interval, stack):
    """An order-free policy whose recent window fits in the interval (the default, keep_order=False)
    evicts by moving only the kept rows past the budget into the dropped slots (kernels/holes.py):
    the same tokens and the same kept positions as keep_order=True, which shifts the rows into
    position order; also through a second prompt after decoding (a conversation's next turn),
    before which the slots are put back in order, since its eviction reads the windows by row."""
    moved = []
    original = static_module.fill_holes
    monkeypatch.setattr(static_module, "fill_holes", lambda i, k, v, p, a=None: moved.append(i.shape) or original(i, k, v, p, a))
    ids = prompt(b=ROWS, n=60)
    caches = {order: hf.StaticEvictingCache(model, policy, budget, interval=interval, keep_order=order,
                                            stack_layers=stack) for order in (True, False)}
    assert caches[False].fills_holes and not caches[True].fills_holes
    new = 8 if CUDA or interval > 1 else 5   # the interpreter: fewer every-step evictions
    out = {order: generate(model, ids, cache, max_new_tokens=new) for order, cache in caches.items()}
    assert moved and torch.equal(out[True], out[False])
    assert not all(layer.ordered for layer in caches[False].layers)
    for a, b in zip(caches[True].layers, caches[False].layers):
        assert a.evictions == b.evictions >= 2
        assert torch.equal(a.positions(), b.positions())
        assert torch.equal(a.last.indices, b.last.indices)
        # the same rows, up to float32 rounding: attention sums the slots in another order, and the
        # last bits it changes grow through the layers (2.3e-4 at most in this model's third layer)
        torch.testing.assert_close(a.last.keys, b.last.keys, rtol=0, atol=1e-3)
    turn = torch.cat([ids, out[True], prompt(b=ROWS, n=9, seed=5)], dim=1)
    again = {order: generate(model, turn, cache, max_new_tokens=4 if CUDA or interval > 1 else 2)
             for order, cache in caches.items()}
    assert torch.equal(again[True], again[False])
    for a, b in zip(caches[True].layers, caches[False].layers):
        assert torch.equal(a.positions(), b.positions())


def test_which_caches_fill_the_dropped_slots(model):
    """Only an order-free policy whose int recent windows fit in the interval may hold its slots
    out of order; keep_order=True keeps them in order."""
    def fills(policy, interval=4, **kwargs):
        return hf.StaticEvictingCache(model, policy, 20, interval=interval, **kwargs).fills_holes

    assert fills(policies.keydiff()) and fills(policies.tova(), interval=1) and fills(policies.knorm())
    assert not fills(policies.keydiff(), keep_order=True)
    assert not fills(tkv.recent(5) | tkv.top(tkv.key_norm()))            # a window past the interval
    assert not fills(tkv.recent(0.1) | tkv.top(tkv.key_norm()))          # a fraction of the tokens seen
    for name in ("snapkv", "h2o", "streaming_llm", "random", "chunkkv", "nacl"):
        assert not fills(getattr(policies, name)())
    with pytest.raises(ValueError, match="keep_order: expected a bool"):
        fills(policies.keydiff(), keep_order=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy, interval", [(policies.tova(), 1), (policies.keydiff(sinks=2), 4)],
                         ids=["tova", "keydiff"])
def test_filled_holes_under_cuda_graphs(model, policy, interval):
    """On CUDA, float32: every-step TOVA and every-4 KeyDiff with the dropped slots filled
    (kernels/holes.py), decoded as CUDA graph replays, generate and keep what eager steps with
    the slots in position order (keep_order=True) do, and what TOVA scored from the keys
    (decode_scores=False) does."""
    gpu = model.to("cuda")
    ids = prompt(n=100).cuda()
    try:
        eager = hf.StaticEvictingCache(gpu, policy, 32, interval=interval, backend="triton", keep_order=True)
        want = generate(gpu, ids, eager, max_new_tokens=30)
        cache = hf.StaticEvictingCache(gpu, policy, 32, interval=interval, backend="triton")
        assert cache.fills_holes
        with hf.cuda_graphs(gpu, cache) as graphs:
            got = generate(gpu, ids, cache, max_new_tokens=30)
        assert graphs.replays >= 20 and torch.equal(got, want)
        # TOVA is scored from the decode kernel's logits in both; from the keys, the same
        keys = hf.StaticEvictingCache(gpu, policy, 32, interval=interval, backend="triton", decode_scores=False)
        assert cache.decode_scores == (policy == policies.tova()) and not keys.decode_scores
        assert torch.equal(generate(gpu, ids, keys, max_new_tokens=30), want)
        for a, b, c in zip(eager.layers, cache.layers, keys.layers):
            assert torch.equal(a.positions(), b.positions()) and torch.equal(a.positions(), c.positions())
    finally:
        model.to("cpu")


def test_which_caches_score_from_the_decode_step(model):
    """A policy whose proxy attention is the last query's alone (TOVA, its per-group ablation,
    scores built on it) takes it from the decode step, stacked or per layer; other proxy
    windows, pooling inside the proxy, two group reductions and decode_scores=False read the
    keys."""
    from tritonkv.integrations.decode_scores import SIGNAL, decode_scored

    def scored(policy, **kwargs):
        return hf.StaticEvictingCache(model, policy, 20, interval=1, **kwargs).decode_scores

    assert scored(policies.tova()) and scored(policies.tova_per_group()) and scored(policies.tova(), stack_layers=False)
    assert not scored(policies.tova(), decode_scores=False)
    for policy in (policies.snapkv(), policies.h2o(), policies.keydiff(),
                   tkv.top(tkv.proxy_attention(window=2)), tkv.top(tkv.proxy_attention(window=1, pool=3)),
                   tkv.top(tkv.proxy_attention(window=1) + tkv.proxy_attention(window=1, group_reduce="max"))):
        assert not scored(policy), policy
    swapped, how = decode_scored(policies.tova())
    assert swapped == tkv.recent(1) | tkv.top(tkv.signal(SIGNAL), head_reduce="mean") and how == "mean"
    # a score made of the last query's attention is read from it too (pooling the signal pools it)
    assert scored(tkv.top(tkv.proxy_attention(window=1).pool(3) - 0.1 * tkv.key_norm()))
    with pytest.raises(ValueError, match="decode_scores: expected a bool"):
        scored(policies.tova(), decode_scores="yes")


@pytest.mark.parametrize("policy, budget, stack", [(policies.tova(), 24, True), (policies.tova(), 24, False),
                                                   (policies.tova().pyramid(), 30, True)],
                         ids=["tova", "tova-per-layer", "tova-pyramid"])
def test_decode_scores_keep_what_the_keys_give(model, monkeypatch, policy, budget, stack):
    """Every-step TOVA on the decode kernel (float32, on DEVICE): the evictions scored from the
    decode step's logits (one attention_signal launch each, no proxy-attention pass) generate
    and keep what the policy reading the keys does (decode_scores=False); stacked (one call for
    all layers), per layer, and with per-layer budgets (PyramidKV: per-layer calls)."""
    signals = []
    original = step_scores.attention_signal
    monkeypatch.setattr(step_scores, "attention_signal",
                        lambda *a, **k: signals.append(a[0].shape) or original(*a, **k))
    ids = to_device(prompt(b=ROWS, n=60))[0]
    steps = 6 if CUDA else 3   # decode steps (the interpreter: fewer)
    with on_device(model) as on:
        caches = {fused: hf.StaticEvictingCache(on, policy, budget, interval=1, attention="triton",
                                                decode_scores=fused, stack_layers=stack) for fused in (True, False)}
        out = {fused: generate(on, ids, cache, max_new_tokens=steps + 1) for fused, cache in caches.items()}
    assert caches[True].decode_scores and not caches[False].decode_scores
    calls = 1 if caches[True].stacked else model.config.num_hidden_layers
    assert len(signals) == steps * calls   # every decode step's eviction (the prompt's reads the keys)
    assert torch.equal(out[True], out[False])
    for a, b in zip(caches[True].layers, caches[False].layers):
        assert a.evictions == b.evictions >= steps
        assert torch.equal(a.positions(), b.positions())


def _step_attention(keys, query, group: int, scale: float) -> torch.Tensor:
    """The decoded query's attention [B, H_kv, n] to the held keys [B, H_kv, n, D], averaged
    over each KV head's query heads (H2O's group reduction), in float64."""
    b, h, n, d = keys.shape
    q = query.double().view(b, h, group, d)
    p = torch.softmax(torch.einsum("bhgd,bhnd->bhgn", q, keys.double()) * scale, dim=-1)
    return p.mean(2)


def _by_position(positions, values):
    """Both [B, H, n] in ascending position order."""
    order = positions.argsort(-1)
    return positions.gather(-1, order), values.gather(-1, order)


@pytest.mark.parametrize("stack, keep_order", [(True, False), (False, True)], ids=["stacked-holes", "per-layer-in-order"])
def test_accumulated_attention_is_h2o_step_by_step(model, monkeypatch, stack, keep_order):
    """accumulate_attention=True (H2O as published), float32 on DEVICE, every-step evictions:
    after the prompt every held token's accumulator is the window's proxy attention over the
    held tokens (reference.proxy_attention); in each decode step the new slot starts from 0, each
    held token gains the decoded query's attention (recomputed here in float64), and the
    eviction keeps what reference.select keeps for H2O's policy ranking those sums and the true
    positions, whose accumulators move with the rows: into the dropped slots (the default: H2O
    ranked so is order-free) or shifted in position order (keep_order). Compared step by step
    (each from the cache's state before it), so a near-tie in one step cannot derail the next."""
    from tritonkv.integrations.decode_scores import (POSITIONS, SIGNAL, accumulation_scored_by_position,
                                                     proxy_node)

    policy, budget, window = policies.h2o(), 24, 16
    decoded = 7 if CUDA else 4   # decode steps (the interpreter: fewer)
    steps = []
    original = static_module.StaticEvictingCache.end_of_decode_step

    def spy(self, run):   # every layer's slots, in slot order, before and after the step's end
        before = [(layer.buffer.keys[:, :, :layer.filled].clone(), layer._slot_positions().clone(),
                   layer.buffer.queries[:, :, -1].clone(), layer.buffer.accumulated[:, :, :layer.filled].clone())
                  for layer in self.layers]
        original(self, run)
        after = [_by_position(layer._slot_positions(), layer.buffer.accumulated[:, :, :layer.filled])
                 for layer in self.layers]
        steps.append((before, after))

    monkeypatch.setattr(static_module.StaticEvictingCache, "end_of_decode_step", spy)
    ranked = []   # the accumulations that wrote H2O's one-clause ranking (the holes layout's)
    accumulate = step_scores.attention_signal
    monkeypatch.setattr(step_scores, "attention_signal",
                        lambda *a, **k: ranked.append(k.get("rank") is not None) or accumulate(*a, **k))
    ids = to_device(prompt(b=ROWS, n=60))[0]
    with on_device(model) as on:
        cache = hf.StaticEvictingCache(on, policy, budget, interval=1, window=window, attention="triton",
                                       accumulate_attention=True, stack_layers=stack)
        with torch.no_grad():
            on(ids, past_key_values=cache, use_cache=True)   # the prompt alone: check the seeds
        node = proxy_node(cache.policy)
        for layer in cache.layers:
            buffer = layer.buffer
            want = reference.proxy_attention(node, buffer.keys[:, :, :budget].float(), buffer.queries.float())
            assert torch.allclose(buffer.accumulated[:, :, :budget], want, rtol=1e-4, atol=1e-6)
        cache = hf.StaticEvictingCache(on, policy, budget, interval=1, window=window, attention="triton",
                                       accumulate_attention=True, stack_layers=stack, keep_order=keep_order)
        generate(on, ids, cache, max_new_tokens=decoded + 1)
    assert cache.accumulates and cache.fills_holes == (not keep_order) and len(steps) == decoded
    layers = 1 if stack else model.config.num_hidden_layers
    assert cache.scoring.ranks == (not keep_order) and ranked == [not keep_order] * (decoded * layers)
    swapped = accumulation_scored_by_position(cache.policy)[0]
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    scale = (model.config.hidden_size // model.config.num_attention_heads) ** -0.5
    for before, after in steps:
        for (keys, positions, query, acc), (kept_positions, kept_acc) in zip(before, after):
            acc[:, :, -1] = 0   # the slot just written starts from nothing (its token is kept: recent)
            summed = acc.double() + _step_attention(keys, query, group, scale)
            inputs = reference.Inputs(keys.float(), keys.float(), None,
                                      signals={SIGNAL: summed.float(), POSITIONS: positions})
            mask = reference.select(swapped, inputs, budget)
            want_positions, want = _by_position(positions[mask].view(kept_positions.shape),
                                                summed[mask].view(kept_acc.shape))
            assert torch.equal(want_positions, kept_positions)
            assert torch.allclose(kept_acc.double(), want, rtol=1e-5, atol=1e-6)


def test_ranked_h2o_keeps_what_its_two_clauses_keep(model, monkeypatch):
    """Accumulated H2O's decode evictions rank one clause (+inf on the newest positions, then the
    sums: step_scores.py): in a left-padded batch evicting every step, each such eviction keeps
    exactly what reference.select keeps for the two clauses (true positions, then the sums) on
    the same slots, over enough steps for the recency half to turn over (budget 20: 10 newest; in
    the interpreter budget 12: 6 newest, over fewer steps). TRITONKV_H2O_RANK=0 ranks the two
    clauses apart."""
    from tritonkv.integrations.decode_scores import POSITIONS, SIGNAL, accumulation_scored_by_position

    ids, mask = padded()
    ids, mask = to_device(ids, mask)
    budget = 20 if CUDA else 12
    recent = budget // 2   # H2O's recency half: decode evictions past it turn it over
    checked = []
    indices = step_scores.StepScores.indices

    def spy(self, plan, seed, keys, values, positions, scores=None, gather=False, accumulated=None):
        out = indices(self, plan, seed, keys, values, positions, scores, gather, accumulated)
        if accumulated is None and scores is not None and scores[3] is not None:   # the one-clause form
            two = accumulation_scored_by_position(self.policy)[0]
            inputs = reference.Inputs(keys.float(), keys.float(), None,
                                      signals={SIGNAL: scores[2].float(), POSITIONS: positions})
            want = reference.select(two, inputs, out.indices.shape[-1])
            got = torch.zeros_like(want).scatter_(-1, out.indices, True)
            checked.append(torch.equal(got, want))
        return out

    monkeypatch.setattr(step_scores.StepScores, "indices", spy)
    with on_device(model) as on:
        monkeypatch.setenv("TRITONKV_H2O_RANK", "0")
        apart = hf.StaticEvictingCache(on, policies.h2o(), budget, interval=1, accumulate_attention=True)
        assert not apart.scoring.ranks
        monkeypatch.delenv("TRITONKV_H2O_RANK")
        cache = hf.StaticEvictingCache(on, policies.h2o(), budget, interval=1, window=8, attention="triton",
                                       accumulate_attention=True)
        assert cache.scoring.ranks
        generate(on, ids, cache, mask=mask, max_new_tokens=recent + 2)
    assert len(checked) >= recent and all(checked)   # the decode evictions after the rows line up


def test_accumulate_attention_refuses_what_it_cannot_sum(model, monkeypatch):
    with pytest.raises(ValueError, match="accumulate_attention: the policy's proxy attention must sum"):
        hf.StaticEvictingCache(model, policies.snapkv(), 20, interval=1, accumulate_attention=True)
    with pytest.raises(ValueError, match="accumulate_attention: the attention is summed from tritonkv's"):
        hf.StaticEvictingCache(model, policies.h2o(), 20, interval=1, accumulate_attention=True, attention="sdpa")
    with pytest.raises(ValueError, match="accumulate_attention: expected a bool"):
        hf.StaticEvictingCache(model, policies.h2o(), 20, interval=1, accumulate_attention="yes")
    # the model on the CPU without Triton's interpreter: no decode kernel to sum the attention
    monkeypatch.setattr(step_scores, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="runs on CUDA .or under TRITON_INTERPRET=1.; the model is on cpu"):
        hf.StaticEvictingCache(model, policies.h2o(), 20, interval=1, accumulate_attention=True)


@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(prefill_chunk_size=32)], ids=["beams", "prefill-chunks"])
def test_accumulating_cache_that_keeps_everything_generates_like_transformers(model, kwargs):
    """With room for every token, an accumulating cache (its accumulators written, summed,
    reordered by beam search) generates what plain generate does, left padding included."""
    ids, mask = padded()
    ids, mask = to_device(ids, mask)
    new = 4 if CUDA else 3   # the interpreter: fewer decode steps (beams reordered in each)
    with on_device(model) as on:
        want = generate(on, ids, mask=mask, max_new_tokens=new, **kwargs)
        cache = hf.StaticEvictingCache(on, policies.h2o(), 200, interval=3, window=8, attention="triton",
                                       accumulate_attention=True)
        assert torch.equal(generate(on, ids, cache, mask=mask, max_new_tokens=new, **kwargs), want)
    assert cache.layers[0].buffer.accumulated is not None


def test_accumulating_padded_rows_keep_what_they_keep_alone(model):
    """Every row of a left-padded batch, with H2O's accumulated attention evicting every 2
    steps, generates and keeps what it generates and keeps alone."""
    ids, mask = padded()
    ids, mask = to_device(ids, mask)
    kwargs = dict(interval=2, window=8, attention="triton", accumulate_attention=True)
    with on_device(model) as on:
        cache = hf.StaticEvictingCache(on, policies.h2o(), 30, **kwargs)
        new = 8 if CUDA else 5   # the interpreter: fewer decode steps (two evictions of the longer rows)
        batch = generate(on, ids, cache, mask=mask, max_new_tokens=new)
        for b, real in enumerate(LENGTHS):
            alone = hf.StaticEvictingCache(on, policies.h2o(), 30, **kwargs)
            assert torch.equal(generate(on, ids[b:b + 1, ids.shape[1] - real:], alone, max_new_tokens=new)[0],
                               batch[b])
            for layer, single in zip(cache.layers, alone.layers):
                positions = layer.positions()[b]
                kept = positions[positions >= 0].view(positions.shape[0], -1)
                assert torch.equal(kept, single.positions()[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accumulated_attention_under_cuda_graphs(model):
    """On CUDA: every-step H2O on accumulated attention, decoded as CUDA graph replays,
    generates and keeps what eager steps do (the accumulate launch and the zeroing of the new
    slot are in the graph)."""
    gpu = model.to("cuda")
    ids = prompt(n=100).cuda()
    try:
        kwargs = dict(interval=1, window=16, backend="triton", accumulate_attention=True)
        eager = hf.StaticEvictingCache(gpu, policies.h2o(), 32, **kwargs)
        want = generate(gpu, ids, eager, max_new_tokens=30)
        cache = hf.StaticEvictingCache(gpu, policies.h2o(), 32, **kwargs)
        with hf.cuda_graphs(gpu, cache) as graphs:
            got = generate(gpu, ids, cache, max_new_tokens=30)
        assert graphs.replays >= 20 and torch.equal(got, want)
        for a, b in zip(eager.layers, cache.layers):
            assert torch.equal(a.positions(), b.positions())
            assert torch.equal(a.buffer.accumulated, b.buffer.accumulated)
    finally:
        model.to("cpu")
