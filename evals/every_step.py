"""Retrieval when the cache evicts at EVERY decoding step: H2O as its paper runs it (the
attention each token received from every later token, summed: StaticEvictingCache's
``accumulate_attention``) against H2O as a window of proxy queries recomputed over the keys at
each eviction (the default), with TOVA (decode-scored) beside them.

    python evals/every_step.py --checkpoint evals/checkpoint --json evals/runs/every-step.json
    python evals/every_step.py --render evals/runs/every-step.json --docs docs

The setting is eval.py's while-decoding one, made harsher: the context (the prompt minus
GENERATED filler tokens and the question) is prefilled and evicted to the budget, then the
filler, the question and the answer all go in one token per forward, through a
StaticEvictingCache of ``budget + 1`` slots per layer that evicts one token at every step.
Budgets are fractions of the prompt; accuracy = exact match of the answer tokens, mean and
95% t-interval over data seeds. Runs on CUDA (the decode kernel sums the attention; on the CPU
only under TRITON_INTERPRET=1, at toy sizes).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals import tasks  # noqa: E402
from evals.eval import interval95  # noqa: E402
from tritonkv import policies  # noqa: E402

BUDGETS = (0.1, 0.25)
VARIANTS = {   # name: (policy, StaticEvictingCache options)
    "h2o (window of 64 queries, over the keys)": (policies.h2o, {}),
    "h2o (accumulated attention)": (policies.h2o, {"accumulate_attention": True}),
    "tova (decode scores)": (policies.tova, {}),
}


def answer(model, prompts, generated: int, question: int, answer_len: int, policy, budget: float, options, seed):
    """Answers [B, answer_len] greedily decoded after every-step eviction through the filler
    and the question."""
    from tritonkv.integrations import hf
    from tritonkv.integrations.hf import Prefilled

    context, rest = prompts[:, :-generated - question], prompts[:, -generated - question:]
    k = max(1, int(budget * prompts.shape[1]))
    cache = hf.StaticEvictingCache(model, policy(), k, interval=1, seed=seed, attention="triton", **options)
    with torch.no_grad():
        out = model(input_ids=context, past_key_values=cache, use_cache=True, logits_to_keep=1)
    state = Prefilled(cache=cache, position=context.shape[1], logits=out.logits[:, -1].float())
    hf.decode(model, state, rest)   # filler and question, one decode step (and one eviction) each
    return hf.generate(model, state, answer_len).cpu()


def run(checkpoint: Path, samples: int, length: int, batch: int, seed: int, seeds: int, generated: int,
        out: Path = None, only=None, budgets=BUDGETS):
    """Every variant (or those named in ``only``) at every budget, on ``seeds`` data seeds of
    ``samples`` prompts per task; with ``out``, the results so far are rewritten after each."""
    from transformers import LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    data_seeds = [seed + 1000 * s for s in range(seeds)]
    rows = []
    meta = dict(checkpoint=str(checkpoint), length=length, generated=generated, samples_per_task=samples,
                seeds=seeds, device=device, gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    for name, (policy, options) in VARIANTS.items():
        if only is not None and name not in only:
            continue
        for budget in budgets:
            start = time.time()
            for task in tasks.TASKS:
                per_seed = []
                for d in data_seeds:
                    hits = total = 0
                    for i in range(max(1, samples // batch)):
                        prompts, answers = tasks.eval_batch(task, d + i, batch, length)
                        decoded = answer(model, prompts.to(device), generated, tasks.QUESTION_LEN[task],
                                         answers.shape[1], policy, budget, options, d + i)
                        hits += int((decoded == answers).all(-1).sum())
                        total += len(answers)
                    per_seed.append(hits / total)
                mean, half = interval95(per_seed)
                rows.append(dict(policy=name, budget=budget, task=task, accuracy=mean, ci95=half, per_seed=per_seed,
                                 samples=total))
            print(f"{name:<44} budget {budget:<5} " + "  ".join(
                f"{r['task']} {r['accuracy']:.2f}±{r['ci95']:.2f}" for r in rows[-len(tasks.TASKS):])
                + f"  ({time.time() - start:.1f}s)", flush=True)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(meta | dict(rows=rows), indent=1))
    return meta | dict(rows=rows)


def render(path: Path, docs: Path, stem: str = "eval_every_step") -> Path:
    """docs/<stem>.md: a row per variant, a column per task and budget (mean ± 95% interval)."""
    results = json.loads(Path(path).read_text())
    acc = {(r["policy"], r["budget"], r["task"]): f"{r['accuracy']:.2f} ± {r['ci95']:.2f}" for r in results["rows"]}
    names = list(dict.fromkeys(r["policy"] for r in results["rows"]))
    budgets = sorted({r["budget"] for r in results["rows"]})
    lines = [f"# Retrieval with an eviction at every decoding step (tiny Llama, {results['length']}-token prompts)",
             "", f"The context is evicted to the budget (a fraction of the prompt), then {results['generated']} "
             "filler tokens, the question and the answer go in one token per forward through a "
             "StaticEvictingCache of budget + 1 slots that evicts one token at every step. "
             f"{results['samples_per_task']} prompts per task and data seed, {results['seeds']} data seeds: mean "
             "exact-match accuracy ± the half-width of its 95% t-interval. Run on "
             f"{results.get('gpu') or results['device']} by `python evals/every_step.py`.", "",
             "| policy | " + " | ".join(f"{t} {int(b * 100)}%" for t in tasks.TASKS for b in budgets) + " |",
             "|---|" + "---|" * (len(tasks.TASKS) * len(budgets))]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(acc.get((name, b, t), "n/a") for t in tasks.TASKS for b in budgets)
                     + " |")
    docs.mkdir(parents=True, exist_ok=True)
    target = docs / f"{stem}.md"
    target.write_text("\n".join(lines) + "\n")
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("evals/checkpoint"))
    parser.add_argument("--samples", type=int, default=64, help="prompts per task and data seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--generated", type=int, default=128, help="filler tokens decoded before the question")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--json", type=Path, default=Path("evals/runs/every-step.json"))
    parser.add_argument("--render", type=Path, help="render a results JSON into --docs, nothing else")
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    if args.render:
        print(f"wrote {render(args.render, args.docs)}")
        return
    run(args.checkpoint, args.samples, args.length, args.batch, args.seed, args.seeds, args.generated, out=args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
