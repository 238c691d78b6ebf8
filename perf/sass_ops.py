"""Instructions per kernel of a policy, from the SASS ptxas writes for sm_90, without a GPU.

Each of the policy's statistics and score kernels is compiled as evict() would launch it
(tritonkv.aot: Triton's own binder on meta tensors) and disassembled with the cuobjdump Triton
ships; the opcodes are counted, the exponent unit's (MUFU) by variant, over the whole listing
(each loop once: compare two builds, a switch or a code change, not a count with a time) and over
the body of the hottest loop ("stats_0 loop": one iteration's instructions per warp, what
docs/performance-log.md sets against the pipes' rates).

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
from typing import Iterable, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tritonkv import aot, policies  # noqa: E402
from tritonkv.compiler import compile_policy, launch_args  # noqa: E402

INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+([^;]*);")   # a listing line: address, instruction
OPCODE = re.compile(r"(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")      # an instruction's opcode, past its predicate
BACK_BRANCH = re.compile(r"BRA\s+0x([0-9a-f]+)")
SHOWN = ("HGMMA", "MUFU", "FFMA", "FADD", "FMUL", "FMNMX", "F2FP", "HADD2", "LEA", "IMAD", "FSEL", "SHFL", "LDS",
         "STS", "LDG", "LDGSTS", "STG", "BAR", "SYNCS")


def cuobjdump() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def listing(cubin: bytes) -> List[Tuple[int, str]]:
    """(address, instruction) of a cubin's SASS, in order."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in map(INSTRUCTION.match, text.splitlines()) if m]


def count(instructions: Iterable[str]) -> collections.Counter:
    """Opcode (first dotted part) -> count, and 'MUFU.<function>[.<type>]' -> count."""
    ops = collections.Counter()
    for text in instructions:
        m = OPCODE.match(text)
        if m:
            op = m.group(1)
            ops[op.split(".")[0]] += 1
            if op.startswith("MUFU."):
                ops[".".join(op.split(".")[:3])] += 1
    return ops


def hottest_loop(code: List[Tuple[int, str]]) -> collections.Counter:
    """Opcode counts of the body of the hottest loop (a backward branch and the code from its target,
    chosen by ``rank``): a tile loop's work per iteration and warp."""
    best = None
    for address, text in code:
        b = BACK_BRANCH.search(text)
        if b and int(b.group(1), 16) <= address:
            body = count(t for a, t in code if int(b.group(1), 16) <= a <= address)
            if best is None or rank(body) > rank(best):
                best = body
    return best or collections.Counter()


def rank(body: collections.Counter):
    """Loops with tensor-core instructions first; among those with as many, the shortest body (the
    unmasked loop over whole tiles, where codegen splits off the masked tail: the one most
    iterations run); without any, the longest."""
    size = sum(v for k, v in body.items() if "." not in k)
    return body["HGMMA"], -size if body["HGMMA"] else size


def policy_ops(name: str, n: int = 131072, d: int = 128, batch: int = 1, heads: int = 8, group: int = 4,
               window: int = 64) -> dict:
    """{kernel: opcode counts, 'kernel loop': those of its hottest loop's body} of one preset's
    statistics and score kernels (bf16)."""
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
    ops = {}
    for kernel, c in out.items():
        code = listing(c.asm["cubin"])
        ops[kernel] = dict(count(text for _, text in code))
        ops[f"{kernel} loop"] = dict(hottest_loop(code))
    return ops


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
            print(f"{name:10s} {kernel:13s} total {total:5d}  " + " ".join(f"{op} {ops.get(op, 0)}" for op in SHOWN)
                  + f"  {mufu}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
