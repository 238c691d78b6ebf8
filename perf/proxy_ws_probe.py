"""How fast can a proxy attention's statistics pass run on Hopper: the library's SnapKV statistics
kernel beside standalone variants of its main loop (whole tiles of 64 keys, 32 for gluon32, no masks),
one process, as ratios. Each variant computes, per split of a row's keys, the online softmax statistics
(max m and sum l of 2^(s - m), s = q.k * log2(e) / sqrt(D)) of the 256 proxy query rows of a KV head (4
query heads x a 64-token window), as kernels/proxy.py's proxy_stats_tile does:

    ptr      pointer loads software-pipelined by Triton (what the generated kernel does)
    desc     K tiles through a host TensorDescriptor (TMA)
    ws256    desc with Triton's warp specialization of the loop (4 warps asked: Triton makes a producer
             warpgroup issue the TMA and two consumer warpgroups the products; with 8 warps asked,
             or Q loaded by pointers, Triton 3.6 leaves the loop as it is or fails to compile it).
             On an H100 it hung: run only when named (--variants ws256)
    ws128    ws256 with two programs per KV head of 128 query rows each (on an H100: an illegal address)
    rot      the product of tile i + 1 issued before the softmax of tile i (its wgmma in flight
             while the exponentials run), pointer loads
    half     two programs per KV head of 128 query rows, 4 warps each (independent chains)
    w16      ptr with 16 warps (four warpgroups of 64 query rows each)
    gluon    the loop scheduled by hand in Gluon: TMA ring, tile i + 1's wgmma in flight during tile i's
             softmax (168 registers: one program per SM)
    gluon32  gluon with 32-key tiles (fewer registers)
    pingpong FlashAttention-3's schedule written out in Gluon: a producer warp streams K through TMA, two
             consumer warpgroups (128 query rows each) take turns on the tensor cores, so one's softmax runs
             during the other's product

    python perf/proxy_ws_probe.py --n 131072 --batch 1 --json OUT.json
    python perf/proxy_ws_probe.py --variants gluon --stages 3 --no-library   # one variant (a process each: a
                                                                              # variant that hangs takes only its own)
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
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOG2E = 1.4426950408889634
VARIANTS = ("ptr", "desc", "ws256", "ws128", "rot", "half", "w16", "gluon", "gluon32", "pingpong")


@triton.jit
def _tile_stats(run_m, run_l, x, QK_SCALE: tl.constexpr):
    """proxy_stats_tile's update for a tile of unscaled products x [QB, BLOCK_N]."""
    t_m = tl.max(x, 1) * QK_SCALE
    t_l = tl.sum(tl.exp2(x * QK_SCALE - t_m[:, None]), 1)
    m = tl.maximum(run_m, t_m)
    l_ = run_l * tl.exp2(run_m - m) + t_l * tl.exp2(t_m - m)
    return m, l_


@triton.jit
def _stats_probe(q_ptr, q_desc, k_ptr, k_desc, out_ptr, N, S, tiles_per_prog,
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


@gluon.jit
def ring_start(q_desc, q_row, q_smem, q_bar, k_desc, k_row, k_smem, k_bar, tiles, STAGES: gl.constexpr):
    """Start a Gluon loop's loads: barriers initialized, the query block q_desc[q_row] into q_smem and
    key tiles 0 .. STAGES - 1 (from row k_row of k_desc) into the ring's slots, each on its mbarrier."""
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        pred = i < tiles
        mbarrier.expect(k_bar.index(i), k_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(k_desc, [k_row + i * k_desc.block_type.shape[0], 0], k_bar.index(i),
                                        k_smem.index(i), pred=pred)
    mbarrier.wait(q_bar, phase=0)
    mbarrier.wait(k_bar.index(0), phase=0)


@gluon.jit
def ring_step(k_desc, k_row, k_smem, k_bar, j, tiles, STAGES: gl.constexpr):
    """Tile j's product is done: its slot takes tile j + STAGES; then wait for tile j + 1."""
    slot = j % STAGES
    pred = j + STAGES < tiles
    mbarrier.expect(k_bar.index(slot), k_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [k_row + (j + STAGES) * k_desc.block_type.shape[0], 0],
                                    k_bar.index(slot), k_smem.index(slot), pred=pred)
    mbarrier.wait(k_bar.index((j + 1) % STAGES), phase=((j + 1) // STAGES) & 1)


@gluon.jit
def ring_end(q_bar, k_bar, STAGES: gl.constexpr):
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))


@gluon.jit
def _stats_gluon(q_desc, k_desc, out_ptr, N, S, tiles_per_prog,
                 QK_SCALE: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """_stats_probe's loop scheduled by hand (Gluon, sm_90): K tiles through TMA into a ring of STAGES
    buffers, each awaited on its mbarrier; tile j + 1's product is issued (asynchronous wgmma) before
    tile j's softmax statistics and awaited after them, so the tensor cores and the exponent unit
    work at once within a warpgroup, which the Triton loop does not do (its wgmma wait sits right
    after the issue: read from the rot variant's PTX). Writes (m, l) as _stats_probe does (one chunk)."""
    QB: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    i_s = gl.program_id(0)
    i_row = gl.program_id(1)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                 instr_shape=[16, BLOCK_N, 16])
    rows: gl.constexpr = gl.SliceLayout(1, mma)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    row0 = i_row * N + i_s * tiles_per_prog * BLOCK_N
    ring_start(q_desc, i_row * QB, q_smem, q_bar, k_desc, row0, k_smem, k_bar, tiles_per_prog, STAGES)
    zero = gl.zeros([QB, BLOCK_N], gl.float32, layout=mma)
    m = gl.full([QB], float("-inf"), gl.float32, layout=rows)
    l = gl.zeros([QB], gl.float32, layout=rows)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    for j in range(tiles_per_prog - 1):
        ring_step(k_desc, row0, k_smem, k_bar, j, tiles_per_prog, STAGES)
        # tile j + 1's product runs while tile j's exponentials do
        s_next = warpgroup_mma(q_smem, k_smem.index((j + 1) % STAGES).permute((1, 0)), zero, use_acc=False,
                               is_async=True)
        t_m = gl.max(s, 1) * QK_SCALE
        m_new = gl.maximum(m, t_m)
        l = l * gl.exp2(m - m_new) + gl.sum(gl.exp2(s * QK_SCALE - gl.expand_dims(m_new, 1)), 1)
        m = m_new
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_next, ))
    t_m = gl.max(s, 1) * QK_SCALE
    m_new = gl.maximum(m, t_m)
    l = l * gl.exp2(m - m_new) + gl.sum(gl.exp2(s * QK_SCALE - gl.expand_dims(m_new, 1)), 1)
    m = m_new
    o_q = gl.arange(0, QB, layout=rows)
    p_out = out_ptr + (i_row * S + i_s) * 2 * QB
    gl.store(p_out + o_q, m)
    gl.store(p_out + QB + o_q, l)
    ring_end(q_bar, k_bar, STAGES)



@gluon.jit
def _pp_consumer(q_half, k_smem, ready, empty, turn_mine, turn_other, out_ptr, i_row, i_s, S, tiles,
                 HALF: gl.constexpr, QK_SCALE: gl.constexpr, STAGES: gl.constexpr):
    """One consumer warpgroup of _stats_pingpong: query rows HALF * 128 .. of the KV head. Its product of
    tile j waits for its turn (``turn_mine``) and passes the turn on once done, so the two warpgroups'
    products alternate and each one's softmax runs during the other's product (FlashAttention-3's
    ping-pong); the K slot is released (``empty``, two arrivals) as soon as the product is done."""
    QH: gl.constexpr = q_half.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    rows: gl.constexpr = gl.SliceLayout(1, mma)
    zero = gl.zeros([QH, BLOCK_N], gl.float32, layout=mma)
    m = gl.full([QH], float("-inf"), gl.float32, layout=rows)
    l = gl.zeros([QH], gl.float32, layout=rows)
    for j in range(tiles):
        slot = j % STAGES
        mbarrier.wait(ready.index(slot), phase=(j // STAGES) & 1)
        mbarrier.wait(turn_mine, phase=j & 1)
        s = warpgroup_mma(q_half, k_smem.index(slot).permute((1, 0)), zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        mbarrier.arrive(turn_other, count=1)
        mbarrier.arrive(empty.index(slot), count=1)
        t_m = gl.max(s, 1) * QK_SCALE
        m_new = gl.maximum(m, t_m)
        l = l * gl.exp2(m - m_new) + gl.sum(gl.exp2(s * QK_SCALE - gl.expand_dims(m_new, 1)), 1)
        m = m_new
    o_q = gl.arange(0, QH, layout=rows)
    p_out = out_ptr + (i_row * S + i_s) * 4 * QH + HALF * QH
    gl.store(p_out + o_q, m)
    gl.store(p_out + 2 * QH + o_q, l)


@gluon.jit
def _pp_producer(k_desc, k_smem, ready, empty, row0, tiles, STAGES: gl.constexpr):
    """The producer warp: K tile j into slot j % STAGES once both warpgroups released its last tile."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    for j in range(tiles):
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), phase=((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
        mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row0 + j * BLOCK_N, 0], ready.index(slot), k_smem.index(slot))


@gluon.jit
def _stats_pingpong(q_desc, k_desc, out_ptr, N, S, tiles_per_prog,
                    QK_SCALE: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """_stats_gluon's statistics with warp specialization written out (Gluon, sm_90; num_warps = 4): the
    kernel's warps are the first consumer warpgroup, a second one and a producer warp run beside them
    (Triton pads the kernel to 12 warps); q_desc's blocks are half the head's 256 query rows."""
    QH: gl.constexpr = q_desc.block_type.shape[0]
    i_s = gl.program_id(0)
    i_row = gl.program_id(1)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    mbarrier.init(q_bar, count=1)
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [i_row * 2 * QH, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [i_row * 2 * QH + QH, 0], q_bar, q_smem.index(1))
    mbarrier.wait(q_bar, phase=0)
    mbarrier.arrive(turn.index(0), count=1)   # the first warpgroup takes the first tile's product
    row0 = i_row * N + i_s * tiles_per_prog * k_desc.block_type.shape[0]
    gl.warp_specialize([
        (_pp_consumer, (q_smem.index(0), k_smem, ready, empty, turn.index(0), turn.index(1), out_ptr, i_row, i_s, S,
                        tiles_per_prog, 0, QK_SCALE, STAGES)),
        (_pp_consumer, (q_smem.index(1), k_smem, ready, empty, turn.index(1), turn.index(0), out_ptr, i_row, i_s, S,
                        tiles_per_prog, 1, QK_SCALE, STAGES)),
        (_pp_producer, (k_desc, k_smem, ready, empty, row0, tiles_per_prog, STAGES)),
    ], [4, 1], [232, 40])


def gluon_descriptors(q, k, block_n: int):
    """Gluon TMA descriptors of q [rows, QR, D] (blocks of all QR rows) and k [rows, N, D] (blocks of
    ``block_n`` keys), each as a 2-D tensor."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    d = k.shape[-1]
    q2, k2 = q.reshape(-1, d), k.reshape(-1, d)
    dtype = gl.bfloat16 if k.dtype == torch.bfloat16 else gl.float16
    blocks = ([q.shape[1], d], [block_n, d])
    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), b, gl.NVMMASharedLayout.get_default_for(b, dtype))
                 for t, b in zip((q2, k2), blocks))


def config(variant: str):
    """(MODE, WS, QB, num_warps) of a variant (MODE 3: _stats_gluon, 4: _stats_pingpong)."""
    return {"ptr": (0, False, 256, 8), "desc": (1, False, 256, 8), "ws256": (1, True, 256, 4),
            "ws128": (1, True, 128, 4), "rot": (2, False, 256, 8), "half": (0, False, 128, 4),
            "w16": (0, False, 256, 16), "gluon": (3, False, 256, 8), "gluon32": (3, False, 256, 8),
            "pingpong": (4, False, 256, 4)}[variant]


def make_inputs(rows: int, n: int, d: int, device, qr: int = 256, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(rows, qr, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(rows, n, d, generator=g).to(device=device, dtype=dtype)
    return q, k


def launch_args(variant: str, q, k, splits: int, block_n: int = 64, stages=None):
    """(kernel launcher, out) of one variant over q [rows, QR, D], k [rows, N, D]."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    mode, ws, qb, warps = config(variant)
    if variant == "gluon32":
        block_n = 32
    rows, n, d = k.shape
    tiles = n // block_n
    assert n % block_n == 0 and tiles % splits == 0, "whole tiles, equal splits"
    chunks = q.shape[1] // qb
    out = torch.empty(rows, chunks, splits, 2, qb, device=k.device, dtype=torch.float32)
    qk_scale = LOG2E / math.sqrt(d)
    if mode == 4:
        qd, kd = gluon_descriptors(q.reshape(rows * 2, qb // 2, d), k, block_n)

        def run():
            _stats_pingpong[(splits, rows)](qd, kd, out, n, splits, tiles // splits, QK_SCALE=qk_scale,
                                            STAGES=stages or 3, num_warps=warps)
        return run, out
    if mode == 3:
        qd, kd = gluon_descriptors(q, k, block_n)

        def run():
            _stats_gluon[(splits, rows)](qd, kd, out, n, splits, tiles // splits, QK_SCALE=qk_scale,
                                         STAGES=stages or 3, num_warps=warps)
        return run, out
    desc = TensorDescriptor.from_tensor(k.view(rows * n, d), [block_n, d]) if mode == 1 else k
    q_desc = TensorDescriptor.from_tensor(q.reshape(-1, d), [qb, d]) if mode == 1 else q

    def run():
        _stats_probe[(splits, rows, chunks)](q, q_desc, k, desc, out, n, splits, tiles // splits, D=d, QB=qb,
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


def library_us(kernel: str, n: int, batch: int, replays: int, bandwidth: float) -> float:
    """The time of the generated SnapKV kernel ``kernel`` (its first launch of that name) in its evict
    call at 10% (perf/launches.py)."""
    from perf.launches import breakdown
    steps = breakdown("snapkv", n, batch, 0.1, replays, bandwidth)["launches"]
    return next(step["us"] for step in steps if step["kernel"] == kernel)


def gpu_case(args, kernel: str, splits: int = 0):
    """(q, k, splits, k_us, results) of a probe's GPU run: the inputs at args.n, args.batch, args.heads
    (256 query rows a KV head, D = 128, bf16), the programs per row (``splits``, else about 512 over all
    rows; made to divide the 64-key tiles: 64 at 8 rows, as the library), K's read time at the copy bandwidth, and the
    results so far (the library's ``kernel`` unless --no-library); prints their header."""
    from perf.floor import copy_bandwidth
    rows = args.batch * args.heads
    q, k = make_inputs(rows, args.n, 128, torch.device("cuda"))
    tiles = args.n // 64
    splits = splits or max(1, 512 // rows)
    while tiles % splits:
        splits -= 1
    bandwidth = copy_bandwidth()
    k_us = k.numel() * k.element_size() / bandwidth * 1e6
    results = dict(n=args.n, batch=args.batch, rows=rows, splits=splits, k_read_us=k_us,
                   device=torch.cuda.get_device_name(), variants={})
    try:
        if not args.no_library:
            results["library_us"] = library_us(kernel, args.n, args.batch, args.replays, bandwidth)
    except Exception as e:   # the probe's own variants still count
        results["library_error"] = repr(e)
    print(f"K read at copy bandwidth {k_us:.1f} us; library {kernel} {results.get('library_us', float('nan')):.1f} us")
    return q, k, splits, k_us, results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--splits", type=int, default=0, help="programs per row (0: 64 at 8 rows, as the library)")
    ap.add_argument("--stages", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if not config(v)[1]),
                    help="comma-separated (default: all but the warp-specialized ones, which hung on an H100)")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--no-library", action="store_true", help="skip timing the library's own statistics kernel")
    ap.add_argument("--json")
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if args.compile:
        return compile_all(variants, args.stages)
    if args.toy:
        return toy(variants)
    q, k, splits, k_us, results = gpu_case(args, "stats_0", args.splits)
    ref = reference_lse(q[:1], k[:1])
    for variant in variants:
        for stages in args.stages:
            time_variant(results, f"{variant}/s{stages}",
                         lambda: launch_args(variant, q, k, splits, stages=stages),
                         lambda out: (merged(out)[:1] - ref).abs().max().item(), "lse_err", k_us, args.replays)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def time_variant(results: dict, name: str, make, error_of, error_name: str, k_us: float, replays: int):
    """One variant on the GPU: ``make()`` gives (launcher, output); one launch checked by ``error_of(output)``,
    then graph replays timed; recorded in ``results["variants"][name]`` and printed. A variant that fails
    (a build or a fault) is recorded as such, so the others still run."""
    from perf.timing import graph_times
    try:
        run, out = make()
        run()
        torch.cuda.synchronize()
        err = error_of(out)
        us = statistics.median(graph_times(run, replays)) * 1e6
    except Exception as e:
        results["variants"][name] = dict(error=repr(e)[:300])
        print(f"{name:14s} failed: {repr(e)[:200]}")
        return
    results["variants"][name] = {"us": us, "x_k_read": us / k_us, error_name: err}
    print(f"{name:14s} {us:8.1f} us  {us / k_us:5.2f}x K read  {error_name} {err:.2e}")


def toy(variants):
    """Each variant at a tiny size against reference_lse: on the CPU (the interpreter, float32: its
    bfloat16 tl.dot is wrong) those without descriptors; on a GPU also desc. Never the warp-specialized
    ones: on an H100 they hung or faulted (run.log of perf/results/ab/proxy-ws-probe-7469e02-H100)."""
    cuda = torch.cuda.is_available()
    q, k = make_inputs(2, 256, 64, "cuda" if cuda else "cpu", qr=256, dtype=torch.bfloat16 if cuda else torch.float32)
    ref = reference_lse(q, k)
    for variant in variants:
        mode, ws = config(variant)[:2]
        if ws or (mode == 1 and not cuda) or mode >= 3:   # Gluon has no interpreter; on a GPU the timed run checks it
            continue
        run, out = launch_args(variant, q, k, 2, stages=2)
        run()
        err = (merged(out) - ref).abs().max().item()
        print(f"{variant}: lse err {err:.2e}")
        assert err < 1e-3, variant


def compile_gluon(variant: str, stages: int, rows: int = 8, n: int = 131072):
    """The Gluon kernel built for sm_90 as its launch would build it (meta tensors through Triton's
    binder, tritonkv.aot.specialized, then Gluon's own front end)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from tritonkv.aot import HOPPER, specialized
    mode, _, qb, warps = config(variant)
    block_n = 32 if variant == "gluon32" else 64
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, k = torch.empty(rows, qb, 128, **meta), torch.empty(rows, n, 128, **meta)
    out = torch.empty(rows, 64, 2, qb, device="meta", dtype=torch.float32)
    kernel = _stats_pingpong if mode == 4 else _stats_gluon
    if mode == 4:
        q = q.reshape(rows * 2, qb // 2, 128)
    src, options = specialized(kernel, [*gluon_descriptors(q, k, block_n), out, n, 64, n // block_n // 64],
                               dict(QK_SCALE=LOG2E / math.sqrt(128), STAGES=stages), warps)
    return triton.compile(GluonASTSource(src.fn, src.signature, src.constants, src.attrs), target=HOPPER,
                          options=options)


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
                   "out_ptr": "*fp32", "N": "i32", "S": "i32", "tiles_per_prog": "i32",
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
                if mode >= 3:
                    c = compile_gluon(variant, stages)
                else:
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
