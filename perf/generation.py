"""Decode throughput and eviction cost of compressing while generating, against transformers' own caches.

    python perf/generation.py --out perf/results/generation     # GPU: every case, JSON + plot
    python perf/generation.py --out DIR --models wide           # a part (the GPU run splits by model)
    python perf/generation.py --out DIR --merge A.json B.json   # the parts as one generation.json + plot
    python perf/generation.py --out /tmp/generation --toy       # CPU: toy sizes, checks the script

Two random-weight Llamas in bfloat16: "tiny" (the retrieval eval's architecture: 4 layers,
hidden 256, 8 q / 4 kv heads of 32) and "wide" (8 layers, hidden 2048, 32 q / 8 kv heads of
128, so attention and eviction cost per layer what a real model's do). For each prompt length
(16K, 64K, 128K tokens), after a one-forward prefill (SDPA), greedy decoding of ``--steps``
tokens (batch 1) through the cache of each mode (``modes``):

  DynamicCache                  transformers' growing cache, no eviction (baseline)
  StaticCache + torch.compile   transformers' fixed-shape cache, decode step compiled with
                                mode="reduce-overhead" (CUDA graphs) as its docs advise (baseline)
  snapkv 10%, once / every 64   hf.EvictingCache: SnapKV after the prompt, then back to 10% of
                                the prompt every 64 decoded tokens (or never)
  tova / h2o 10%, every step    TOVA / H2O-style: evict one token per layer at every step
  static ...                    hf.StaticEvictingCache (budget + interval slots, one key length
                                for the whole decode); ", graphs": every step a CUDA graph replay;
                                ", in order": keep_order=True (TOVA is order-free: by default its
                                evictions move only the newest row into the dropped slot)
                                A decoded token attends through tritonkv's split-KV decode kernel
                                (rows: ``attention: "triton"``); ", sdpa": through SDPA with a mask
                                over every slot instead (``attention: "sdpa"``); TOVA's evictions
                                take its score from the decode kernel's logits of the step
                                (``decode_scores``), ", keys": from two passes over the keys instead.
                                Static H2O ranks the attention every decoded token paid, summed by
                                the decode kernel's steps (``accumulate_attention``, as the H2O
                                paper runs it); ", keys": the last 64 queries' attention over the
                                keys at every eviction instead (slots in order: H2O is not order-free);
                                ", two clauses": its recency and heavy-hitter clauses selected apart
                                (TRITONKV_H2O_RANK=0), not ranked as one

Attention runs under ``--sdpa`` (default ``flash,efficient``: those backends, in that
priority, through ``torch.nn.attention.sdpa_kernel``); every row records it as
``sdpa_backend``. Name ``default`` for PyTorch's own dispatch: on an H200 with torch 2.11 it
picks cuDNN, which builds a new execution plan whenever the key length changes, ~12 ms per
layer per decode step of a growing cache (43 ms/step of the tiny model at 16K against 3.5 ms
under flash), which has nothing to do with eviction.

Eviction share = CUDA-event time around every eviction the cache makes (tkv.evict's kernels
and host work, and the cache's own bookkeeping) / CUDA-event time of the decode steps, which
contain them. Under CUDA graphs (no host events inside a replay) it is the evicting steps'
excess over the median plain step (``evict_share_from`` says which). Steps are timed after a
warm-up that includes every kind of step of the mode (planning, compiling and graph capture
happen there). ``targets`` in the JSON: per model and prompt, the fastest evicting mode over
the fastest baseline (tokens/s, one run) and the largest eviction shares.

A graphed every-step mode is also timed a second way, in the same process: 8 eager steps after
the timed ones, each eviction queued behind a GPU sleep so that CUDA events time its kernels back
to back (``evict_kernels_ms_per_step``), over the graphed step's time (``evict_share_kernels``).
That share does not depend on another mode's step, as the excess does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tritonkv import policies  # noqa: E402
from tritonkv.integrations import hf  # noqa: E402
from tritonkv.integrations.attention import resolve_attention  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32, vocab_size=512),
    "wide": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=32000),
}
TOY_MODELS = {"toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=101)}


def warmup_steps(interval, graphs: bool, steps: int, default: int) -> int:
    """Untimed decode steps before the timing: ``default`` for a mode that does not evict while
    decoding (no interval, or one longer than the run), else every kind of step once: interval
    + 1 (an eviction among them), and under CUDA graphs twice that (each kind captured, then
    replayed)."""
    if interval is None or interval > steps:
        return default
    return 2 * interval + 2 if graphs else interval + 1


def modes(n: int, steps: int, warmup: int = 16):
    """(name, cache options) for a prompt of n tokens and ``steps`` timed decode steps.

    ``cache``: "dynamic" (hf.EvictingCache), "static" (hf.StaticEvictingCache, fixed shapes),
    "transformers" (transformers' DynamicCache) or "compiled" (transformers' StaticCache with
    the decode step under ``torch.compile(mode="reduce-overhead")``, its CUDA graphs). "once":
    evicted after the prompt only (a static buffer then has room for every decoded token:
    the warm-up's and the timed ones, and one spare)."""
    k = max(1, round(0.1 * n))
    once = steps + warmup + 2
    assert warmup_steps(once, True, steps, warmup) == warmup   # "once" never evicts while decoding
    snapkv, tova, h2o = policies.snapkv(), policies.tova(), policies.h2o()
    return [
        ("DynamicCache", dict(cache="transformers")),
        ("StaticCache + torch.compile", dict(cache="compiled")),
        ("snapkv 10%, once", dict(policy=snapkv, budget=0.1)),
        ("snapkv 10%, every 64", dict(policy=snapkv, budget=k, interval=64)),
        ("tova 10%, every step", dict(policy=tova, budget=k, interval=1)),
        ("h2o 10%, every step", dict(policy=h2o, budget=k, interval=1)),
        # hf.StaticEvictingCache: budget + interval slots per layer, one key length for the whole decode
        ("static snapkv 10%, once", dict(cache="static", policy=snapkv, budget=k, interval=once)),
        ("static snapkv 10%, once, graphs", dict(cache="static", graphs=True, policy=snapkv, budget=k,
                                                 interval=once)),
        ("static snapkv 10%, every 64", dict(cache="static", policy=snapkv, budget=k, interval=64)),
        ("static snapkv 10%, every 64, graphs", dict(cache="static", graphs=True, policy=snapkv, budget=k,
                                                     interval=64)),
        ("static snapkv 10%, every 64, graphs, sdpa", dict(cache="static", graphs=True, policy=snapkv, budget=k,
                                                           interval=64, attention="sdpa")),
        ("static tova 10%, every step", dict(cache="static", policy=tova, budget=k, interval=1)),
        ("static tova 10%, every step, graphs", dict(cache="static", graphs=True, policy=tova, budget=k,
                                                     interval=1)),
        # the same with the slots kept in position order: each eviction shifts the rows after the dropped one
        ("static tova 10%, every step, graphs, in order", dict(cache="static", graphs=True, policy=tova, budget=k,
                                                               interval=1, keep_order=True)),
        # TOVA's score from two passes over the keys, not from the decode kernel's logits
        ("static tova 10%, every step, graphs, keys", dict(cache="static", graphs=True, policy=tova, budget=k,
                                                           interval=1, decode_scores=False)),
        # H2O on the attention its decode steps accumulate; and recomputed from the last 64 queries
        # (attention "triton": the decode kernel sums the attention, on the CPU under TRITON_INTERPRET=1)
        ("static h2o 10%, every step", dict(cache="static", policy=h2o, budget=k, interval=1, attention="triton",
                                            accumulate_attention=True)),
        ("static h2o 10%, every step, graphs", dict(cache="static", graphs=True, policy=h2o, budget=k, interval=1,
                                                    attention="triton", accumulate_attention=True)),
        ("static h2o 10%, every step, graphs, keys", dict(cache="static", graphs=True, policy=h2o, budget=k,
                                                          interval=1)),
        # accumulated H2O ranking its two clauses apart (two selections), not as one (step_scores.py)
        ("static h2o 10%, every step, graphs, two clauses", dict(cache="static", graphs=True, policy=h2o, budget=k,
                                                                 interval=1, attention="triton",
                                                                 accumulate_attention=True,
                                                                 switches={"TRITONKV_H2O_RANK": "0"})),
    ]


def runs_here(options: dict, cuda: bool) -> bool:
    """Whether a mode runs on this run's device: CUDA graphs (ours, and torch.compile's
    reduce-overhead) need a GPU; tritonkv's decode kernel (``attention="triton"``) runs on a GPU,
    or on the CPU under TRITON_INTERPRET=1 (a toy run on a GPU machine has a CPU model)."""
    if cuda:
        return True
    if options.get("graphs") or options.get("cache") == "compiled":
        return False
    from tritonkv.kernels.common import interpreting
    return options.get("attention") != "triton" or interpreting()


def make_model(spec: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**spec, max_position_embeddings=1 << 17, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


class Clock:
    """Wall time of a region, plus CUDA-event time on a GPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def event(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def prompt_ids(model, n: int) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.randint(16, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)


def make_cache(model, n: int, options: dict, steps: int, warmup: int, clock: "Clock"):
    """The cache a mode names, and its decode step ``step(token, position) -> next token``
    (``position``: the token's position, a host int)."""
    options = dict(options)
    kind, graphs = options.pop("cache", "dynamic"), options.pop("graphs", False)
    device = next(model.parameters()).device

    def plain(token, position):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    step = plain
    if kind == "transformers":
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config)
    elif kind == "compiled":   # what transformers documents for fast decoding: StaticCache + compiled step
        from transformers import StaticCache
        cache = StaticCache(config=model.config, max_cache_len=n + warmup + steps + 1)
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)

        def step(token, position):   # noqa: F811
            at = torch.full((1,), position, dtype=torch.long, device=device)
            torch.compiler.cudagraph_mark_step_begin()
            out = forward(input_ids=token, past_key_values=cache, cache_position=at, position_ids=at[None],
                          use_cache=True)
            return out.logits[:, -1].argmax(-1, keepdim=True)
    elif kind == "static":   # graphs: every decode step one CUDA graph replay (no host timing inside)
        from perf.settings import switches
        with switches(options.pop("switches", {})):   # TRITONKV_* settings the cache reads when made
            cache = hf.StaticEvictingCache(model, timing=clock.cuda and not graphs, **options)
        if graphs:
            replay = hf.DecodeGraphs(model, cache)

            def step(token, position):   # noqa: F811 (the graphed step of the same decode)
                at = torch.full((1, 1), position, dtype=torch.long, device=device)
                return replay(token, at)[:, -1].argmax(-1, keepdim=True)
    else:
        cache = hf.EvictingCache(model, timing=clock.cuda, **options)
    return cache, step


@torch.no_grad()
def measure(model, n: int, options: dict, steps: int, warmup: int, clock: Clock) -> dict:
    ids = prompt_ids(model, n)
    cache, step = make_cache(model, n, options, steps, warmup, clock)
    timer = getattr(cache, "timer", None)
    evicting = getattr(cache, "step_key", None)   # a static cache says which steps evict
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    clock.sync()
    start = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    clock.sync()
    prefill_s = time.perf_counter() - start
    prefill_evict_ms = timer.total_ms() if timer else None
    position = n
    for _ in range(warmup):
        token = step(token, position)
        position += 1
    clock.sync()
    if timer:
        timer.reset()
    layers = getattr(cache, "layers", [])
    evictions_before = sum(getattr(layer, "evictions", 0) for layer in layers)
    marks, kinds = [], []
    wall = time.perf_counter()
    for _ in range(steps):
        kinds.append(bool(evicting()[1]) if evicting else False)
        a = clock.event()
        token = step(token, position)
        position += 1
        marks.append((a, clock.event()))
    clock.sync()
    wall = time.perf_counter() - wall
    times = [clock.ms(a, b) for a, b in marks]
    step_ms = sum(times)
    evict_ms, share_from = (timer.total_ms(), "events") if timer else (None, None)
    plain = sorted(t for t, e in zip(times, kinds) if not e)
    if evict_ms is None and any(kinds) and plain:   # graph replays: an evicting step's excess over a plain one
        median = plain[len(plain) // 2]
        evict_ms, share_from = sum(t - median for t, e in zip(times, kinds) if e), "excess over plain steps"
    calls = timer.calls if timer else sum(kinds)
    kernels_ms = kernels_error = None
    if clock.cuda and options.get("graphs") and options.get("interval") == 1:
        try:   # a second measure of the share: kept apart, so that it cannot lose the row
            kernels_ms = eviction_kernels_ms(model, cache, token)
        except Exception as e:
            kernels_error = f"{type(e).__name__}: {e}"[:300]
            print(f"eviction_kernels_ms failed: {kernels_error}", flush=True)
    return dict(
        prompt=n, steps=steps, tokens_per_s=steps / wall, ms_per_step=wall * 1e3 / steps,
        event_ms_per_step=step_ms / steps,
        evictions=sum(getattr(layer, "evictions", 0) for layer in layers) - evictions_before,
        evict_ms=evict_ms, evict_share=None if evict_ms is None else evict_ms / step_ms, evict_share_from=share_from,
        evict_ms_per_call=None if evict_ms is None or not calls else evict_ms / calls,
        evict_kernels_ms_per_step=kernels_ms,
        evict_share_kernels=None if kernels_ms is None else kernels_ms / (step_ms / steps),
        **({"evict_kernels_error": kernels_error} if kernels_error else {}),
        prefill_s=prefill_s, prefill_evict_ms=prefill_evict_ms,
        held_per_layer=[layer.held for layer in layers if hasattr(layer, "held")], seen=int(cache.get_seq_length()),
        peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if clock.cuda else None)


def eviction_kernels_ms(model, cache, token, steps: int = 8) -> float:
    """GPU ms per step of an every-step cache's eviction kernels (the accumulation included), from
    ``steps`` eager steps after the timed ones: each eviction queues behind a GPU sleep, so CUDA
    events time its kernels back to back, without the host's launch gaps (EvictionTimer's
    ``queue_ahead_cycles``). Over the graphed step's time it is the eviction's share measured
    directly, not as a step's excess over another mode's step."""
    from tritonkv.integrations.schedule import EvictionTimer
    cache.schedule.timer = timer = EvictionTimer(queue_ahead_cycles=1 << 22)   # ~2.5 ms at 1.7 GHz
    try:
        for _ in range(steps):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        calls, total = timer.calls, timer.total_ms()
    finally:
        cache.schedule.timer = None
    if calls < steps:
        raise RuntimeError(f"eviction_kernels_ms: {steps} eager steps made {calls} timed evictions; the mode must "
                           "evict at every step")
    return total / steps


def sdpa_context(names: str):
    """The SDPA backends named (comma list, in priority order), or PyTorch's dispatch for 'default'."""
    if names == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    try:
        chosen = [backends[name] for name in names.split(",")]
    except KeyError as e:
        raise ValueError(f"--sdpa: unknown backend {e.args[0]!r}; expected 'default' or a comma list of "
                         f"{sorted(backends)}") from None
    return sdpa_kernel(chosen, set_priority=True)


def run(args) -> dict:
    cuda = torch.cuda.is_available() and not args.toy
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    models = TOY_MODELS if args.toy else {name: MODELS[name] for name in args.models}
    prompts = args.prompts or ([256, 512] if args.toy else [16384, 65536, 131072])
    steps = args.steps or (24 if args.toy else 512)
    clock = Clock(cuda)
    sdpa = args.sdpa or ("flash,efficient" if cuda else "default")
    rows = []
    for model_name, spec in models.items():
        model = make_model(spec, device, dtype)
        for n in prompts:
            for mode, options in modes(n, steps, args.warmup):
                if args.modes and not re.search(args.modes, mode):
                    continue
                if not runs_here(options, cuda):
                    continue
                interval = options.get("interval")
                if args.toy and interval is not None and interval <= 64:   # toy sizes: a few steps apart
                    interval = min(interval, 8)
                    options = dict(options, interval=interval)
                warmup = warmup_steps(interval, bool(options.get("graphs")), steps, args.warmup)
                start = time.time()
                row = dict(model=model_name, mode=mode, interval=interval, baseline="policy" not in options,
                           cache=options.get("cache", "dynamic"), graphs=bool(options.get("graphs")),
                           sdpa_backend=sdpa)
                if row["cache"] == "static":
                    row["attention"] = resolve_attention(options.get("attention", "auto"), cuda)
                try:
                    with sdpa_context(sdpa):
                        row.update(measure(model, n, options, steps, warmup, clock))
                except Exception as e:   # the compiled baseline counts "where it compiles"; the rest must run
                    if options.get("cache") != "compiled":
                        raise
                    row.update(prompt=n, steps=steps, tokens_per_s=None, error=f"{type(e).__name__}: {e}"[:500])
                    print(f"{model_name:<5} {n:>6} {mode:<36} failed: {row['error'][:200]}", flush=True)
                    rows.append(row)
                    continue
                rows.append(row)
                share = "" if row["evict_share"] is None else f"  eviction {100 * row['evict_share']:.2f}%"
                if row.get("evict_share_kernels") is not None:
                    share += (f"  eviction kernels {1e3 * row['evict_kernels_ms_per_step']:.1f} us/step = "
                              f"{100 * row['evict_share_kernels']:.2f}%")
                print(f"{model_name:<5} {n:>6} {mode:<36} {row['tokens_per_s']:8.1f} tok/s  "
                      f"{row['ms_per_step']:.2f} ms/step{share}  ({time.time() - start:.1f}s)", flush=True)
                if args.out:
                    write(args.out, rows, device)
        del model
        if cuda:
            torch.cuda.empty_cache()
    return dict(rows=rows)


def write(out: Path, rows, device):
    import os
    import subprocess
    commit = os.environ.get("TKV_COMMIT") or subprocess.run(  # TKV_COMMIT: a copy outside its git checkout
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                commit=commit, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    dump(out, meta, rows)


def dump(out: Path, meta: dict, rows) -> None:
    """generation.json: the run's facts, its rows and their targets."""
    out.mkdir(parents=True, exist_ok=True)
    every_step_shares(rows)
    (out / "generation.json").write_text(json.dumps(meta | dict(rows=rows, targets=targets(rows)), indent=1))


def every_step_shares(rows) -> None:
    """A graphed mode that evicts at every step has no plain step to compare with: its share is
    its step's excess over the same run's graphed every-64 step of that model and prompt (whose
    own eviction share is taken out first), in place, where such a row exists."""
    for r in rows:
        if r.get("evict_share") is not None or r.get("interval") != 1 or not r.get("graphs"):
            continue
        ref = [x for x in rows if x["model"] == r["model"] and x["prompt"] == r["prompt"] and x.get("graphs")
               and x.get("interval") == 64 and x.get("sdpa_backend") == r.get("sdpa_backend")
               and x.get("evict_share") is not None and "sdpa" not in x["mode"]]
        if ref:
            plain = ref[0]["event_ms_per_step"] * (1 - ref[0]["evict_share"])
            r["evict_share"] = max(0.0, 1 - plain / r["event_ms_per_step"])
            r["evict_ms"] = (r["event_ms_per_step"] - plain) * r["steps"]
            r["evict_share_from"] = f"excess over the graphed every-64 step ({ref[0]['mode']})"


ABLATIONS = ("in order", ", keys", "two clauses")   # every-step modes that change a default, for comparison


def targets(rows) -> list:
    """Per model and prompt: the fastest evicting mode against the fastest baseline (tokens/s
    ratio, one run), and the largest eviction share of the every-64 and every-step modes."""
    out = []
    for model, n in dict.fromkeys((r["model"], r["prompt"]) for r in rows):
        here = [r for r in rows if r["model"] == model and r["prompt"] == n and r.get("tokens_per_s")]
        base = max((r for r in here if r["baseline"]), key=lambda r: r["tokens_per_s"], default=None)
        best = max((r for r in here if not r["baseline"]), key=lambda r: r["tokens_per_s"], default=None)
        shares = {}
        # the settings users run: not the ablations (", in order", ", keys", ", two clauses")
        every_step = lambda r: r["interval"] == 1 and not any(a in r["mode"] for a in ABLATIONS)  # noqa: E731
        for label, test in (("every 64", lambda r: r["interval"] not in (None, 1) and "once" not in r["mode"]),
                            ("every step", every_step),
                            ("every step, static", lambda r: every_step(r) and r["mode"].startswith("static")),
                            ("every step, growing", lambda r: every_step(r) and not r["mode"].startswith("static"))):
            got = [r["evict_share"] for r in here if not r["baseline"] and test(r) and r.get("evict_share") is not None]
            shares[label] = max(got) if got else None
        kernels = [r["evict_share_kernels"] for r in here if every_step(r) and r.get("evict_share_kernels") is not None]
        out.append(dict(model=model, prompt=n, best_baseline=base and base["mode"],
                        best_baseline_tokens_per_s=base and base["tokens_per_s"], best_evicting=best and best["mode"],
                        best_evicting_tokens_per_s=best and best["tokens_per_s"],
                        speedup=base and best and best["tokens_per_s"] / base["tokens_per_s"],
                        max_share_every_64=shares["every 64"], max_share_every_step=shares["every step"],
                        max_share_every_step_static=shares["every step, static"],
                        max_share_every_step_growing=shares["every step, growing"],
                        max_share_every_step_kernels=max(kernels) if kernels else None))
    return out


def merge(parts, out: Path):
    """One generation.json from the JSON of several runs (split over device calls), rows in order."""
    datas = [json.loads(Path(p).read_text()) for p in parts]
    rows = [r for d in datas for r in d["rows"]]
    meta = {k: v for k, v in datas[0].items() if k not in ("rows", "targets")}
    meta["parts"] = [{k: v for k, v in d.items() if k not in ("rows", "targets")} for d in datas]
    dump(out, meta, rows)


def plot(out: Path):
    """generation.png: tokens/s per mode and prompt length (one panel per model), eviction share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads((out / "generation.json").read_text())
    rows = data["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    mode_names = list(dict.fromkeys(r["mode"] for r in rows))
    prompts = sorted({r["prompt"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 8), squeeze=False)
    width = 0.8 / len(prompts)
    for col, model in enumerate(models):
        for j, n in enumerate(prompts):
            got = {r["mode"]: r for r in rows if r["model"] == model and r["prompt"] == n}
            xs = [i + j * width for i in range(len(mode_names))]
            axes[0][col].bar(xs, [got[m]["tokens_per_s"] or 0 if m in got else 0 for m in mode_names], width,
                             label=f"{n // 1024}K prompt")
            axes[1][col].bar(xs, [100 * (got[m].get("evict_share") or 0) if m in got else 0 for m in mode_names],
                             width, label=f"{n // 1024}K prompt")
        for row, label in ((0, "decode tokens/s (batch 1)"), (1, "eviction share of decode time (%)")):
            ax = axes[row][col]
            ax.set_xticks([i + width * (len(prompts) - 1) / 2 for i in range(len(mode_names))], mode_names,
                          rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{model} model, {data['device']}")
            ax.legend(fontsize=8)
        for level in (3, 10):
            axes[1][col].axhline(level, color="grey", linestyle=":", linewidth=1)
    fig.tight_layout()
    fig.savefig(out / "generation.png", dpi=110)


def percent(share) -> str:
    return "n/a" if share is None else f"{100 * share:.2f}%"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for generation.json and generation.png")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="merge the generation.json of runs split over calls into --out (no measuring)")
    parser.add_argument("--toy", action="store_true", help="toy sizes on the CPU (checks the script)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompts", type=int, nargs="+")
    parser.add_argument("--modes", metavar="REGEX", help="only the modes whose name matches (re.search), e.g. "
                                                         "'^(DynamicCache|StaticCache|static .*graphs)'")
    parser.add_argument("--steps", type=int, help="timed decode steps (default 512; toy 24)")
    parser.add_argument("--warmup", type=int, default=16, help="untimed steps of modes that do not evict while "
                                                                "decoding (the others warm up interval + 1)")
    parser.add_argument("--sdpa", help="SDPA backends, comma list in priority order (cudnn, flash, efficient, "
                                       "math), or 'default' for PyTorch's dispatch (default on the GPU: "
                                       "flash,efficient; on the CPU: default)")
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
    else:
        run(args)
    plot(args.out)
    for t in json.loads((args.out / "generation.json").read_text())["targets"]:
        print(f"{t['model']:<5} {t['prompt']:>6}  best evicting {t['best_evicting']!r} / best baseline "
              f"{t['best_baseline']!r}: {t['speedup'] or float('nan'):.2f}x; largest eviction share every 64 "
              f"{percent(t['max_share_every_64'])}, every step {percent(t['max_share_every_step'])} (fixed-capacity "
              f"cache {percent(t['max_share_every_step_static'])}, growing {percent(t['max_share_every_step_growing'])}; "
              f"graphed, eviction kernels timed alone {percent(t.get('max_share_every_step_kernels'))})")
    print(f"wrote {args.out / 'generation.json'} and {args.out / 'generation.png'}")


if __name__ == "__main__":
    main()
