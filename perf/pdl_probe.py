"""Would programmatic dependent launch (PDL) pay for KeyDiff's chain? A probe for issue 20's item 2.

A chain shaped like KeyDiff's launches: a pass that reads K and writes per-program partials of the
normalized keys' sum, a merge of one program per row, a second pass over K that scores each key
against its row's merged sum. Launched plainly, or with PDL (Hopper: the merge and the second pass
are launched with the programmatic-serialization attribute, wait with griddepcontrol.wait at their
top, and every kernel lets its dependents launch at its start), so that a dependent's launch and
its programs' start overlap its predecessor's tail. Each form is timed as a CUDA graph of 50 chains
back to back (perf.timing.graph_times, L2 flushed before each replay; a boundary saves at most a
microsecond or two, so 50 chains per pair of events), three rounds alternating, the best round
each; the two forms' scores must agree.

    python perf/pdl_probe.py [--n 131072] [--b 1,4]
    python perf/pdl_probe.py --toy      # CPU: the plain chain in the interpreter, against torch
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.timing import graph_times  # noqa: E402


@triton.jit
def _pass1(k_ptr, part_ptr, N, tiles_per_prog, S, D: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    i_s = tl.program_id(0)
    i_row = tl.program_id(1)
    o_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    base = k_ptr + i_row.to(tl.int64) * N * D
    for t in tl.range(0, tiles_per_prog, num_stages=2):
        o_n = (i_s * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = o_n < N
        k = tl.load(base + o_n[:, None] * D + o_d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        nrm = tl.sqrt(tl.sum(k * k, 1)) + 1e-6
        acc += k / nrm[:, None]
    tl.store(part_ptr + (i_row * S + i_s) * D + o_d, tl.sum(acc, 0))


@triton.jit
def _merge(part_ptr, anchor_ptr, S, D: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    i_row = tl.program_id(0)
    o_d = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + (i_row * S + s) * D + o_d)
    tl.store(anchor_ptr + i_row * D + o_d, acc)


@triton.jit
def _pass2(k_ptr, anchor_ptr, out_ptr, N, tiles_per_prog, D: tl.constexpr, BLOCK_N: tl.constexpr,
           PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    i_s = tl.program_id(0)
    i_row = tl.program_id(1)
    o_d = tl.arange(0, D)
    a = tl.load(anchor_ptr + i_row * D + o_d)
    base = k_ptr + i_row.to(tl.int64) * N * D
    for t in tl.range(0, tiles_per_prog, num_stages=2):
        o_n = (i_s * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = o_n < N
        k = tl.load(base + o_n[:, None] * D + o_d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
        s = tl.sum(k * a[None, :], 1) / (tl.sqrt(tl.sum(k * k, 1)) + 1e-6)
        tl.store(out_ptr + i_row.to(tl.int64) * N + o_n, s, mask=m)


def chain(k, part, anchor, out, pdl, S, tiles):
    rows, n, d = k.shape
    _pass1[(S, rows)](k, part, n, tiles, S, D=d, BLOCK_N=64, PDL=pdl, num_warps=8)
    _merge[(rows,)](part, anchor, S, D=d, PDL=pdl, num_warps=4, launch_pdl=pdl)
    _pass2[(S, rows)](k, anchor, out, n, tiles, D=d, BLOCK_N=64, PDL=pdl, num_warps=8, launch_pdl=pdl)


def chain_us(fn, chains: int = 50) -> float:
    """Median graph time of ``chains`` calls of fn back to back, per call, us (perf.timing)."""
    return statistics.median(graph_times(lambda: [fn() for _ in range(chains)], 5)) / chains * 1e6


def toy():
    """The plain chain at toy size (on the CPU in the interpreter: PDL needs a Hopper GPU) against torch."""
    device = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    rows, n, d, block, tiles = 2, 200, 64, 64, 2
    k = torch.randn(rows, n, d, device=device)
    S = triton.cdiv(triton.cdiv(n, block), tiles)
    part, anchor = torch.empty(rows, S, d, device=device), torch.empty(rows, d, device=device)
    out = torch.empty(rows, n, device=device)
    chain(k, part, anchor, out, False, S, tiles)
    normed = k / (k.norm(dim=-1, keepdim=True) + 1e-6)
    expected = (k @ normed.sum(1).unsqueeze(-1)).squeeze(-1) / (k.norm(dim=-1) + 1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    print(f"toy chain (rows {rows}, N {n}, D {d}) matches torch")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--b", default="1,4")
    ap.add_argument("--toy", action="store_true")
    a = ap.parse_args()
    if a.toy:
        return toy()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "us per chain (graph of 50), plain / pdl")
    for b in map(int, a.b.split(",")):
        rows, d = b * 8, 128
        k = torch.randn(rows, a.n, d, device="cuda", dtype=torch.bfloat16)
        S = max(1, 4 * sms // rows)
        tiles = triton.cdiv(triton.cdiv(a.n, 64), S)
        S = triton.cdiv(triton.cdiv(a.n, 64), tiles)
        part = torch.empty(rows, S, d, device="cuda")
        anchor = torch.empty(rows, d, device="cuda")
        out = {p: torch.empty(rows, a.n, device="cuda") for p in (False, True)}
        res = {False: [], True: []}
        for _ in range(3):
            for p in (False, True):
                res[p].append(chain_us(lambda: chain(k, part, anchor, out[p], p, S, tiles)))
        torch.testing.assert_close(out[True], out[False])
        plain, pdl = min(res[False]), min(res[True])
        k_mb = k.numel() * k.element_size() / 1e6
        print(f"B={b} N={a.n} rows={rows} S={S}: plain {plain:8.1f}  pdl {pdl:8.1f}  pdl/plain {pdl / plain:.3f}  "
              f"({k_mb:.0f} MB of K read twice)")


if __name__ == "__main__":
    main()
