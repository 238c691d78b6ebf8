"""Instructions per kernel of a policy, from the SASS ptxas writes for sm_90, without a GPU.

Each of the policy's statistics and score kernels is compiled as evict() would launch it
(tritonkv.aot: Triton's own binder on meta tensors) and disassembled with the cuobjdump Triton
ships; the opcodes are counted, the exponent unit's (MUFU) by variant. A kernel's loop appears
once in the listing, so the counts are per loop body plus the code around it: compare two
builds' counts (a switch, a code change), not a count with a time.

    python perf/sass_ops.py --policies snapkv,h2o      # TRITON_INTERPRET unset
    TRITONKV_BLOCK_N=128 python perf/sass_ops.py --policies snapkv
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tritonkv import aot, policies  # noqa: E402
from tritonkv.compiler import compile_policy, launch_args  # noqa: E402

OPCODE = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
SHOWN = ("HGMMA", "MUFU", "FFMA", "FADD", "FMUL", "FMNMX", "F2FP", "HADD2", "LEA", "IMAD", "FSEL", "SHFL", "LDS", "STS", "LDG", "LDGSTS", "STG",
         "BAR", "SYNCS")


def cuobjdump() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def opcodes(cubin: bytes) -> collections.Counter:
    """Opcode (first dotted part) -> count, and 'MUFU.<variant>' -> count, of a cubin's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = OPCODE.match(line)
        if m:
            op = m.group(1)
            ops[op.split(".")[0]] += 1
            if op.startswith("MUFU."):
                ops[".".join(op.split(".")[:2] + ([op.split(".")[2]] if op.count(".") > 1 else []))] += 1
    return ops


def policy_ops(name: str, n: int = 4096, d: int = 128, batch: int = 1, heads: int = 8, group: int = 4,
               window: int = 64) -> dict:
    """{kernel: opcode counts} of one preset's statistics and score kernels (bf16)."""
    policy = policies.PRESETS[name]()
    meta = dict(device="meta", dtype=torch.bfloat16)
    keys, values = torch.empty(batch, heads, n, d, **meta), torch.empty(batch, heads, n, d, **meta)
    queries = torch.empty(batch, heads * group, window, d, **meta) if policy.needs_queries else None
    compiled = compile_policy(policy)
    priorities = torch.empty(max(1, len(compiled.program.slots)), batch * heads, n, device="meta",
                             dtype=torch.float32)
    geo, args = launch_args(compiled, keys, values, queries, 0, priorities)
    out = {}
    for level in range(len(compiled.program.levels)):
        out[f"stats_{level}"] = aot.build(compiled.kernel(f"stats_{level}"), args, geo.constexprs, geo.num_warps)
    out["score"] = aot.build(compiled.kernel("score"), args, geo.constexprs, geo.num_warps, maxnreg=geo.score_maxnreg)
    return {kernel: dict(opcodes(c.asm["cubin"])) for kernel, c in out.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="snapkv")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset: interpreted kernels are not compiled")
    results = {}
    for name in args.policies.split(","):
        results[name] = policy_ops(name)
        for kernel, ops in results[name].items():
            total = sum(v for k, v in ops.items() if "." not in k)
            mufu = {k: v for k, v in sorted(ops.items()) if k.startswith("MUFU.")}
            print(f"{name:10s} {kernel:8s} total {total:5d}  " + " ".join(f"{op} {ops.get(op, 0)}" for op in SHOWN)
                  + f"  {mufu}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
