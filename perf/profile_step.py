"""Where the GPU time of one StaticEvictingCache decode step goes: torch.profiler over a few
eager decode steps (kernels by CUDA time), for one mode of perf/generation.py. A tool for tuning.

    python perf/profile_step.py [--model wide] [--prompt 16384] [--policy tova] [--interval 1]
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.generation import MODELS, TOY_MODELS, make_model, prompt_ids, sdpa_context  # noqa: E402
from tritonkv import policies  # noqa: E402
from tritonkv.integrations import hf  # noqa: E402


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wide", choices=list(MODELS) + list(TOY_MODELS))
    parser.add_argument("--prompt", type=int, default=16384)
    parser.add_argument("--policy", default="tova")
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="profiled decode steps")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = make_model({**MODELS, **TOY_MODELS}[args.model], device, dtype)
    budget = max(1, round(0.1 * args.prompt))
    cache = hf.StaticEvictingCache(model, policies.PRESETS[args.policy](), budget, interval=args.interval)
    with sdpa_context("flash,efficient" if cuda else "default"):
        out = model(input_ids=prompt_ids(model, args.prompt), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(2 * args.interval + 2):   # every kind of step once
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            if cuda:
                torch.cuda.synchronize()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"{args.model} prompt {args.prompt} {args.policy} budget {budget} interval {args.interval}: "
          f"{args.steps} eager decode steps")
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
