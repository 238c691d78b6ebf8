"""Retrieval accuracy of the tiny trained Llama vs KV budget, for every preset.

    python evals/eval.py --checkpoint evals/checkpoint --json evals/results.json   # GPU or CPU
    python evals/eval.py --render evals/results.json [PART.json ...] --docs docs  # table + plot

Three settings, so that every answer token is decoded from a compressed cache (a prompt
prefilled whole would compute the first answer token before any eviction):

  question-aware     context + question minus its last token prefilled and compressed (the
                     proxy-query window sees the question, as in SnapKV / NACL on LongBench);
                     the last question token and the answer then run on the compressed cache.
  question-agnostic  the context alone prefilled and compressed (KeyDiff's setting: a cache
                     compressed once, asked later); the whole question runs on it.
  while-decoding     the context prefilled and compressed, then GENERATED (default 128) filler
                     tokens fed one per forward, as decoding steps, while the cache is
                     compressed every GENERATED / 4 of them back to the budget (a fraction of
                     the tokens seen); then the question and the answer, which must still be
                     retrieved. The prompt is GENERATED tokens shorter, so every setting ends
                     at the same position.

Budgets are fractions of the prefilled length (tritonkv.integrations.hf; compiled kernels on
CUDA); accuracy = exact match of all answer tokens; "full" keeps the whole cache. Every
variant runs on SEEDS data seeds (different prompts); tables give the mean over seeds and a
95% t-interval of it. Presets come from tritonkv.policies.PRESETS, so new presets are included;
adaptive (AdaKV) ones evict once, after the prompt, and have no while-decoding result.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals import qfilters, tasks  # noqa: E402
from tritonkv import policies  # noqa: E402
from tritonkv.budget import resolve_budget  # noqa: E402

BUDGETS = (0.1, 0.25, 0.5, 1.0)
SETTINGS = ("question-aware", "question-agnostic", "while-decoding")
# two-sided 95% quantiles of Student's t, by degrees of freedom (no scipy needed)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval95(values: Sequence[float]):
    """(mean, half-width of its 95% t-interval) over seeds; half-width 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return mean, T95.get(n - 1, 1.96) * sd / n ** 0.5


def eval_policies():
    """Presets at their defaults, except where a default is sized for 32K+ prompts:
    NACL's 256 sinks would fill a 10% budget of a 2K prompt, so it keeps 4 here."""
    named = {name: make() for name, make in policies.PRESETS.items()}
    named["nacl"] = policies.nacl(sinks=4)
    return named


def run(checkpoint: Path, samples: int, length: int, batch: int, seed: int, out: Path | None = None,
        only: Optional[Sequence[str]] = None, seeds: int = 3, generated: int = 128):
    """Evaluate every variant (or those named in `only`) on `seeds` data seeds of `samples`
    prompts per task; with `out`, the results so far are rewritten after each one."""
    from transformers import LlamaForCausalLM

    from tritonkv.integrations import hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    generated = min(generated, length // 8)   # short prompts (tests): a shorter continuation
    rows = []
    meta = dict(checkpoint=str(checkpoint), length=length, samples_per_task=samples, seeds=seeds,
                generated=generated, interval=max(1, generated // 4), device=device,
                gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    data_seeds = [seed + 1000 * s for s in range(seeds)]

    def batches(task, data_seed, n):
        return [tasks.eval_batch(task, data_seed + i, batch, n) for i in range(max(1, samples // batch))]

    data = {(task, d): batches(task, d, length) for task in tasks.TASKS for d in data_seeds}
    shorter = {(task, d): batches(task, d, length - generated) for task in tasks.TASKS for d in data_seeds}
    filters = qfilters.load(checkpoint)   # Q-Filters' directions, from evals/qfilters.py
    variants = [("full", None, {})]
    for n, p in eval_policies().items():
        if p.directions and filters is None:
            print(f"{n}: skipped, no {qfilters.FILE} beside the checkpoint (python evals/qfilters.py)")
            continue
        variants.append((n, p, {"directions": {"qfilter": filters}} if p.directions else {}))
    variants.append(("keydiff (block-wise, 256)", policies.keydiff(), {"chunk_size": 256}))
    variants.append(("chunkkv (layer reuse 2)", policies.chunkkv(), {"reuse_layers": 2}))
    if only is not None:
        unknown = set(only) - {name for name, _, _ in variants}
        if unknown:
            raise ValueError(f"--policies: unknown {sorted(unknown)}; choose from {[n for n, _, _ in variants]}")
        variants = [v for v in variants if v[0] in only]

    def answer(setting, task, prompts, policy, budget, extra, data_seed):
        split = 1 if setting == "question-aware" else tasks.QUESTION_LEN[task]
        head, tail = prompts[:, :-split], prompts[:, -split:]
        b = budget if "chunk_size" not in extra else resolve_budget(budget, head.shape[1])
        if setting != "while-decoding":
            state = hf.prefill(model, head, policy, b, seed=data_seed, **extra)
        else:
            interval = max(1, generated // 4)
            decoding = {} if policy is None else dict(interval=interval, target=budget)
            state = hf.prefill(model, head, policy, b, seed=data_seed, **decoding, **extra)
            g = torch.Generator().manual_seed(data_seed)
            filler = torch.randint(*tasks.FILLER, (prompts.shape[0], generated), generator=g).to(prompts.device)
            hf.decode(model, state, filler)   # decoding steps: the cache evicts every `interval`
        return hf.generate(model, hf.extend(model, state, tail), answers_len[task]).cpu()

    answers_len = {task: data[(task, data_seeds[0])][0][1].shape[1] for task in tasks.TASKS}

    def accuracy(setting, task, name, policy, budget, extra):
        per_seed = []
        total = 0
        for d in data_seeds:
            hits = total = 0
            for prompts, answers in (shorter if setting == "while-decoding" else data)[(task, d)]:
                decoded = answer(setting, task, prompts.to(device), policy, budget, extra, d)
                hits += int((decoded == answers).all(-1).sum())
                total += len(answers)
            per_seed.append(hits / total)
        mean, half = interval95(per_seed)
        return dict(setting=setting, policy=name, budget=budget, task=task, accuracy=mean, ci95=half,
                    per_seed=per_seed, samples=total)

    for setting in SETTINGS:
        for name, policy, extra in variants:
            if setting == "while-decoding" and policy is not None and policy.heads == "adaptive":
                continue   # AdaKV evicts once, after the prompt (hf.EvictingCache refuses an interval)
            for budget in (BUDGETS if policy is not None else (1.0,)):
                start = time.time()
                rows += [accuracy(setting, task, name, policy, budget, extra) for task in tasks.TASKS]
                print(f"{setting:<18} {name:<26} budget {budget:<5} " + "  ".join(
                    f"{r['task']} {r['accuracy']:.2f}±{r['ci95']:.2f}" for r in rows[-2:])
                    + f"  ({time.time() - start:.1f}s)", flush=True)
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(meta | dict(rows=rows), indent=1))
    return meta | dict(rows=rows)


def merge_results(paths: Sequence[Path]) -> dict:
    """One results dict from the parts of a run split over calls (``--policies`` a part each):
    the first part's settings, every part's rows (a row measured again in a later part wins)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = {}
    for part in parts:
        rows.update({(r["setting"], r["policy"], r["budget"], r["task"]): r for r in part["rows"]})
    return parts[0] | dict(rows=list(rows.values()))


def render(results_paths: Sequence[Path], docs: Path, stem: str = "eval_retrieval"):
    """docs/<stem>.md (a table per setting: mean ± 95% interval over data seeds) and
    docs/<stem>.png (accuracy vs budget, the intervals shaded), from one results JSON or the
    parts of one run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = merge_results(results_paths)
    rows = results["rows"]
    acc = {(r["setting"], r["policy"], r["budget"], r["task"]): (r["accuracy"], r.get("ci95", 0.0)) for r in rows}
    names = [n for n in dict.fromkeys(r["policy"] for r in rows) if n != "full"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    seeds = results.get("seeds", 1)

    def cell(key):
        if key not in acc:
            return "n/a"
        mean, half = acc[key]
        return f"{mean:.2f} ± {half:.2f}"

    lines = [f"# Retrieval accuracy vs KV budget (tiny Llama, {results['length']}-token prompts)", "",
             f"{results['samples_per_task']} prompts per task and data seed, {seeds} data seeds: each cell is the "
             "mean exact-match accuracy over the seeds ± the half-width of its 95% t-interval. Answers are decoded "
             f"from the compressed cache; run on {results.get('gpu') or results['device']} by "
             f"`python evals/eval.py` (checkpoint `{results['checkpoint']}`). The settings and what the numbers "
             "show: [evals/README.md](../evals/README.md)."]
    if "while-decoding" in settings:
        lines += ["", f"while-decoding: the context is compressed, then {results['generated']} tokens are fed as "
                  f"decoding steps with the cache compressed back to the budget (a fraction of the tokens seen) "
                  f"every {results['interval']} of them, then the question is asked. AdaKV evicts once, after the "
                  "prompt: n/a."]
    lines.append("")
    header = "| policy | " + " | ".join(f"{t} {int(b * 100)}%" for t in tasks.TASKS for b in BUDGETS) + " |"
    for setting in settings:
        lines += [f"## {setting}", "", header, "|---|" + "---|" * (len(tasks.TASKS) * len(BUDGETS)),
                  "| full cache | " + " | ".join(cell((setting, "full", 1.0, t)) for t in tasks.TASKS for _ in BUDGETS)
                  + " |"]
        lines += [f"| {name} | " + " | ".join(cell((setting, name, b, t)) for t in tasks.TASKS for b in BUDGETS) + " |"
                  for name in names]
        lines.append("")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{stem}.md").write_text("\n".join(lines) + f"\n![accuracy vs budget]({stem}.png)\n")
    fig, axes = plt.subplots(len(settings), len(tasks.TASKS), figsize=(12, 4.2 * len(settings)), sharey=True,
                             squeeze=False)
    colors = dict(zip(names, plt.cm.tab20.colors))
    xs = [b * 100 for b in BUDGETS]
    for row, setting in zip(axes, settings):
        for ax, task in zip(row, tasks.TASKS):
            for name in names:
                if not any((setting, name, b, task) in acc for b in BUDGETS):
                    continue
                mean = [acc.get((setting, name, b, task), (float("nan"), 0))[0] for b in BUDGETS]
                half = [acc.get((setting, name, b, task), (float("nan"), 0))[1] for b in BUDGETS]
                ax.plot(xs, mean, marker="o", label=name, color=colors[name])
                ax.fill_between(xs, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                                color=colors[name], alpha=0.15, linewidth=0)
            full, half = acc.get((setting, "full", 1.0, task), (0.0, 0.0))
            ax.axhline(full, color="black", linestyle="--", label="full cache")
            ax.axhspan(full - half, full + half, color="black", alpha=0.08, linewidth=0)
            ax.set_title(f"{task}, {setting}")
            ax.set_xlabel("budget (% of prefilled tokens)")
            ax.set_xscale("log")
            ax.set_xticks([10, 25, 50, 100], ["10", "25", "50", "100"])
        row[0].set_ylabel(f"exact match (mean, 95% interval, {seeds} seeds)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(docs / f"{stem}.png", dpi=110)
    print(f"wrote {docs / (stem + '.md')} and {docs / (stem + '.png')}")


def variant_names(text: str) -> list:
    """--policies' comma list; a comma inside parentheses is part of a name ("keydiff (block-wise, 256)")."""
    return [name.strip() for name in re.split(r",(?![^()]*\))", text) if name.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("evals/checkpoint"))
    parser.add_argument("--samples", type=int, default=64, help="prompts per task and data seed")
    parser.add_argument("--seeds", type=int, default=3, help="data seeds (tables: mean and 95%% interval over them)")
    parser.add_argument("--generated", type=int, default=128,
                        help="tokens decoded between the compressed context and the question (while-decoding)")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--policies", help="comma list of variants to run (default: all, and the full cache)")
    parser.add_argument("--json", type=Path, default=Path("evals/results.json"))
    parser.add_argument("--render", type=Path, nargs="+",
                        help="render a results JSON (or the parts of one run) into --docs, nothing else")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--name", default="eval_retrieval", help="file stem of the rendered table and plot")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, args.docs, args.name)
        return
    run(args.checkpoint, args.samples, args.length, args.batch, args.seed, out=args.json,
        only=variant_names(args.policies) if args.policies else None, seeds=args.seeds, generated=args.generated)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
