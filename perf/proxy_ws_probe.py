"""How fast can a proxy attention's statistics pass run on Hopper: the library's SnapKV statistics
kernel beside standalone variants of its main loop (whole 64-key tiles, no masks), one process,
as ratios. Each variant computes, per split of a row's keys, the online softmax statistics (max m
and sum l of 2^(s - m), s = q.k * log2(e) / sqrt(D)) of the 256 proxy query rows of a KV head (4
query heads x a 64-token window), as kernels/proxy.py's proxy_stats_tile does:

    ptr      pointer loads software-pipelined by Triton (what the generated kernel does)
    desc     K tiles through a host TensorDescriptor (TMA)
    ws256    desc with Triton's warp specialization of the loop (4 warps asked: Triton makes a producer
             warpgroup issue the TMA and two consumer warpgroups the products; with 8 warps asked,
             or Q loaded by pointers, Triton 3.6 leaves the loop as it is or fails to compile it)
    ws128    ws256 with two programs per KV head of 128 query rows each
    rot      the product of tile i + 1 issued before the softmax of tile i (its wgmma in flight
             while the exponentials run), pointer loads
    half     two programs per KV head of 128 query rows, 4 warps each (independent chains)
    w16      ptr with 16 warps (four warpgroups of 64 query rows each)

    python perf/proxy_ws_probe.py --n 131072 --batch 1 --json OUT.json
    python perf/proxy_ws_probe.py --compile    # sm_90 build of every variant, no GPU (registers, shared memory)
    python perf/proxy_ws_probe.py --toy        # CPU interpreter, tiny sizes: checks the variants' statistics
"""

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOG2E = 1.4426950408889634
VARIANTS = ("ptr", "desc", "ws256", "ws128", "rot", "half", "w16")


@triton.jit
def _tile_stats(run_m, run_l, x, QK_SCALE: tl.constexpr):
    """proxy_stats_tile's update for a tile of unscaled products x [QB, BLOCK_N]."""
    t_m = tl.max(x, 1) * QK_SCALE
    t_l = tl.sum(tl.exp2(x * QK_SCALE - t_m[:, None]), 1)
    m = tl.maximum(run_m, t_m)
    l_ = run_l * tl.exp2(run_m - m) + t_l * tl.exp2(t_m - m)
    return m, l_


@triton.jit
def _stats_probe(q_ptr, q_desc, k_ptr, k_desc, out_ptr, N, H, S, tiles_per_prog,
                 D: tl.constexpr, QB: tl.constexpr, BLOCK_N: tl.constexpr, QK_SCALE: tl.constexpr,
                 STAGES: tl.constexpr, MODE: tl.constexpr, WS: tl.constexpr):
    """Program (split, row, chunk): rows chunk*QB .. of the row's proxy queries q [rows, QR, D] over
    tiles of keys k [rows, N, D]; writes (m, l) [rows, chunks, S, 2, QB]. MODE 0: pointer loads,
    1: descriptor loads, 2: pointer loads with the next tile's product issued before this tile's
    softmax."""
    i_s = tl.program_id(0)
    i_row = tl.program_id(1)
    i_c = tl.program_id(2)
    n_ch = tl.num_programs(2)
    o_q = tl.arange(0, QB)
    o_d = tl.arange(0, D)
    o_t = tl.arange(0, BLOCK_N)
    if MODE == 1:
        b_q = q_desc.load([(i_row * n_ch + i_c) * QB, 0])
    else:
        b_q = tl.load(q_ptr + (i_row * n_ch * QB + i_c * QB + o_q)[:, None] * D + o_d[None, :])
    run_m = tl.full([QB], float("-inf"), tl.float32)
    run_l = tl.zeros([QB], dtype=tl.float32)
    t0 = i_s * tiles_per_prog
    k_row = k_ptr + i_row.to(tl.int64) * N * D
    if MODE == 2:
        b_k = tl.load(k_row + (t0 * BLOCK_N + o_t)[:, None] * D + o_d[None, :])
        x = tl.dot(b_q, tl.trans(b_k))
        for it in tl.range(1, tiles_per_prog, num_stages=STAGES):
            b_k = tl.load(k_row + ((t0 + it) * BLOCK_N + o_t)[:, None] * D + o_d[None, :])
            x_next = tl.dot(b_q, tl.trans(b_k))
            run_m, run_l = _tile_stats(run_m, run_l, x, QK_SCALE)
            x = x_next
        run_m, run_l = _tile_stats(run_m, run_l, x, QK_SCALE)
    else:
        for it in tl.range(0, tiles_per_prog, num_stages=STAGES, warp_specialize=WS):
            if MODE == 1:
                b_k = k_desc.load([i_row * N + (t0 + it) * BLOCK_N, 0])
            else:
                b_k = tl.load(k_row + ((t0 + it) * BLOCK_N + o_t)[:, None] * D + o_d[None, :])
            x = tl.dot(b_q, tl.trans(b_k))
            run_m, run_l = _tile_stats(run_m, run_l, x, QK_SCALE)
    p_out = out_ptr + ((i_row * n_ch + i_c) * S + i_s) * 2 * QB
    tl.store(p_out + o_q, run_m)
    tl.store(p_out + QB + o_q, run_l)


def config(variant: str):
    """(MODE, WS, QB, num_warps) of a variant."""
    return {"ptr": (0, False, 256, 8), "desc": (1, False, 256, 8), "ws256": (1, True, 256, 4),
            "ws128": (1, True, 128, 4), "rot": (2, False, 256, 8), "half": (0, False, 128, 4),
            "w16": (0, False, 256, 16)}[variant]


def make_inputs(rows: int, n: int, d: int, device, qr: int = 256, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(rows, qr, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(rows, n, d, generator=g).to(device=device, dtype=dtype)
    return q, k


def launch_args(variant: str, q, k, splits: int, block_n: int = 64, stages=None):
    """(kernel launcher, out) of one variant over q [rows, QR, D], k [rows, N, D]."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    mode, ws, qb, warps = config(variant)
    rows, n, d = k.shape
    tiles = n // block_n
    assert n % block_n == 0 and tiles % splits == 0, "whole tiles, equal splits"
    chunks = q.shape[1] // qb
    out = torch.empty(rows, chunks, splits, 2, qb, device=k.device, dtype=torch.float32)
    desc = TensorDescriptor.from_tensor(k.view(rows * n, d), [block_n, d]) if mode == 1 else k
    q_desc = TensorDescriptor.from_tensor(q.reshape(-1, d), [qb, d]) if mode == 1 else q
    qk_scale = LOG2E / math.sqrt(d)

    def run():
        _stats_probe[(splits, rows, chunks)](q, q_desc, k, desc, out, n, 1, splits, tiles // splits, D=d, QB=qb,
                                             BLOCK_N=block_n, QK_SCALE=qk_scale, STAGES=stages, MODE=mode, WS=ws,
                                             num_warps=warps)
    return run, out


def merged(out):
    """lse [rows, QR] = m + log2(l) of the partials [rows, chunks, S, 2, QB]."""
    m, l_ = out[:, :, :, 0], out[:, :, :, 1]
    top = m.max(2, keepdim=True).values
    lse = top.squeeze(2) + torch.log2((l_ * torch.exp2(m - top)).sum(2))
    return lse.flatten(1)


def reference_lse(q, k):
    s = torch.einsum("rqd,rnd->rqn", q.float(), k.float()) * (LOG2E / math.sqrt(q.shape[-1]))
    return torch.logsumexp(s * math.log(2), -1) / math.log(2)


def library_stats_us(n: int, batch: int, replays: int, bandwidth: float) -> float:
    """The generated SnapKV statistics kernel's time in its evict call (perf/launches.py)."""
    from perf.launches import breakdown
    steps = breakdown("snapkv", n, batch, 0.1, replays, bandwidth)["launches"]
    return steps[0]["us"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--splits", type=int, default=0, help="programs per row (0: 64 at 8 rows, as the library)")
    ap.add_argument("--stages", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--json")
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if args.compile:
        return compile_all(variants, args.stages)
    if args.toy:
        return toy(variants)
    from perf.floor import copy_bandwidth
    from perf.timing import graph_times
    dev = torch.device("cuda")
    rows = args.batch * args.heads
    q, k = make_inputs(rows, args.n, 128, dev)
    tiles = args.n // 64
    splits = args.splits or max(1, 512 // rows)
    while tiles % splits:
        splits -= 1
    bandwidth = copy_bandwidth()
    k_us = k.numel() * k.element_size() / bandwidth * 1e6
    ref = reference_lse(q[:1], k[:1])
    results = dict(n=args.n, batch=args.batch, rows=rows, splits=splits, k_read_us=k_us,
                   device=torch.cuda.get_device_name(), variants={})
    try:
        results["library_us"] = library_stats_us(args.n, args.batch, args.replays, bandwidth)
    except Exception as e:   # the probe's own variants still count
        results["library_error"] = repr(e)
    print(f"K read at copy bandwidth {k_us:.1f} us; library stats_0 {results.get('library_us', float('nan')):.1f} us")
    for variant in variants:
        for stages in args.stages:
            name = f"{variant}/s{stages}"
            try:
                run, out = launch_args(variant, q, k, splits, stages=stages)
                run()
                torch.cuda.synchronize()
                err = (merged(out)[:1] - ref).abs().max().item()
                us = statistics.median(graph_times(run, args.replays)) * 1e6
            except Exception as e:
                results["variants"][name] = dict(error=repr(e)[:300])
                print(f"{name:14s} failed: {repr(e)[:200]}")
                continue
            results["variants"][name] = dict(us=us, x_k_read=us / k_us, lse_err=err)
            print(f"{name:14s} {us:8.1f} us  {us / k_us:5.2f}x K read  lse err {err:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def toy(variants):
    """Each variant at a tiny size against reference_lse: on the CPU (the interpreter, float32: its
    bfloat16 tl.dot is wrong) those without descriptors; on a GPU also desc. Never the warp-specialized
    ones: on an H100 they hung or faulted (run.log of perf/results/ab/proxy-ws-probe-7469e02-H100)."""
    cuda = torch.cuda.is_available()
    q, k = make_inputs(2, 256, 64, "cuda" if cuda else "cpu", qr=256, dtype=torch.bfloat16 if cuda else torch.float32)
    ref = reference_lse(q, k)
    for variant in variants:
        mode, ws = config(variant)[:2]
        if ws or (mode == 1 and not cuda):
            continue
        run, out = launch_args(variant, q, k, 2, stages=2)
        run()
        err = (merged(out) - ref).abs().max().item()
        print(f"{variant}: lse err {err:.2e}")
        assert err < 1e-3, variant


def compile_all(variants, stage_list):
    """Build each variant for sm_90 (no GPU): registers per thread, shared memory, wgmma count."""
    from tritonkv import cubin
    from tritonkv.aot import HOPPER
    from triton.compiler import ASTSource
    for variant in variants:
        mode, ws, qb, warps = config(variant)
        for stages in stage_list:
            sig = {"q_ptr": "*bf16", "q_desc": f"tensordesc<bf16[{qb}, 128]>" if mode == 1 else "*bf16",
                   "k_ptr": "*bf16", "k_desc": "tensordesc<bf16[64, 128]>" if mode == 1 else "*bf16",
                   "out_ptr": "*fp32", "N": "i32", "H": "i32", "S": "i32", "tiles_per_prog": "i32",
                   "D": "constexpr", "QB": "constexpr", "BLOCK_N": "constexpr", "QK_SCALE": "constexpr",
                   "STAGES": "constexpr", "MODE": "constexpr", "WS": "constexpr"}
            consts = {"D": 128, "QB": qb, "BLOCK_N": 64, "QK_SCALE": LOG2E / math.sqrt(128), "STAGES": stages,
                      "MODE": mode, "WS": ws}
            attrs = {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]],
                     (4,): [["tt.divisibility", 16]]}
            if mode != 1:
                attrs[(1,)] = [["tt.divisibility", 16]]
                attrs[(3,)] = [["tt.divisibility", 16]]
            try:
                c = triton.compile(ASTSource(_stats_probe, sig, consts, attrs), target=HOPPER,
                                   options=dict(num_warps=warps))
            except Exception as e:
                print(f"{variant}/s{stages}: failed: {str(e).splitlines()[-1][:200] if str(e) else repr(e)}")
                continue
            ptx = c.asm["ptx"]
            regs = max(cubin.registers(c.asm["cubin"]).values(), default=0)
            print(f"{variant}/s{stages}: {regs} registers, {c.metadata.shared} B shared, "
                  f"{ptx.count('wgmma.mma_async')} wgmma, {ptx.count('cp.async.bulk.tensor')} TMA, "
                  f"{ptx.count('cp.async.cg') + ptx.count('cp.async.ca')} cp.async, "
                  f"{ptx.count('wgmma.wait_group')} waits, {c.metadata.num_warps} warps, "
                  f"{ptx.count('setmaxnreg')} setmaxnreg")


if __name__ == "__main__":
    main()
