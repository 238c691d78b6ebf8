"""Q-Filters' directions for the tiny model, estimated from its queries on training data.

    python evals/qfilters.py --checkpoint evals/checkpoint      # writes evals/checkpoint/qfilters.safetensors

As the paper does (arXiv 2503.02812, make_filters.py): calibration sequences of the training
distribution (20 of 2,048 tokens, evals/tasks.train_batch with a seed no eval uses), the
post-RoPE queries of every layer and query head, and per head the first right singular vector
of 3,000 of them, signed by a majority vote and negated; a GQA group's filters are averaged
(tritonkv.policies.estimate_filters). The queries are recorded by hf.EvictingCache's query
buffer, the same capture that proxy attention scores use. Runs on the CPU in seconds.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals import tasks  # noqa: E402
from tritonkv import policies  # noqa: E402

FILE = "qfilters.safetensors"
CALIBRATION_SEED = 777_000   # eval data seeds are 123 + 1000 * s (eval.py): never this one


@torch.no_grad()
def estimate(model, sequences: int = 20, length: int = 2048, batch: int = 4, samples: int = 3000,
             seed: int = CALIBRATION_SEED) -> torch.Tensor:
    """Filters [n_layers, H_kv, D] of a causal LM from ``sequences`` training sequences."""
    from tritonkv.integrations import hf
    config = model.config
    g = torch.Generator().manual_seed(seed)
    per_layer = [[] for _ in range(config.num_hidden_layers)]
    for start in range(0, sequences, batch):
        ids, _ = tasks.train_batch(g, min(batch, sequences - start), length)
        # no eviction (budget None); the query buffer keeps every query of the forward
        cache = hf.EvictingCache(model, policies.snapkv(), None, window=ids.shape[1])
        model(input_ids=ids.to(model.device), past_key_values=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):
            per_layer[i].append(layer.queries.float().cpu())
    return torch.stack([policies.estimate_filters(torch.cat(q), config.num_key_value_heads, samples,
                                                  generator=torch.Generator().manual_seed(seed + i))
                        for i, q in enumerate(per_layer)])


@torch.no_grad()
def attention_correlation(model, filters: torch.Tensor, length: int = 512, seed: int = 5) -> torch.Tensor:
    """[n_layers, H_kv]: Spearman correlation, on one mqar prompt, between what the qfilters
    preset ranks by (-k . f) and the mean attention a key receives from the queries that see
    it (causal, averaged over the GQA group): the premise of Q-Filters, checked on this model."""
    from tritonkv.integrations import hf
    prompts, _ = tasks.eval_batch("mqar", seed, 1, length)
    cache = hf.EvictingCache(model, policies.snapkv(), None, window=prompts.shape[1])
    model(input_ids=prompts.to(model.device), past_key_values=cache, use_cache=True)
    rank = lambda x: x.argsort(-1).argsort(-1).float()  # noqa: E731
    out = []
    for i, layer in enumerate(cache.layers):
        k, q = layer.keys[0].float().cpu(), layer.queries[0].float().cpu()     # [H_kv, N, D], [H_q, N, D]
        h, n, d = k.shape
        logits = torch.einsum("hgqd,hnd->hgqn", q.view(h, -1, n, d), k) / d ** 0.5
        seen = torch.ones(n, n, dtype=torch.bool).tril()
        probs = torch.softmax(logits.masked_fill(~seen, float("-inf")), -1)
        received = probs.mean(1).sum(1) / seen.sum(0)                           # [H_kv, N]
        score = -(k * filters[i][:, None, :]).sum(-1)
        a, b = rank(received[:, 1:]), rank(score[:, 1:])                        # token 0 (the sink) left out
        a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
        out.append((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)))
    return torch.stack(out)


def load(checkpoint: Path):
    """The filters saved beside a checkpoint, or None."""
    from safetensors.torch import load_file
    path = Path(checkpoint) / FILE
    return load_file(path)["qfilter"] if path.exists() else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("evals/checkpoint"))
    parser.add_argument("--sequences", type=int, default=20)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--check", action="store_true",
                        help="print how the saved filters' ranking correlates with the attention keys receive")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    if args.check:
        corr = attention_correlation(model, load(args.checkpoint))
        for i, row in enumerate(corr):
            print(f"layer {i}: Spearman(-k.f, mean attention received) per KV head: "
                  + " ".join(f"{c:+.2f}" for c in row.tolist()))
        return
    filters = estimate(model, args.sequences, args.length)
    save_file({"qfilter": filters.contiguous()}, str(args.checkpoint / FILE))
    print(f"{FILE}: filters {list(filters.shape)} (layers, KV heads, head dim) from {args.sequences} x "
          f"{args.length} tokens")


if __name__ == "__main__":
    main()
