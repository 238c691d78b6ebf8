"""Retrieval accuracy of the tiny trained Llama vs KV budget, for every preset.

    python evals/eval.py --checkpoint evals/checkpoint --json evals/results.json   # GPU or CPU
    python evals/eval.py --render evals/results.json --docs docs                  # table + plot

Every prompt (context + question) is prefilled, the cache compressed with the policy at
the budget (tritonkv.integrations.hf; compiled kernels on CUDA), and the answer decoded
greedily from the compressed cache; accuracy = exact match of all answer tokens.
"full" keeps the whole cache (budget 100% for every policy equals it).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals import tasks  # noqa: E402
from tritonkv import policies  # noqa: E402
from tritonkv.budget import resolve_budget  # noqa: E402

BUDGETS = (0.1, 0.25, 0.5, 1.0)


def eval_policies():
    """Presets at their defaults, except where a default is sized for 32K+ prompts:
    NACL's 256 sinks would fill a 10% budget of a 2K prompt, so it keeps 4 here."""
    named = {name: make() for name, make in policies.PRESETS.items()}
    named["nacl"] = policies.nacl(sinks=4)
    return named


def run(checkpoint: Path, samples: int, length: int, batch: int, seed: int, out: Path | None = None):
    """Evaluate every variant; with `out`, the results so far are rewritten after each one."""
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
    for name, policy, extra in variants:
        for budget in (BUDGETS if policy is not None else (1.0,)):
            start = time.time()
            for task in tasks.TASKS:
                hits = total = 0
                for prompts, answers in data[task]:
                    prompts = prompts.to(device)
                    b = budget if "chunk_size" not in extra else resolve_budget(budget, prompts.shape[1])
                    state = hf.prefill(model, prompts, policy, b, seed=seed, **extra)
                    out = hf.generate(model, state, answers.shape[1]).cpu()
                    hits += int((out == answers).all(-1).sum())
                    total += len(answers)
                rows.append(dict(policy=name, budget=budget, task=task, accuracy=hits / total, samples=total))
            print(f"{name:<28} budget {budget:<5} " + "  ".join(
                f"{r['task']} {r['accuracy']:.2f}" for r in rows[-2:]) + f"  ({time.time() - start:.1f}s)", flush=True)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(meta | dict(rows=rows), indent=1))
    return meta | dict(rows=rows)


def render(results_path: Path, docs: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(results_path.read_text())
    rows = results["rows"]
    full = {r["task"]: r["accuracy"] for r in rows if r["policy"] == "full"}
    names = [n for n in dict.fromkeys(r["policy"] for r in rows) if n != "full"]
    acc = {(r["policy"], r["budget"], r["task"]): r["accuracy"] for r in rows}
    lines = [f"# Retrieval accuracy vs KV budget (tiny Llama, {results['length']}-token prompts)", "",
             f"{results['samples_per_task']} prompts per task; exact match of the answer decoded from the "
             f"compressed cache. Full cache: niah {full.get('niah', 0):.2f}, mqar {full.get('mqar', 0):.2f}. "
             f"Run on {results.get('gpu') or results['device']}; produced by `python evals/eval.py`.", "",
             "| policy | " + " | ".join(f"{t} {int(b * 100)}%" for t in tasks.TASKS for b in BUDGETS) + " |",
             "|---|" + "---|" * (len(tasks.TASKS) * len(BUDGETS))]
    lines.append("| full | " + " | ".join(f"{full.get(t, 0):.2f}" for t in tasks.TASKS for _ in BUDGETS) + " |")
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{acc.get((name, b, t), float('nan')):.2f}"
                                                 for t in tasks.TASKS for b in BUDGETS) + " |")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "eval_retrieval.md").write_text("\n".join(lines) + "\n\n![accuracy vs budget](eval_retrieval.png)\n")
    fig, axes = plt.subplots(1, len(tasks.TASKS), figsize=(12, 4.5), sharey=True)
    for ax, task in zip(axes, tasks.TASKS):
        for name in names:
            ax.plot([b * 100 for b in BUDGETS], [acc.get((name, b, task)) for b in BUDGETS], marker="o", label=name)
        ax.axhline(full.get(task, 0), color="black", linestyle="--", label="full cache")
        ax.set_title(task)
        ax.set_xlabel("budget (% of prompt)")
        ax.set_xscale("log")
        ax.set_xticks([10, 25, 50, 100], ["10", "25", "50", "100"])
    axes[0].set_ylabel("exact-match accuracy")
    axes[-1].legend(fontsize=7, loc="lower right")
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
    parser.add_argument("--json", type=Path, default=Path("evals/results.json"))
    parser.add_argument("--render", type=Path, help="render a results JSON into --docs, nothing else")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, args.docs)
        return
    run(args.checkpoint, args.samples, args.length, args.batch, args.seed, out=args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
