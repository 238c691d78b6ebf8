"""Can KeyDiff's second read of K come from L2? A probe for issue 20's item 2, not the library.

KeyDiff scores a token by the cosine of its key to the row's anchor (the mean of the row's
normalized keys), so it reads K twice: once for the anchor, once for the cosines. Between
the two passes of one row sit the other rows' first passes, so at N = 128K (a row of K is
33.5 MB at D = 128, bf16; H100's L2 is 50 MB) the second read comes from HBM.

Three ways to compute the same scores, timed as CUDA-graph replays, L2 flushed before each:
  - two launches: pass 1 for every row (anchor partials per split), then pass 2 (each program
    merges its row's partials, then scores its split): what the compiled kernels do now;
  - persistent: one program per SM walks the rows in order; for each row it runs pass 1 on its
    split, adds its partial, waits at a per-row counter until every program has done so (all
    programs are resident: one per SM), then scores its split, most recently read tiles first;
    the row's keys were read by every SM an instant before, so pass 2 should hit L2;
  - rows in turn: for each group of rows whose keys fit in 40 MB (one row at 128K), a pass-1
    launch over the group with 4 programs per SM, then a pass-2 launch over the same group, so
    pass 2 re-reads what pass 1 read an instant before, with the whole GPU on it (the persistent
    schedule has one program per SM, too few loads in flight to stream from HBM); each pass-2
    program sums its row's 4 x SMs partials itself (~270 KB of L2 reads a program at D = 128);
  - rows in turn, merged: the same with a launch of one program per row between the passes that
    merges the partials into the row's anchor, which pass 2 then loads (3 launches a group);
  - one pass: pass 1 alone (reads K once), the floor of any schedule.
Prints ms and the ratios, and checks that the persistent schedule gives the two launches' scores
bit for bit (the partials are merged in the same order) and rows in turn within 1e-5 (other splits).

    python perf/l2_probe.py --n 32768 131072 524288 --batch 1 4
    python perf/l2_probe.py --toy      # CPU: checks the two-launch path in the interpreter
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.timing import CUDA, DEVICE, graph_seconds  # noqa: E402
from tritonkv.kernels.common import multiprocessor_count  # noqa: E402


@triton.jit
def _anchor_part(k_ptr, row, split, N, TILES, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum of the normalized keys of one split's TILES tiles of one row, float32 [D]."""
    o_d = tl.arange(0, D)
    acc = tl.zeros([D], tl.float32)
    base = k_ptr + row.to(tl.int64) * N * D
    for t in range(0, TILES):
        o_n = (split * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(base + o_n.to(tl.int64)[:, None] * D + o_d[None, :], mask=(o_n < N)[:, None], other=0.0)
        k = k.to(tl.float32)
        norm = tl.sqrt(tl.sum(k * k, 1))
        acc += tl.sum(k * tl.where(norm > 0, 1.0 / norm, 0.0)[:, None], 0)
    return acc


@triton.jit
def _anchor_of(part_ptr, row, S, D: tl.constexpr):
    """The unit anchor of a row from its S partials, summed in split order."""
    o_d = tl.arange(0, D)
    a = tl.zeros([D], tl.float32)
    for s in range(0, S):
        a += tl.load(part_ptr + (row * S + s).to(tl.int64) * D + o_d)
    return a / tl.sqrt(tl.sum(a * a, 0))


@triton.jit
def _score_split(k_ptr, a, out_ptr, row, split, N, TILES, D: tl.constexpr, BLOCK_N: tl.constexpr,
                 REVERSE: tl.constexpr):
    """The cosines of a split's keys to the row's unit anchor ``a``."""
    o_d = tl.arange(0, D)
    base = k_ptr + row.to(tl.int64) * N * D
    for i in range(0, TILES):
        t = TILES - 1 - i if REVERSE else i
        o_n = (split * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = o_n < N
        k = tl.load(base + o_n.to(tl.int64)[:, None] * D + o_d[None, :], mask=m[:, None], other=0.0)
        k = k.to(tl.float32)
        norm = tl.sqrt(tl.sum(k * k, 1))
        cos = tl.sum(k * a[None, :], 1) * tl.where(norm > 0, 1.0 / norm, 0.0)
        tl.store(out_ptr + row.to(tl.int64) * N + o_n, -cos, mask=m)


@triton.jit
def _pass1_kernel(k_ptr, part_ptr, N, S, TILES, ROW0, D: tl.constexpr, BLOCK_N: tl.constexpr):
    split, row = tl.program_id(0), ROW0 + tl.program_id(1)
    tl.store(part_ptr + (row * S + split).to(tl.int64) * D + tl.arange(0, D),
             _anchor_part(k_ptr, row, split, N, TILES, D, BLOCK_N))


@triton.jit
def _pass2_kernel(k_ptr, part_ptr, out_ptr, N, S, TILES, ROW0, D: tl.constexpr, BLOCK_N: tl.constexpr):
    split, row = tl.program_id(0), ROW0 + tl.program_id(1)
    _score_split(k_ptr, _anchor_of(part_ptr, row, S, D), out_ptr, row, split, N, TILES, D, BLOCK_N, False)


@triton.jit
def _merge_kernel(part_ptr, anchor_ptr, S, ROW0, D: tl.constexpr):
    row = ROW0 + tl.program_id(0)
    tl.store(anchor_ptr + row.to(tl.int64) * D + tl.arange(0, D), _anchor_of(part_ptr, row, S, D))


@triton.jit
def _pass2_merged_kernel(k_ptr, anchor_ptr, out_ptr, N, TILES, ROW0, D: tl.constexpr, BLOCK_N: tl.constexpr):
    split, row = tl.program_id(0), ROW0 + tl.program_id(1)
    a = tl.load(anchor_ptr + row.to(tl.int64) * D + tl.arange(0, D))
    _score_split(k_ptr, a, out_ptr, row, split, N, TILES, D, BLOCK_N, False)


@triton.jit
def _persistent_kernel(k_ptr, part_ptr, count_ptr, out_ptr, N, ROWS, S, TILES, D: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    split = tl.program_id(0)   # S programs, all resident: one per SM
    for row in range(0, ROWS):
        tl.store(part_ptr + (row * S + split).to(tl.int64) * D + tl.arange(0, D),
                 _anchor_part(k_ptr, row, split, N, TILES, D, BLOCK_N))
        tl.atomic_add(count_ptr + row, 1, sem="release", scope="gpu")
        while tl.atomic_add(count_ptr + row, 0, sem="acquire", scope="gpu") < S:
            pass
        _score_split(k_ptr, _anchor_of(part_ptr, row, S, D), out_ptr, row, split, N, TILES, D, BLOCK_N, True)


def geometry(n, programs, block_n):
    tiles = triton.cdiv(n, block_n)
    return triton.cdiv(tiles, programs)   # tiles per split


def two_launches(keys, splits, block_n, warps):
    """Pass 1 over every row, then pass 2 over every row: ``splits`` programs per row."""
    b, h = keys.shape[:2]
    return rows_in_turn(keys, splits * b * h, block_n, warps, group_bytes=None)


def rows_in_turn(keys, programs, block_n, warps, group_bytes=40e6, merged=False):
    """Pass 1 then pass 2 over each group of rows whose keys fit in ``group_bytes`` (None: all
    rows in one group), ``programs`` programs per group (at least one row a group). ``merged``:
    a launch of one program per row merges the row's partials into its anchor between the two
    (else every pass-2 program sums all of its row's partials itself)."""
    b, h, n, d = keys.shape
    rows = b * h
    group = rows if group_bytes is None else max(1, min(rows, int(group_bytes // (n * d * keys.element_size()))))
    splits = max(1, programs // group)
    tiles = geometry(n, splits, block_n)
    part = torch.empty(rows * splits, d, dtype=torch.float32, device=keys.device)
    out = torch.empty(rows, n, dtype=torch.float32, device=keys.device)
    anchor = torch.empty(rows, d, dtype=torch.float32, device=keys.device)

    def run():
        for row0 in range(0, rows, group):
            g = min(group, rows - row0)
            _pass1_kernel[(splits, g)](keys, part, n, splits, tiles, row0, D=d, BLOCK_N=block_n, num_warps=warps)
            if merged:
                _merge_kernel[(g,)](part, anchor, splits, row0, D=d)
                _pass2_merged_kernel[(splits, g)](keys, anchor, out, n, tiles, row0, D=d, BLOCK_N=block_n,
                                                  num_warps=warps)
                continue
            _pass2_kernel[(splits, g)](keys, part, out, n, splits, tiles, row0, D=d, BLOCK_N=block_n,
                                       num_warps=warps)
        return out
    return run


def one_pass(keys, splits, block_n, warps):
    b, h, n, d = keys.shape
    tiles = geometry(n, splits, block_n)
    part = torch.empty(b * h * splits, d, dtype=torch.float32, device=keys.device)
    return lambda: _pass1_kernel[(splits, b * h)](keys, part, n, splits, tiles, 0, D=d, BLOCK_N=block_n,
                                                  num_warps=warps)


def persistent(keys, block_n, warps, per_sm=1):
    b, h, n, d = keys.shape
    rows, programs = b * h, per_sm * multiprocessor_count(keys.device)
    tiles = geometry(n, programs, block_n)
    part = torch.empty(rows * programs, d, dtype=torch.float32, device=keys.device)
    count = torch.zeros(rows, dtype=torch.int32, device=keys.device)
    out = torch.empty(rows, n, dtype=torch.float32, device=keys.device)

    def run():
        count.zero_()
        _persistent_kernel[(programs,)](keys, part, count, out, n, rows, programs, tiles, D=d, BLOCK_N=block_n,
                                        num_warps=warps)
        return out
    return run


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, nargs="+", default=[32768, 131072, 524288])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--per-sm", type=int, default=1, help="persistent programs per SM (all must be resident)")
    parser.add_argument("--toy", action="store_true")
    args = parser.parse_args(argv)
    if args.toy:
        args.n, args.batch, args.heads, args.block = [300], [1], 2, [64]
    print(f"{torch.cuda.get_device_name() if CUDA else 'cpu'}: KeyDiff-like scores, ms (graph replay, L2 flushed)")
    for n in args.n:
        for b in args.batch:
            keys = torch.randn(b, args.heads, n, args.dim, device=DEVICE).bfloat16()
            gb = keys.numel() * keys.element_size() / 1e9
            for block_n in args.block:
                splits = multiprocessor_count(keys.device) if CUDA else 3
                two = two_launches(keys, splits, block_n, args.warps)
                want = two().clone()
                row = f"N={n:>7} B={b} K={gb:.2f} GB BLOCK_N={block_n}:"
                turns = rows_in_turn(keys, 4 * splits if CUDA else 3, block_n, args.warps,
                                     group_bytes=40e6 if CUDA else 1)   # CPU: a launch pair per row
                close = torch.allclose(turns(), want, rtol=1e-5, atol=1e-5)
                merged = rows_in_turn(keys, 4 * splits if CUDA else 3, block_n, args.warps,
                                      group_bytes=40e6 if CUDA else 1, merged=True)
                close = close and torch.allclose(merged(), want, rtol=1e-5, atol=1e-5)
                if not CUDA:   # the persistent kernel spins on other programs: the interpreter runs one at a time
                    print(row, "two launches ran (scores", tuple(want.shape), "), rows in turn close:", close)
                    continue
                first = persistent(keys, block_n, args.warps, args.per_sm)
                got = first()
                torch.cuda.synchronize()
                same = torch.equal(got, want)
                t_two, t_one, t_per, t_turn, t_merged = (
                    graph_seconds(fn, 20) * 1e3 for fn in
                    (two, one_pass(keys, splits, block_n, args.warps), first, turns, merged))
                print(f"{row} one pass {t_one:.3f}  two launches {t_two:.3f} ({t_two / t_one:.2f}x)  "
                      f"persistent {t_per:.3f} ({t_per / t_one:.2f}x)  rows in turn {t_turn:.3f} "
                      f"({t_turn / t_one:.2f}x)  merged {t_merged:.3f} ({t_merged / t_one:.2f}x)  same scores: {same}, rows in turn close: {close}", flush=True)


if __name__ == "__main__":
    main()
