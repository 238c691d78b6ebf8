"""The proxy attention's score pass on Hopper, as perf/proxy_ws_probe.py does for its statistics pass:
the library's SnapKV score kernel beside standalone copies of its main loop, one process, as ratios.
Each variant computes, for every key of a row, the sum of its probabilities 2^(s - lse) over the 256
proxy query rows of its KV head (s = k.q * log2(e) / sqrt(D), the transposed [keys, queries] product of
kernels/proxy.py's _logits_t; the library then also reduces by window and head and pools):

    ptr      Triton, pointer loads software-pipelined, 8 warps (the generated kernel's loop)
    halo     ptr with the library's tiling for a pooled score: tiles of 64 keys overlapping by 2 x 2
             (the pooling's halo: 60 new keys a tile), masked loads and stores
    tile     ptr's whole tiles through the library's own tile function (kernels/proxy.py's
             proxy_attention_tile: window and group reductions, NaN-propagating clamp, SnapKV's
             exclusion of the window), pooling off
    lib      halo + tile with SnapKV's pooling (kernel 5, average): the generated score kernel's work
    gluon    Gluon: K tiles through a TMA ring, tile i + 1's wgmma in flight during tile i's
             exponentials and sums (8 warps: two warpgroups split the 256 queries)

    python perf/proxy_score_probe.py --n 131072 --batch 1 --json OUT.json
    python perf/proxy_score_probe.py --compile   # sm_90 builds, no GPU
    python perf/proxy_score_probe.py --toy       # CPU interpreter: the Triton variant against torch
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tritonkv.kernels.proxy import proxy_attention_tile  # noqa: E402
from perf.proxy_ws_probe import (LOG2E, gpu_case, gluon_descriptors, make_inputs, reference_lse,  # noqa: E402
                                 ring_end, ring_start, ring_step, time_variant)

VARIANTS = ("ptr", "halo", "tile", "lib", "gluon")
MODES = {"ptr": 0, "halo": 1, "tile": 2, "lib": 3}   # _score_probe's MODE
WINDOW = 64   # proxy query rows per query head (QR = 4 heads x 64)


@triton.jit
def _score_probe(q_ptr, k_ptr, lse_ptr, out_ptr, N, tiles_per_prog,
                 D: tl.constexpr, QR: tl.constexpr, BLOCK_N: tl.constexpr, QK_SCALE: tl.constexpr,
                 STAGES: tl.constexpr, MODE: tl.constexpr, W: tl.constexpr):
    """Program (split, row): MODE 0 / 1 (ptr / halo): score[row, n] = sum over the row's QR query rows
    of 2^(s - lse); MODE 2 / 3 (tile / lib): SnapKV's score of the key (window rows W a query head)."""
    HALO: tl.constexpr = 2 if MODE % 2 == 1 else 0
    i_s = tl.program_id(0)
    i_row = tl.program_id(1)
    o_q = tl.arange(0, QR)
    o_d = tl.arange(0, D)
    o_t = tl.arange(0, BLOCK_N)
    b_q = tl.load(q_ptr + (i_row * QR + o_q)[:, None] * D + o_d[None, :])
    b_lse = tl.load(lse_ptr + i_row * QR + o_q)
    k_row = k_ptr + i_row.to(tl.int64) * N * D
    for it in tl.range(0, tiles_per_prog, num_stages=STAGES):
        o_n = (i_s * tiles_per_prog + it) * (BLOCK_N - 2 * HALO) - HALO + o_t
        m_n = (o_n >= 0) & (o_n < N)
        if HALO > 0:
            b_k = tl.load(k_row + o_n[:, None] * D + o_d[None, :], mask=m_n[:, None], other=0.0)
        else:
            b_k = tl.load(k_row + o_n[:, None] * D + o_d[None, :])
        if MODE >= 2:
            x = proxy_attention_tile(b_k, b_q, o_q % W, b_lse, q_ptr, 0, 0, 0, 0, lse_ptr, out_ptr, N, i_s * 0, i_s * 0, N,
                                     W, W, o_t, o_n, m_n, D, D, BLOCK_N, QR // W, W, QR, QR, True, 0,
                                     5 if HALO > 0 else 1, False, 0, True, QK_SCALE, False, False, True)
        else:
            s = tl.dot(b_k, tl.trans(b_q)) * QK_SCALE
            x = tl.sum(tl.exp2(tl.minimum(s - b_lse[None, :], 0.0)), 1)
        if HALO > 0:
            tl.store(out_ptr + i_row.to(tl.int64) * N + o_n, x, mask=(o_t >= HALO) & (o_t < BLOCK_N - HALO) & m_n)
        else:
            tl.store(out_ptr + i_row.to(tl.int64) * N + o_n, x)


@gluon.jit
def _score_gluon(q_desc, k_desc, lse_ptr, out_ptr, N, tiles_per_prog,
                 QK_SCALE: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """_score_probe's loop scheduled by hand: Q (all QR rows) once and K tiles in a ring of STAGES slots
    through TMA, each awaited on its mbarrier; tile j + 1's product [BLOCK_N, QR] issued before tile j's
    exponentials and row sums, awaited after them (perf/proxy_ws_probe.py's _stats_gluon, transposed)."""
    QR: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    i_s = gl.program_id(0)
    i_row = gl.program_id(1)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, num_warps // 4],
                                                 instr_shape=[16, QR // (num_warps // 4), 16])
    keys: gl.constexpr = gl.SliceLayout(1, mma)
    queries: gl.constexpr = gl.SliceLayout(0, mma)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    t0 = i_s * tiles_per_prog
    row0 = i_row * N + t0 * BLOCK_N
    ring_start(q_desc, i_row * QR, q_smem, q_bar, k_desc, row0, k_smem, k_bar, tiles_per_prog, STAGES)
    lse = gl.expand_dims(gl.load(lse_ptr + i_row * QR + gl.arange(0, QR, layout=queries)), 0)
    o_t = gl.arange(0, BLOCK_N, layout=keys)
    p_out = out_ptr + i_row.to(gl.int64) * N + t0 * BLOCK_N
    zero = gl.zeros([BLOCK_N, QR], gl.float32, layout=mma)
    q_t = q_smem.permute((1, 0))
    s = warpgroup_mma(k_smem.index(0), q_t, zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    for j in range(tiles_per_prog - 1):
        ring_step(k_desc, row0, k_smem, k_bar, j, tiles_per_prog, STAGES)
        s_next = warpgroup_mma(k_smem.index((j + 1) % STAGES), q_t, zero, use_acc=False, is_async=True)
        p = gl.exp2(gl.minimum(s * QK_SCALE - lse, 0.0))
        gl.store(p_out + j * BLOCK_N + o_t, gl.sum(p, 1))
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_next, ))
    p = gl.exp2(gl.minimum(s * QK_SCALE - lse, 0.0))
    gl.store(p_out + (tiles_per_prog - 1) * BLOCK_N + o_t, gl.sum(p, 1))
    ring_end(q_bar, k_bar, STAGES)


def reference_scores(q, k, lse, variant: str = "ptr"):
    """What ``variant`` computes: ptr / halo / gluon the sum of the QR rows' probabilities per key; tile / lib
    SnapKV's score (mean over each head's W window rows and over the heads, lib also average-pooled over 5 keys
    with zero padding; the window's own keys, the last W, score 0 and pad the pooling)."""
    s = torch.einsum("rqd,rnd->rnq", q.float(), k.float()) * (LOG2E / math.sqrt(q.shape[-1]))
    p = torch.exp2(torch.clamp(s - lse[:, None, :], max=0.0))
    if variant not in ("tile", "lib"):
        return p.sum(-1)
    rows, n, qr = p.shape
    x = p.reshape(rows, n, qr // WINDOW, WINDOW).mean(-1).mean(-1)
    x[:, n - WINDOW:] = 0
    if variant == "lib":
        x = torch.nn.functional.avg_pool1d(x[:, None], 5, 1, 2)[:, 0]
        x[:, n - WINDOW:] = 0
    return x


def launch(variant: str, q, k, lse, splits: int, block_n: int = 64, stages: int = 3):
    """(launcher, out [rows, N]) of one variant over q [rows, QR, D], k [rows, N, D], lse [rows, QR]."""
    rows, n, d = k.shape
    out = torch.empty(rows, n, device=k.device, dtype=torch.float32)
    qk_scale = LOG2E / math.sqrt(d)
    if variant == "gluon":
        tiles = n // block_n
        assert n % block_n == 0 and tiles % splits == 0, "whole tiles, equal splits"
        qd, kd = gluon_descriptors(q, k, block_n)

        def run():
            _score_gluon[(splits, rows)](qd, kd, lse, out, n, tiles // splits, QK_SCALE=qk_scale, STAGES=stages,
                                        num_warps=8)
        return run, out
    mode = MODES[variant]
    step = block_n - 4 if mode % 2 else block_n   # the halo modes' tiles overlap by 4 keys
    assert mode % 2 or n % (block_n * splits) == 0, "whole tiles, equal splits"
    tiles_per_prog = triton.cdiv(triton.cdiv(n, step), splits)

    def run():
        _score_probe[(splits, rows)](q, k, lse, out, n, tiles_per_prog, D=d, QR=q.shape[1], BLOCK_N=block_n,
                                     QK_SCALE=qk_scale, STAGES=stages, MODE=mode, W=WINDOW, num_warps=8)
    return run, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--no-library", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    if args.compile:
        return compile_all()
    if args.toy:
        return toy()
    q, k, splits, k_us, results = gpu_case(args, "score")
    lse = reference_lse(q, k)
    for variant in args.variants.split(","):
        ref = reference_scores(q[:1], k[:1], lse[:1], variant)
        time_variant(results, variant, lambda: launch(variant, q, k, lse, splits, stages=args.stages),
                     lambda out: ((out[:1] - ref).abs() / ref.abs().clamp_min(1e-6)).max().item(), "rel_err", k_us,
                     args.replays)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def toy():
    """The Triton variants at a tiny size against reference_scores (float32 on the CPU: the interpreter's
    bfloat16 tl.dot is wrong); the Gluon one runs only on a GPU."""
    cuda = torch.cuda.is_available()
    q, k = make_inputs(2, 256, 64, "cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
    lse = reference_lse(q, k)
    for variant in VARIANTS if cuda else tuple(MODES):
        run, out = launch(variant, q, k, lse, 2, block_n=64 if cuda else 16)
        run()
        err = ((out - reference_scores(q, k, lse, variant)).abs() / 256).max().item()
        print(f"{variant}: err {err:.2e}")
        assert err < 1e-4, variant


def compile_all():
    """Every variant built for sm_90 (no GPU): registers, shared memory, wgmma and waits."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from tritonkv import cubin
    from tritonkv.aot import HOPPER, specialized
    meta = dict(device="meta", dtype=torch.bfloat16)
    rows, n = 8, 131072
    q, k = torch.empty(rows, 256, 128, **meta), torch.empty(rows, n, 128, **meta)
    lse = torch.empty(rows, 256, device="meta", dtype=torch.float32)
    out = torch.empty(rows, n, device="meta", dtype=torch.float32)
    scale = LOG2E / math.sqrt(128)
    for variant in VARIANTS:
        if variant == "gluon":
            src, options = specialized(_score_gluon, [*gluon_descriptors(q, k, 64), lse, out, n, 32],
                                       dict(QK_SCALE=scale, STAGES=3), 8)
            src = GluonASTSource(src.fn, src.signature, src.constants, src.attrs)
        else:
            src, options = specialized(_score_probe, [q, k, lse, out, n, 32],
                                       dict(D=128, QR=256, BLOCK_N=64, QK_SCALE=scale, STAGES=3,
                                            MODE=MODES[variant], W=WINDOW), 8)
        c = triton.compile(src, target=HOPPER, options=options)
        ptx = c.asm["ptx"]
        regs = max(cubin.registers(c.asm["cubin"]).values(), default=0)
        print(f"{variant}: {regs} registers, {c.metadata.shared} B shared, {ptx.count('wgmma.mma_async')} wgmma, "
              f"{ptx.count('wgmma.wait_group')} waits, {ptx.count('ex2.approx')} ex2")


if __name__ == "__main__":
    main()
