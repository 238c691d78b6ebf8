"""Synthetic long-context retrieval tasks for a tiny model (token ids only, no tokenizer).

Vocabulary (512): 0 PAD, 1 BOS, 3 QUERY, 4 KEY, 5 VALUE; keys and values are drawn from
[16, 100); filler ("haystack") tokens from [100, 512).

  niah  multi-key needle in a haystack: filler with 2..8 needles [KEY k1 k2 VALUE v1 v2] at
        random places; the question [QUERY k1 k2 VALUE] asks for one needle's (v1, v2).
  mqar  associative recall: 64 pairs [k v] (distinct single-token keys) scattered in filler;
        the question [QUERY k VALUE] asks for one key's value.

``batch(task, ...)`` returns prompts ending with the question and the answers; for training,
``train_batch`` appends several teacher-forced questions and marks the answer positions.
"""

from __future__ import annotations

import torch

VOCAB = 512
PAD, BOS, QUERY, KEY, VALUE = 0, 1, 3, 4, 5
SYMBOLS = (16, 100)
FILLER = (100, VOCAB)
TASKS = ("niah", "mqar")
QUESTION_LEN = {"niah": 4, "mqar": 3}   # [QUERY k1 k2 VALUE], [QUERY k VALUE]


def _symbols(g, n):
    return torch.randint(*SYMBOLS, (n,), generator=g)


def niah_context(g, length: int, needles: int):
    """(context tokens, needle keys [needles, 2], needle values [needles, 2])."""
    ctx = torch.randint(*FILLER, (length,), generator=g)
    ctx[0] = BOS
    keys = torch.stack([_symbols(g, 2) for _ in range(needles)])
    while len({tuple(k.tolist()) for k in keys}) < needles:   # distinct keys
        keys = torch.stack([_symbols(g, 2) for _ in range(needles)])
    values = torch.stack([_symbols(g, 2) for _ in range(needles)])
    slots = torch.randperm((length - 8) // 6, generator=g)[:needles] * 6 + 1
    for key, value, at in zip(keys, values, slots.tolist()):
        ctx[at:at + 6] = torch.tensor([KEY, key[0], key[1], VALUE, value[0], value[1]])
    return ctx, keys, values


def mqar_context(g, length: int, pairs: int = 64):
    """Filler with `pairs` [k v] pairs (distinct single-token keys) at random places."""
    pairs = min(pairs, (length - 4) // 2, SYMBOLS[1] - SYMBOLS[0])
    ctx = torch.randint(*FILLER, (length,), generator=g)
    ctx[0] = BOS
    keys = torch.randperm(SYMBOLS[1] - SYMBOLS[0], generator=g)[:pairs] + SYMBOLS[0]
    values = _symbols(g, pairs)
    slots = torch.randperm((length - 4) // 2, generator=g)[:pairs] * 2 + 1
    ctx[slots], ctx[slots + 1] = keys, values
    return ctx, keys, values


def question(task: str, g, keys, values):
    """(question tokens, answer tokens) about one random needle / pair."""
    i = int(torch.randint(0, len(keys), (1,), generator=g))
    if task == "niah":
        return torch.tensor([QUERY, keys[i, 0], keys[i, 1], VALUE]), values[i]
    return torch.tensor([QUERY, keys[i], VALUE]), values[i:i + 1]


def sample(task: str, g, length: int, questions: int = 1):
    """(tokens, answer positions, answers): context + `questions` questions with answers."""
    if task == "niah":
        ctx, keys, values = niah_context(g, length, int(torch.randint(2, 9, (1,), generator=g)))
    else:
        ctx, keys, values = mqar_context(g, length)
    parts, positions, answers = [ctx], [], []
    offset = len(ctx)
    for _ in range(questions):
        q, a = question(task, g, keys, values)
        parts += [q, a]
        positions += list(range(offset + len(q) - 1, offset + len(q) - 1 + len(a)))  # predicting a
        answers.append(a)
        offset += len(q) + len(a)
    return torch.cat(parts), torch.tensor(positions), torch.cat(answers)


def train_batch(g, batch: int, length: int, questions: int = 8):
    """Inputs [B, T], targets [B, T] (-100 except at answer tokens), mixing both tasks."""
    rows, targets = [], []
    for i in range(batch):
        tokens, positions, answers = sample(TASKS[i % 2], g, length, questions)
        target = torch.full_like(tokens, -100)
        target[positions] = answers
        rows.append(tokens)
        targets.append(target)
    width = max(len(r) for r in rows)
    pad = lambda t, v: torch.cat([t, torch.full((width - len(t),), v)])  # noqa: E731
    return torch.stack([pad(r, PAD) for r in rows]), torch.stack([pad(t, -100) for t in targets])


def eval_batch(task: str, seed: int, batch: int, length: int):
    """Prompts [B, T] (context + one question) and answers [B, A], all the same length."""
    g = torch.Generator().manual_seed(seed)
    prompts, answers = [], []
    for _ in range(batch):
        tokens, positions, answer = sample(task, g, length, 1)
        prompts.append(tokens[: int(positions[0]) + 1])
        answers.append(answer)
    return torch.stack(prompts), torch.stack(answers)
