"""Decode throughput and eviction cost of compressing while generating (hf.EvictingCache).

    python perf/generation.py --out perf/results/generation     # GPU: every case, JSON + plot (~4 min, H100)
    python perf/generation.py --out /tmp/generation --toy      # CPU: toy sizes, checks the script

Two random-weight Llamas in bfloat16: "tiny" (the retrieval eval's architecture: 4 layers,
hidden 256, 8 q / 4 kv heads of 32) and "wide" (8 layers, hidden 2048, 32 q / 8 kv heads of
128, so attention and eviction cost per layer what a real model's do). For each prompt length
(16K, 64K tokens), after a one-forward prefill (SDPA), greedy decoding of ``--steps`` tokens
(batch 1) through the cache in each mode:

  full                    no eviction (transformers' DynamicCache behaviour)
  snapkv 10% / 25%        SnapKV once after the prompt, no eviction while decoding
  snapkv 10%, every 256   SnapKV after the prompt, then back to 10% of the prompt every 256 /
  snapkv 10%, every 64    64 decoded tokens (the cache oscillates between k and k + interval)
  tova / h2o 10%, every step   TOVA / H2O-style: evict one token per layer at every step

Attention runs under ``--sdpa`` (default ``flash,efficient``: those backends, in that
priority, through ``torch.nn.attention.sdpa_kernel``; cuDNN keeps one plan per key length, so
a cache that grows every step pays a new plan every step: 43 ms/step of the tiny model at 16K
under ``cudnn,flash,efficient`` against 3.5 ms when the length oscillates, H200 2026-12-03); every row records it as ``sdpa_backend``.
Name ``default`` for PyTorch's own dispatch: on an H200 with torch 2.11 it picks cuDNN in a way
that builds a new execution plan whenever the key length changes, ~12 ms per layer per decode
step of a growing cache, which has nothing to do with eviction.

Eviction share = CUDA-event time around every eviction the cache makes (tkv.evict's kernels
and host work, and the cache's own bookkeeping) / CUDA-event time of the decode steps, which
contain them. Measured directly, not by difference. Steps are timed after a warm-up that
includes one eviction of each mode (planning and compiling happen there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tritonkv import policies  # noqa: E402
from tritonkv.integrations import hf  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32, vocab_size=512),
    "wide": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=32000),
}
TOY_MODELS = {"toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=101)}


def modes(n: int):
    """(name, EvictingCache options) for a prompt of n tokens."""
    k = max(1, round(0.1 * n))
    return [
        ("full", dict()),
        ("snapkv 10%", dict(policy=policies.snapkv(), budget=0.1)),
        ("snapkv 25%", dict(policy=policies.snapkv(), budget=0.25)),
        ("snapkv 10%, every 256", dict(policy=policies.snapkv(), budget=k, interval=256)),
        ("snapkv 10%, every 64", dict(policy=policies.snapkv(), budget=k, interval=64)),
        ("tova 10%, every step", dict(policy=policies.tova(), budget=k, interval=1)),
        ("h2o 10%, every step", dict(policy=policies.h2o(), budget=k, interval=1)),
        # hf.StaticEvictingCache: budget + interval slots per layer, one key length for the whole decode
        ("static snapkv 10%, every 64", dict(cache="static", policy=policies.snapkv(), budget=k, interval=64)),
        ("static snapkv 10%, every 64, graphs", dict(cache="static", graphs=True, policy=policies.snapkv(),
                                                     budget=k, interval=64)),
        ("static tova 10%, every step", dict(cache="static", policy=policies.tova(), budget=k, interval=1)),
    ]


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


@torch.no_grad()
def measure(model, n: int, options: dict, steps: int, warmup: int, clock: Clock) -> dict:
    device = next(model.parameters()).device
    ids = torch.randint(16, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    options = dict(options)
    kind, graphs = options.pop("cache", "dynamic"), options.pop("graphs", False)
    if kind == "static":   # graphs: every decode step one CUDA graph replay (no host timing inside)
        cache = hf.StaticEvictingCache(model, timing=clock.cuda and not graphs, **options)
    else:
        cache = hf.EvictingCache(model, timing=clock.cuda, **options)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    clock.sync()
    start = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    clock.sync()
    prefill_s = time.perf_counter() - start
    prefill_evict_ms = cache.timer.total_ms() if cache.timer else None

    def step(token):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    if graphs:
        replay = hf.DecodeGraphs(model, cache)

        def step(token):   # noqa: F811 (the graphed step of the same decode)
            position = torch.full((1, 1), cache.get_seq_length(), dtype=torch.long, device=device)
            return replay(token, position)[:, -1].argmax(-1, keepdim=True)

    for _ in range(warmup):
        token = step(token)
    clock.sync()
    if cache.timer:
        cache.timer.reset()
    evictions_before = sum(layer.evictions for layer in cache.layers)
    marks = []
    wall = time.perf_counter()
    for _ in range(steps):
        a = clock.event()
        token = step(token)
        marks.append((a, clock.event()))
    clock.sync()
    wall = time.perf_counter() - wall
    step_ms = sum(clock.ms(a, b) for a, b in marks)
    evict_ms = cache.timer.total_ms() if cache.timer else None
    return dict(
        prompt=n, steps=steps, tokens_per_s=steps / wall, ms_per_step=wall * 1e3 / steps,
        event_ms_per_step=step_ms / steps,
        evictions=sum(layer.evictions for layer in cache.layers) - evictions_before,
        evict_ms=evict_ms, evict_share=None if evict_ms is None else evict_ms / step_ms,
        evict_ms_per_call=None if not cache.timer or not cache.timer.calls else evict_ms / cache.timer.calls,
        prefill_s=prefill_s, prefill_evict_ms=prefill_evict_ms,
        held_per_layer=[layer.held for layer in cache.layers], seen=cache.get_seq_length(),
        peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if clock.cuda else None)


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
    prompts = args.prompts or ([256, 512] if args.toy else [16384, 65536])
    steps = args.steps or (24 if args.toy else 512)
    clock = Clock(cuda)
    sdpa = args.sdpa or ("flash,efficient" if cuda else "default")
    rows = []
    for model_name, spec in models.items():
        model = make_model(spec, device, dtype)
        for n in prompts:
            for mode, options in modes(n):
                if options.get("graphs") and not cuda:
                    continue   # CUDA graphs need a GPU
                if args.toy:   # toy sizes: intervals that fit in a few steps
                    options = dict(options, interval=min(options["interval"], 8)) if "interval" in options else options
                interval = options.get("interval")
                warmup = args.warmup if interval is None else interval + 1
                start = time.time()
                with sdpa_context(sdpa):
                    measured = measure(model, n, options, steps, warmup, clock)
                row = dict(model=model_name, mode=mode, interval=interval, baseline="policy" not in options,
                           cache=options.get("cache", "dynamic"), graphs=bool(options.get("graphs")),
                           sdpa_backend=sdpa, **measured)
                rows.append(row)
                share = "" if row["evict_share"] is None else f"  eviction {100 * row['evict_share']:.2f}%"
                print(f"{model_name:<5} {n:>6} {mode:<22} {row['tokens_per_s']:8.1f} tok/s  "
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
    out.mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("TKV_COMMIT") or subprocess.run(  # TKV_COMMIT: a copy outside its git checkout
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    meta = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                commit=commit, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (out / "generation.json").write_text(json.dumps(meta | dict(rows=rows), indent=1))


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
            axes[0][col].bar(xs, [got[m]["tokens_per_s"] if m in got else 0 for m in mode_names], width,
                             label=f"{n // 1024}K prompt")
            axes[1][col].bar(xs, [100 * (got[m]["evict_share"] or 0) if m in got else 0 for m in mode_names],
                             width, label=f"{n // 1024}K prompt")
        for row, label in ((0, "decode tokens/s (batch 1)"), (1, "eviction share of decode time (%)")):
            ax = axes[row][col]
            ax.set_xticks([i + width * (len(prompts) - 1) / 2 for i in range(len(mode_names))], mode_names,
                          rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{model} model, {data['device']}")
            ax.legend(fontsize=8)
        for level in (2, 10):
            axes[1][col].axhline(level, color="grey", linestyle=":", linewidth=1)
    fig.tight_layout()
    fig.savefig(out / "generation.png", dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for generation.json and generation.png")
    parser.add_argument("--toy", action="store_true", help="toy sizes on the CPU (checks the script)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompts", type=int, nargs="+")
    parser.add_argument("--steps", type=int, help="timed decode steps (default 512; toy 24)")
    parser.add_argument("--warmup", type=int, default=16, help="untimed steps of modes that do not evict while "
                                                                "decoding (the others warm up interval + 1)")
    parser.add_argument("--sdpa", help="SDPA backends, comma list in priority order (cudnn, flash, efficient, "
                                       "math), or 'default' for PyTorch's dispatch (default on the GPU: "
                                       "flash,efficient; on the CPU: default)")
    args = parser.parse_args(argv)
    run(args)
    plot(args.out)
    print(f"wrote {args.out / 'generation.json'} and {args.out / 'generation.png'}")


if __name__ == "__main__":
    main()
