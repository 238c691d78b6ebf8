"""Probe: a proxy score kernel capped at 128 registers per thread (Triton's ``maxnreg``), which fits
two programs per SM where the uncapped build does not (H2O's: 156 registers), against the uncapped
one; the kernel alone (triton.testing.do_bench of the score launch after the call's statistics).
SnapKV's (117 registers, already two per SM) is the control. Not the suite; not used by the library.

    python perf/maxnreg_probe.py [--n 131072] [--batch 4]
    python perf/maxnreg_probe.py --toy     # CPU, tiny sizes: finds the score launch, times nothing
"""

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.test_evict import POLICIES, make_cache  # noqa: E402
from tritonkv import compiler  # noqa: E402
from tritonkv.budget import allocate, resolve_budget  # noqa: E402
from tritonkv.kernels.launch import kernel_name  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="h2o,snapkv")
    parser.add_argument("--n", type=int, default=131072)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--toy", action="store_true", help="CPU, tiny sizes: checks the script, times nothing")
    args = parser.parse_args(argv)
    if args.toy:
        args.n, args.batch = 300, [1]
    print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", flush=True)
    for name in args.policies.split(","):
        for batch in args.batch:
            keys, values, queries = make_cache(batch, args.n)
            policy = POLICIES[name]
            alloc = allocate(policy, args.n, resolve_budget(0.1, args.n))
            call = compiler.prepare(compiler.compile_policy(policy), alloc, keys, values, queries, 0)
            compiler.run(call)
            score = next(s for s in call.launches if kernel_name(s.fn) == "score")
            if args.toy:
                print(f"{name:8} B={batch} N={args.n}: score grid {score.grid}, {score.num_warps} warps", flush=True)
                continue
            times = {}
            for cap in (None, 128, None, 128):
                kw = dict(num_warps=score.num_warps)
                if score.num_stages is not None:
                    kw["num_stages"] = score.num_stages
                if cap:
                    kw["maxnreg"] = cap
                run = lambda: score.fn[score.grid](*score.args, **score.constexprs, **kw)  # noqa: E731
                compiled = run()
                ms = triton.testing.do_bench(run, warmup=25, rep=200)
                times.setdefault(cap, []).append(ms * 1e3)
                print(f"{name:8} B={batch} N={args.n} maxnreg={cap}: {ms * 1e3:8.1f} us, "
                      f"{compiled.n_regs} registers, {compiled.n_spills} spills", flush=True)
            print(f"{name:8} B={batch}: capped / uncapped {min(times[128]) / min(times[None]):.3f}", flush=True)


if __name__ == "__main__":
    main()
