"""Evict a synthetic KV cache with every preset; print what each kept and how fast.

    python -m tritonkv.demo [--n 4096] [--budget 0.25] [--backend auto|triton|reference]

The cache has a structure the policies can find: most keys lean towards one shared
direction, a few "needle" keys point elsewhere, and the proxy queries (the last tokens
of the prompt) look for the needles. The table shows, per policy: tokens kept per head,
the share of needles kept, the median time of evict(), and the overlap (in %) of its
kept set with every other policy's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import api, policies
from .policies.qfilters import DIRECTION as QFILTER


def synthetic_cache(batch=1, heads=8, n=4096, dim=128, group=4, window=64, needle_share=0.02,
                    dtype=torch.bfloat16, device="cpu", seed=0):
    """(keys, values, queries, needle mask [B, H, N]) of a structured synthetic cache."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(heads, 1, dim, generator=g)
    keys = 1.5 * shared + torch.randn(batch, heads, n, dim, generator=g)
    values = torch.randn(batch, heads, n, dim, generator=g)
    needles = torch.rand(batch, heads, n, generator=g) < needle_share
    needles[..., n - window:] = False
    target = torch.randn(heads, dim, generator=g)
    keys[needles] = (3.0 * target.view(1, heads, 1, dim).expand(batch, heads, n, dim))[needles] \
        + 0.3 * torch.randn(int(needles.sum()), dim, generator=g)
    queries = target.repeat_interleave(group, 0).view(1, heads * group, 1, dim) \
        + 0.5 * torch.randn(batch, heads * group, window, dim, generator=g)
    to = dict(dtype=dtype, device=device)
    return keys.to(**to), values.to(**to), queries.to(**to), needles.to(device)


def kept_mask(out, shape) -> torch.Tensor:
    b, h, n = shape
    mask = torch.zeros(b, h, n, dtype=torch.bool, device=out.indices.device)
    if isinstance(out, api.EvictedVarlen):
        heads = torch.repeat_interleave(torch.arange(b * h, device=mask.device), out.lengths.reshape(-1))
        mask.view(b * h, n)[heads, out.indices] = True
    else:
        mask.scatter_(-1, out.indices, True)
    return mask


def timed(fn, repeats: int, cuda: bool):
    fn()  # warm-up: compiles kernels on first use
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="tokens per head (default 32768 on GPU, 4096 on CPU)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n = args.n or (32768 if cuda else 4096)
    keys, values, queries, needles = synthetic_cache(heads=args.heads, n=n, dim=args.dim, device=device)
    shape = keys.shape[:3]
    print(f"tritonkv demo: cache B=1 H_kv={args.heads} N={n} D={args.dim} bf16 on {device}, "
          f"{int(needles.sum())} needles, budget {args.budget:g}, backend {args.backend}")

    # Q-Filters' directions, estimated from the proxy queries (a model would use calibration data)
    directions = {QFILTER: policies.estimate_filters(queries, args.heads).to(device)}
    results = {}
    for name, make in policies.PRESETS.items():
        policy = make()
        named = {n: directions[n] for n in policy.directions} or None
        out, seconds = timed(lambda: api.evict(keys, values, policy, args.budget, queries=queries,
                                               directions=named, backend=args.backend), args.repeats, cuda)
        mask = kept_mask(out, shape)
        results[name] = (mask, seconds)

    names = list(results)
    short = {name: name[:7] for name in names}
    header = f"{'policy':<14}{'kept/head':>10}{'needles':>9}{'ms':>9}  " + "".join(f"{short[m]:>8}" for m in names)
    print(header)
    print("-" * len(header))
    for name in names:
        mask, seconds = results[name]
        kept = mask.sum().item() / (shape[0] * shape[1])
        needle_hit = 100.0 * (mask & needles).sum().item() / max(1, needles.sum().item())
        overlaps = []
        for other in names:
            other_mask = results[other][0]
            overlaps.append(100.0 * (mask & other_mask).sum().item() / max(1, mask.sum().item()))
        print(f"{name:<14}{kept:>10.0f}{needle_hit:>8.0f}%{seconds * 1e3:>9.2f}  " + "".join(f"{o:>7.0f}%" for o in overlaps))
    print("overlap = % of the row policy's kept tokens that the column policy also kept")


if __name__ == "__main__":
    main()
