"""Retrieval accuracy of the tiny trained Llama vs KV budget, for every preset.

    python evals/eval.py --checkpoint evals/checkpoint --json evals/results.json   # GPU or CPU
    python evals/eval.py --render evals/results.json --docs docs                  # table + plot

Two settings, so that every answer token is decoded from the compressed cache (a prompt
prefilled whole would compute the first answer token before any eviction):

  question-aware     context + question minus its last token prefilled and compressed (the
                     proxy-query window sees the question, as in SnapKV / NACL on LongBench);
                     the last question token and the answer then run on the compressed cache.
  question-agnostic  the context alone prefilled and compressed (KeyDiff's setting: a cache
                     compressed once, asked later); the whole question runs on it.

Budgets are fractions of the prefilled length (tritonkv.integrations.hf; compiled kernels on
CUDA); accuracy = exact match of all answer tokens. "full" keeps the whole cache.
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals import tasks  # noqa: E402
from tritonkv import policies  # noqa: E402
from tritonkv.budget import resolve_budget  # noqa: E402

BUDGETS = (0.1, 0.25, 0.5, 1.0)
SETTINGS = ("question-aware", "question-agnostic")


def eval_policies():
    """Presets at their defaults, except where a default is sized for 32K+ prompts:
    NACL's 256 sinks would fill a 10% budget of a 2K prompt, so it keeps 4 here."""
    named = {name: make() for name, make in policies.PRESETS.items()}
    named["nacl"] = policies.nacl(sinks=4)
    return named


def run(checkpoint: Path, samples: int, length: int, batch: int, seed: int, out: Path | None = None,
        only: Optional[Sequence[str]] = None):
    """Evaluate every variant (or those named in `only`); with `out`, the results so far are
    rewritten after each one."""
    from transformers import LlamaForCausalLM

    from tritonkv.integrations import hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    rows = []
    meta = dict(checkpoint=str(checkpoint), length=length, samples_per_task=samples, device=device,
                gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    data = {task: [tasks.eval_batch(task, seed + i, batch, length) for i in range(samples // batch)]
            for task in tasks.TASKS}
    variants = [("full", None, {})] + [(n, p, {}) for n, p in eval_policies().items()]
    variants.append(("keydiff (block-wise, 256)", policies.keydiff(), {"chunk_size": 256}))
    if only is not None:
        unknown = set(only) - {name for name, _, _ in variants}
        if unknown:
            raise ValueError(f"--policies: unknown {sorted(unknown)}; choose from {[n for n, _, _ in variants]}")
        variants = [v for v in variants if v[0] in only]

    def accuracy(setting, task, name, policy, budget, extra):
        hits = total = 0
        split = tasks.QUESTION_LEN[task] if setting == "question-agnostic" else 1
        for prompts, answers in data[task]:
            prompts = prompts.to(device)
            head, tail = prompts[:, :-split], prompts[:, -split:]
            b = budget if "chunk_size" not in extra else resolve_budget(budget, head.shape[1])
            state = hf.extend(model, hf.prefill(model, head, policy, b, seed=seed, **extra), tail)
            decoded = hf.generate(model, state, answers.shape[1]).cpu()
            hits += int((decoded == answers).all(-1).sum())
            total += len(answers)
        return dict(setting=setting, policy=name, budget=budget, task=task,
                    accuracy=hits / total, samples=total)

    for setting in SETTINGS:
        for name, policy, extra in variants:
            for budget in (BUDGETS if policy is not None else (1.0,)):
                start = time.time()
                rows += [accuracy(setting, task, name, policy, budget, extra) for task in tasks.TASKS]
                print(f"{setting:<18} {name:<26} budget {budget:<5} " + "  ".join(
                    f"{r['task']} {r['accuracy']:.2f}" for r in rows[-2:]) + f"  ({time.time() - start:.1f}s)",
                    flush=True)
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(meta | dict(rows=rows), indent=1))
    return meta | dict(rows=rows)


def render(results_path: Path, docs: Path):
    """docs/eval_retrieval.md (a table per setting) and docs/eval_retrieval.png (accuracy vs budget)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(results_path.read_text())
    rows = results["rows"]
    acc = {(r["setting"], r["policy"], r["budget"], r["task"]): r["accuracy"] for r in rows}
    names = [n for n in dict.fromkeys(r["policy"] for r in rows) if n != "full"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lines = [f"# Retrieval accuracy vs KV budget (tiny Llama, {results['length']}-token prompts)", "",
             f"{results['samples_per_task']} prompts per task, exact match of the answer decoded from the compressed "
             f"cache; run on {results.get('gpu') or results['device']} by `python evals/eval.py` "
             f"(checkpoint `{results['checkpoint']}`). The two settings and what the numbers show: "
             "[evals/README.md](../evals/README.md).", ""]
    header = "| policy | " + " | ".join(f"{t} {int(b * 100)}%" for t in tasks.TASKS for b in BUDGETS) + " |"
    for setting in settings:
        full = {t: acc.get((setting, "full", 1.0, t), float("nan")) for t in tasks.TASKS}
        lines += [f"## {setting}", "", header, "|---|" + "---|" * (len(tasks.TASKS) * len(BUDGETS)),
                  "| full cache | " + " | ".join(f"{full[t]:.2f}" for t in tasks.TASKS for _ in BUDGETS) + " |"]
        lines += [f"| {name} | " + " | ".join(f"{acc.get((setting, name, b, t), float('nan')):.2f}"
                                              for t in tasks.TASKS for b in BUDGETS) + " |" for name in names]
        lines.append("")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "eval_retrieval.md").write_text("\n".join(lines) + "\n![accuracy vs budget](eval_retrieval.png)\n")
    fig, axes = plt.subplots(len(settings), len(tasks.TASKS), figsize=(12, 4.2 * len(settings)), sharey=True,
                             squeeze=False)
    colors = dict(zip(names, plt.cm.tab20.colors))
    for row, setting in zip(axes, settings):
        for ax, task in zip(row, tasks.TASKS):
            for name in names:
                ax.plot([b * 100 for b in BUDGETS], [acc.get((setting, name, b, task)) for b in BUDGETS],
                        marker="o", label=name, color=colors[name])
            ax.axhline(acc.get((setting, "full", 1.0, task), 0), color="black", linestyle="--", label="full cache")
            ax.set_title(f"{task}, {setting}")
            ax.set_xlabel("budget (% of prefilled tokens)")
            ax.set_xscale("log")
            ax.set_xticks([10, 25, 50, 100], ["10", "25", "50", "100"])
        row[0].set_ylabel("exact-match accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(docs / "eval_retrieval.png", dpi=110)
    print(f"wrote {docs / 'eval_retrieval.md'} and {docs / 'eval_retrieval.png'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("evals/checkpoint"))
    parser.add_argument("--samples", type=int, default=64, help="prompts per task")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--policies", help="comma list of variants to run (default: all, and the full cache)")
    parser.add_argument("--json", type=Path, default=Path("evals/results.json"))
    parser.add_argument("--render", type=Path, help="render a results JSON into --docs, nothing else")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, args.docs)
        return
    run(args.checkpoint, args.samples, args.length, args.batch, args.seed, out=args.json,
        only=args.policies.split(",") if args.policies else None)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
