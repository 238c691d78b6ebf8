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
    args = parser.parse_args(argv)
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    filters = estimate(model, args.sequences, args.length)
    save_file({"qfilter": filters.contiguous()}, str(args.checkpoint / FILE))
    print(f"{FILE}: filters {list(filters.shape)} (layers, KV heads, head dim) from {args.sequences} x "
          f"{args.length} tokens")


if __name__ == "__main__":
    main()
