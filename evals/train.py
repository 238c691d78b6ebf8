"""Train the tiny Llama of the retrieval eval (reproducible: fixed seeds, fixed data stream).

    python evals/train.py --out evals/checkpoint --steps 10000 --stop-step 8222   # the shipped one: 8.3 min, H100
    python evals/train.py --tiny --steps 200 --out /tmp/t   # a CPU smoke run

The model: Llama architecture, 4 layers, hidden 256, 8 query heads / 4 KV heads (GQA 2),
head dim 32, vocab 512 (evals/tasks.py), RoPE; ~4.3M parameters, saved in bfloat16
(config.json + model.safetensors, ~9 MB). Data: niah and mqar mixed, 16 teacher-forced
questions per sequence, lengths drawn per step from a curriculum that grows from 64-256 tokens
to 512-2048 tokens; loss on answers only. Batch `s` is a function of (seed, s) alone, prefetched
by worker processes.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals import tasks  # noqa: E402

MODEL = dict(vocab_size=tasks.VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=8192,
             rope_theta=10000.0, tie_word_embeddings=True)
TINY = dict(MODEL, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
SMALL = dict(MODEL, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32)   # CPU-trainable at 512 tokens


def length_at(step: int, steps: int, g, max_len: int) -> int:
    """Curriculum: 64-256 tokens first (retrieval circuits form fastest on short contexts),
    growing to max_len/4 .. max_len by 60% of the steps."""
    progress = min(1.0, step / (0.6 * steps))
    hi = int(256 + progress * (max_len - 256)) if max_len > 256 else max_len
    lo = max(64, hi // 4)
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


class Batches(torch.utils.data.Dataset):
    """Batch `step` of the data stream, a pure function of (seed, step): workers can prefetch
    in any order and a resumed run sees exactly the batches the uninterrupted run would."""

    def __init__(self, seed: int, steps: int, batch: int, max_len: int, questions: int):
        self.seed, self.steps, self.batch, self.max_len, self.questions = seed, steps, batch, max_len, questions

    def __len__(self):
        return self.steps

    def __getitem__(self, step: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        length = length_at(step, self.steps, g, self.max_len)
        return (length, *tasks.train_batch(g, self.batch, length, self.questions))


def _one_thread(_worker):
    torch.set_num_threads(1)


def accuracy(model, device, length: int, batches: int = 4, batch: int = 16):
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for task in tasks.TASKS:
            for i in range(batches):
                prompts, answers = tasks.eval_batch(task, 10_000 + i, batch, length)
                x = torch.cat([prompts, answers[:, :-1]], dim=1).to(device)
                logits = model(x).logits[:, prompts.shape[1] - 1:]
                hits += int((logits.argmax(-1).cpu() == answers).all(-1).sum())
                total += batch
    model.train()
    return hits / total


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions", type=int, default=16, help="teacher-forced questions per sequence")
    parser.add_argument("--workers", type=int, default=4, help="data-prefetching processes")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model for CPU smoke runs")
    parser.add_argument("--small", action="store_true", help="2 layers, hidden 128: trainable on a CPU at 512 tokens")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this wall time")
    parser.add_argument("--stop-step", type=int, default=None,
                        help="stop after this many steps (the schedule still spans --steps)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue from a directory this script wrote (model, optimizer, step, data stream)")
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(**(TINY if args.tiny else SMALL if args.small else MODEL))
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    log, first = [], 0
    if args.resume is not None:   # model, optimizer, schedule and data stream exactly where they stopped
        state = torch.load(args.resume / "trainer_state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        first, log = state["step"], state["log"]
    last = args.steps if args.stop_step is None else min(args.steps, args.stop_step)
    data = torch.utils.data.DataLoader(
        Batches(args.seed, args.steps, args.batch, args.max_len, args.questions), batch_size=None,
        sampler=range(first, last), num_workers=args.workers, prefetch_factor=8 if args.workers else None,
        worker_init_fn=_one_thread)
    start = time.time()
    step = first - 1
    for step, (length, x, y) in zip(range(first, last), data):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            entry = dict(step=step, loss=float(loss.detach()), length=length, seconds=round(time.time() - start, 1))
            if step % 1000 == 0 and step > first:
                entry["accuracy_512"] = accuracy(model, device, 512, batches=1)
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if args.minutes is not None and time.time() - start > 60 * args.minutes:
            print(f"stopping at step {step}: {args.minutes} minutes", flush=True)
            break
    lengths = (128,) if args.tiny else (256, args.max_len) if args.small else (256, 2048)
    acc = {n: accuracy(model, device, n) for n in lengths}
    print(json.dumps(dict(final_accuracy=acc, parameters=params, steps_done=step + 1)), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                    step=step + 1, log=log), args.out / "trainer_state.pt")
    model.to(torch.bfloat16).save_pretrained(args.out)
    (args.out / "training_log.json").write_text(json.dumps(dict(args=vars(args), log=log, final_accuracy=acc, parameters=params),
                                                     indent=1, default=str))


if __name__ == "__main__":
    main()
