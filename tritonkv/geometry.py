"""Launch geometry of a policy's generated kernels: tile sizes, programs per row, warps and
the workspace layout, from shapes, strides and dtypes alone (cached per program and shape).

The float32 scratch of the ranking passes, from the workspace pointer the kernels get:
  [0, workspace)            what is read after the score kernel starts: the row statistics
                            (finals) the score kernel reads (a proxy attention pooled after it:
                            its slot's edges next, kernels/pooling.py), the logits a one-query proxy
                            attention keeps from its statistics pass (kernels/proxy.py: G per
                            token and row), the moment partials of slots (kernels/deferred.py,
                            kernels/keys.py);
  [workspace, ...)          the slots ([n_slots, rows, N], written by the score kernel) and,
                            before it, the per-program partials of the statistics passes,
                            dead once their merge has run: they cost no memory of their own
                            unless they outgrow the slots (``ranking_numel``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from . import dsl
from .codegen import Program, qk_scale
from .kernels.common import cdiv, even_tiling, ieee_products, interpreting, multiprocessor_count, next_power_of_2
from .kernels.deferred import deferred_tiling
from .kernels.pooling import edge_floats, pool_segment
from .reference import proxy_window

QUERY_CHUNK = 256  # most proxy query rows per tl.dot


def proxy_tiling(window: int, group: int, d: int, itemsize: int) -> Tuple[int, int]:
    """(W_PAD, QB): window rows padded per query head, and query rows per tl.dot.

    When the whole group's rows fit one 16-row tile (G * next_power_of_2(w) <= 16: TOVA's 4
    query heads of one token), W_PAD is just next_power_of_2(w) and one 16-row chunk holds
    every head (rows past G * W_PAD are padding, masked), so the passes compute 16 rows per
    key tile rather than 16 per head. Otherwise the window is padded to a power of two >= 16
    and a chunk holds whole query heads (a power-of-two divisor of the group) while the query
    block stays within 64 KB (QUERY_CHUNK rows of bf16 at D = 128), so that typical windows
    (G * W <= 256) are one chunk, loaded once per program; a group that needs several chunks has
    one head's window per chunk."""
    if group * next_power_of_2(window) <= 16:
        return next_power_of_2(window), 16
    limit = max(16, min(QUERY_CHUNK, 65536 // (next_power_of_2(d) * itemsize)))
    w_pad = max(16, next_power_of_2(window))
    if w_pad >= limit:
        return w_pad, limit
    if group * w_pad > limit:
        # the group's rows span several chunks (reloaded per tile): one head's window per chunk, which
        # needs no regrouping of the probabilities by head (two heads of 128 rows in a bf16 D = 128 chunk
        # built to 312,320 B of shared memory on sm_90, one to 147,968)
        return w_pad, w_pad
    heads = 1
    pow2_of_group = group & -group
    while heads * 2 <= pow2_of_group and w_pad * heads * 2 <= limit:
        heads *= 2
    return w_pad, w_pad * heads


def block_tokens(d: int, halo: int, has_proxy: bool, itemsize: int = 2, reads_cache: bool = True) -> int:
    """Tokens per tile: a [BLOCK_N, BLOCK_D] float32 block of 32K elements (8 warps; measured
    best for K-reading kernels on an H100, perf/sweep.py), the key block fed to tl.dot within
    16 KB; 1024 when no K / V tile is loaded."""
    block_d = next_power_of_2(d)
    n = max(16, min(256, 32768 // block_d)) if reads_cache else 1024
    if has_proxy:
        n = max(16, min(n, 64, 16384 // (block_d * itemsize)))
    while n <= 4 * halo:
        n *= 2
    return n


def stats_per_sm() -> int:
    """Programs per multiprocessor that a statistics pass's wave is counted in (4: KeyDiff's
    anchor pass fits 4 on an H100, 64 registers; ``TRITONKV_SPLITS_PER_SM`` for tuning)."""
    return _override("TRITONKV_SPLITS_PER_SM", 4)


def stats_splits(rows: int, n_tiles: int, device: torch.device) -> int:
    """Programs per row for a statistics pass: about a wave of 4 per multiprocessor over all rows
    (``TRITONKV_SPLITS_PER_SM`` overrides the 4, for tuning), chosen by ``balanced_splits``
    (``TRITONKV_SPLITS_BALANCE=0``: the plain ceiling of before, for A/B timing)."""
    if interpreting() or device.type != "cuda":
        return min(n_tiles, 3)  # more than one, so partial merging is always exercised
    wave = stats_per_sm() * multiprocessor_count(device)
    if not _override("TRITONKV_SPLITS_BALANCE", 1):
        return max(1, min(n_tiles, cdiv(wave, rows)))
    return balanced_splits(rows, n_tiles, wave)


def balanced_splits(rows: int, n_tiles: int, wave: int) -> int:
    """Programs per row, from ``wave // rows`` to twice ``cdiv(wave, rows)``, that make
    ``waves x tiles per program`` smallest (the fewest programs on a tie), where a wave is
    ``wave`` programs over all rows and a wave begun costs a whole one.

    The plain ceiling ``cdiv(wave, rows)`` can overshoot a wave by a few programs that then run
    as a tail: at B = 4, H_kv = 8 on 132 multiprocessors it gave 17 programs of 121 tiles per
    row (544 programs against 528), where this gives 33 of 63 (two full waves): KeyDiff and
    SnapKV ran 0.84-0.90x their graph time at B = 4 (128K, 512K; 10%, 50%), TOVA and KNorm
    0.999-1.020x (H100, perf/results/ab/balance-ab-abaebe4-H100.json). At B = 1 this keeps the
    ceiling's 64 programs of 32 tiles, one wave; a rule that evened out the busiest
    multiprocessor's tiles instead took 82 and ran KeyDiff 1.03-1.12x slower there."""
    low = max(1, min(n_tiles, wave // rows))
    high = max(low, min(n_tiles, 2 * cdiv(wave, rows)))

    def cost(s: int):
        programs, tiles = even_tiling(n_tiles, s)   # the programs that really run
        return cdiv(rows * programs, wave) * tiles, s

    return min(range(low, high + 1), key=cost)


@dataclass(frozen=True)
class Geometry:
    """Everything about a launch that depends only on shapes, strides and dtypes (cached)."""

    constexprs: Dict
    per_global: Tuple[int, ...]     # po_i, fo_i (and w_i, lo_i) for each global node
    rows: int
    splits: int
    tiles_per_prog: int
    chunks_per_level: Tuple[int, ...]
    workspace: int                  # float32 elements before the slots (a multiple of 4)
    num_warps: int
    num_stages: Optional[int]
    deferred: Tuple[int, ...] = ()  # workspace offset of each deferred slot's moment partials
    deferred_tiling: Tuple[int, int] = (1, 1)   # (programs per row, tiles per program) of those passes
    moments: Tuple[int, ...] = ()   # workspace offset of each Program.moment_slots slot's moment partials
    partials: int = 0               # float32 elements of statistics partials, from ``workspace`` on
    n_tiles: int = 0                # tiles of a dense row (0 where the caller fixed the splits: paged)
    score_tiling: Optional[Tuple[int, int]] = None   # the score kernel's (programs per row, tiles per
    # program) where they differ from the statistics passes' (score_splits); per batch row with score_heads
    score_heads: bool = False       # launch ``score_heads`` (heads reduced in the score kernel), no transform
    score_maxnreg: Optional[int] = None   # the score kernel's register cap (score_register_cap)

    def score_constexprs(self, head_rows: bool = True) -> Dict:
        """The score launch's constexprs: the statistics passes', with a head-reducing score's
        ``ALL_HEAD_ROWS`` off where ``head_rows`` is (a shared selection)."""
        if self.score_heads and not head_rows:
            return {**self.constexprs, "ALL_HEAD_ROWS": False}
        return self.constexprs

    def ranking_numel(self, slots: int) -> int:
        """float32 elements of the ranking scratch with ``slots`` elements of slots."""
        return self.workspace + max(slots, self.partials)

    def clause_moments(self, program: Program) -> Tuple[int, ...]:
        """Per clause, the workspace offset of its slot's moment partials (0 where unused)."""
        where = dict(zip(program.moment_slots, self.moments))
        return tuple(where.get(k.slot, 0) if k.normalized else 0 for k in program.clause_keys)


def _logits_allowed() -> bool:
    """Whether a one-query proxy attention may keep its statistics pass's logits for the score
    pass (``TRITONKV_PROXY_LOGITS=0``: both passes read K, for A/B timing)."""
    return os.environ.get("TRITONKV_PROXY_LOGITS", "1") != "0"


def keeps_logits(node, n: int, w_total: int, group: int, d: int, itemsize: int) -> bool:
    """One query per head, all the group's heads in one chunk: the statistics pass keeps the
    logits and the score pass reads them, not K."""
    w = proxy_window(node, n, w_total)
    w_pad, qb = proxy_tiling(w, group, d, itemsize)
    return w == 1 and w_pad == 1 and max(group * w_pad, qb) == qb and _logits_allowed()


def score_splits(rows: int, n_tiles: int, device: torch.device) -> int:
    """Programs per row for a score kernel that reads no K or V (only kept logits and row
    statistics: TOVA): a few bytes per token and head each, so it needs many programs in flight
    to hide its loads' latency. 16 per multiprocessor over all rows (two waves of 8 programs of
    8 warps; ``TRITONKV_SCORE_PROGRAMS_PER_SM`` overrides it, 0 keeps the statistics passes'
    programs); 5 off the GPU, so that tests run a count other than the statistics passes' 3."""
    if interpreting() or device.type != "cuda":
        return min(n_tiles, 5)
    per_sm = _override("TRITONKV_SCORE_PROGRAMS_PER_SM", 16)
    return max(1, min(n_tiles, cdiv(per_sm * multiprocessor_count(device), rows))) if per_sm else 0


def score_waves(rows: int, n_tiles: int, per_sm: int, sms: int) -> Tuple[int, int]:
    """(programs per row, tiles per program) of a score kernel that reads the cache, in whole
    waves of its own occupancy (``per_sm`` programs per multiprocessor, learnt from its first
    launch), as ``balanced_splits`` gives the statistics passes theirs. The score kernel stores
    each token's values alone, so its split changes no value. KeyDiff's cosine pass fits 6
    programs per SM where its anchor pass fits 4 (Nsight Compute, H100): with the anchor pass's
    33 programs per row at B = 4 it ran 1.33 of its waves, 432.5 us against 389.1 with 17."""
    return even_tiling(n_tiles, balanced_splits(rows, n_tiles, per_sm * sms))


def _score_reads_cache(program: Program, constexprs: Dict) -> bool:
    """Whether the score kernel loads K or V tiles: every proxy attention in a slot keeps its
    logits (LG) and no other node reads the cache, or not."""
    for slot in program.slots:
        for node in dsl.walk(slot.stored):
            if isinstance(node, dsl.ProxyAttention):
                if not constexprs.get(f"LG_{program.globals.index(node)}", False):
                    return True
            elif isinstance(node, (dsl.AnchorSimilarity, dsl.KeyNorm, dsl.KeyDot, dsl.ValueNorm)):
                return True
    return False


def loop_stages(has_proxy: bool, tile_bytes: int, anchor: bool = False) -> Optional[int]:
    """Software-pipelining depth of the generated kernels' tile loops (``tl.range(...,
    num_stages=STAGES)``); None: Triton's default, which pipelines a loop's loads through shared
    memory (cp.async) only where they feed tl.dot (a proxy attention's passes, at the kernel's
    num_stages). The loops of the other K-reading passes (KeyDiff's anchor and cosines, norms,
    key_dot) load K with no dot, so each load waits for HBM and only occupancy hides that.
    A program with a key-anchor similarity pipelines them 2 deep: its tiles are capped at 8K
    floats (64 tokens at D = 128), and with the next tile in flight KeyDiff took 0.851-0.942x its
    graph time (3 deep: 0.840-0.927x; H200, perf/results/ab/loop-stages-ab-2edf25f-H200.log).
    KNorm's and Q-Filters' larger tiles read up to 1.03x outside B = 4, 512K: they keep the default.
    ``TRITONKV_LOOP_STAGES=S`` (for A/B timing) sets S for every such pass, 1 for none; at most
    64 KB of tiles are in flight (S - 1 buffers of ``tile_bytes``); proxy attention keeps its own."""
    requested = _override("TRITONKV_LOOP_STAGES", 2 if anchor else 0)
    if has_proxy or requested < 2:
        return None
    stages = min(requested, 1 + 65536 // max(tile_bytes, 1))
    return stages if stages >= 2 else None


def anchor_fold(block_n: int) -> int:
    """Tile rows the anchor pass sums into one row of its accumulator (kernels/stats.anchor_tile):
    ``TRITONKV_ANCHOR_FOLD`` (1, the default: an accumulator the tile's size; 2, 4, ...: a half, a
    quarter, fewer registers per program), at most ``block_n``."""
    fold = _override("TRITONKV_ANCHOR_FOLD", 1)
    if fold < 1 or fold & (fold - 1):
        raise ValueError(f"TRITONKV_ANCHOR_FOLD: expected a power of two >= 1, got {fold}")
    return min(fold, block_n)


def pool_after(program: Program) -> bool:
    """Whether the proxy attentions that can be (codegen.deferred_pools: SnapKV's) are pooled after
    the score kernel (kernels/pooling.py) rather than in its tiles: ``TRITONKV_POOL_AFTER=1``; off by
    default until timed against the in-tile pooling (the twenty-seventh session's first pass was
    level with it on an H100, its second is untimed: performance-log.md)."""
    return bool(program.pooled) and os.environ.get("TRITONKV_POOL_AFTER", "0") != "0"


def _override(name: str, default):
    value = os.environ.get(name)
    return default if value is None else int(value)


_GEOMETRY: Dict[Tuple, Geometry] = {}


def clear_geometry() -> None:
    """Forget every cached geometry (tuning tools that change the overrides; cold-start tests)."""
    _GEOMETRY.clear()


def geometry(program: Program, k_shape, v_shape, q_shape, dtype: torch.dtype, itemsize: int,
             device: torch.device, page: int = 0, splits: Optional[int] = None) -> Geometry:
    """Launch geometry for these shapes, cached (programs live as long as the process).
    ``page``: tokens per page of a paged cache (0: dense); the tiling is the dense one.
    ``splits``: statistics programs per row, where the caller sets them (a batched paged call:
    the most that one of its sequences uses, kernels/sequences.py)."""
    key = (id(program), k_shape, v_shape, q_shape, dtype, device, page, splits)
    geo = _GEOMETRY.get(key)
    if geo is None:   # a pure function of the key: threads that race compute equal values, one is kept
        geo = _GEOMETRY.setdefault(key, _geometry(program, k_shape, v_shape, q_shape, dtype, itemsize, device,
                                                  page, splits))
    return geo


def _geometry(program: Program, k_shape, v_shape, q_shape, dtype: torch.dtype, itemsize: int,
              device: torch.device, page: int, fixed_splits: Optional[int]) -> Geometry:
    b, h, n, d = k_shape
    dv = v_shape[-1]
    rows = b * h
    has_proxy = bool(program.proxies)
    group = q_shape[1] // h if q_shape is not None else 1
    w_total = q_shape[2] if q_shape is not None else 0
    # a proxy attention that keeps its logits (one query per head, all heads in one chunk: TOVA)
    # feeds tl.dot a one-row query: its K tiles take the K-reading kernels' size, not the proxy
    # cap (256 tokens vs 64 at D = 128, bf16: 0.875-0.969x TOVA's time on an H100, perf/results/ab)
    logits_only = has_proxy and all(keeps_logits(program.globals[i], n, w_total, group, d, itemsize)
                                    for i in program.proxies)
    after = pool_after(program)
    halo = program.halo_pooled_after if after else program.halo
    block_n = block_tokens(max(d, dv), halo, has_proxy and not logits_only, itemsize, program.reads_cache)
    if logits_only:   # a key block of 64 KB at most (shared memory holds a few in flight)
        block_n = max(16, min(block_n, 65536 // (next_power_of_2(d) * itemsize)))
    anchored = any(isinstance(g, dsl.AnchorSimilarity) for g in program.globals)
    if anchored:
        # the anchor pass holds a [BLOCK_N, BLOCK_D] tile in float32 and its accumulator in
        # registers: keep the tiles at 8K floats
        block_n = max(16, min(block_n, 8192 // next_power_of_2(d)))
        while block_n <= 4 * halo:
            block_n *= 2
    block_n = _override("TRITONKV_BLOCK_N", block_n)
    fold = anchor_fold(block_n) if anchored else 1
    n_tiles = cdiv(n, block_n - 2 * halo)
    if fixed_splits is None:
        splits, tiles_per_prog = even_tiling(n_tiles, stats_splits(rows, n_tiles, device))
    else:
        splits, tiles_per_prog = fixed_splits, cdiv(n_tiles, fixed_splits)
    block_d, block_dv = next_power_of_2(d), next_power_of_2(dv)
    constexprs = dict(D=d, DV=dv, G=group, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                      HALO=halo, QK_SCALE=qk_scale(d), PAGE=page, ANCHOR_FOLD=fold, POOL_AFTER=after,
                      ALL_HEAD_ROWS=True, POOL_SEG=pool_segment(n, page > 0),
                      IEEE=ieee_products(dtype),
                      STAGES=loop_stages(has_proxy, block_n * max(block_d, block_dv) * itemsize, anchored))
    placed: List[Tuple[int, int, List[int]]] = []   # per global: partials and final offsets, (window, logits)
    offset = partials = 0
    chunks = {}
    logits_regions = []   # (global, float32 elements) of the proxy attentions that keep their logits
    for i, node in enumerate(program.globals):
        if isinstance(node, dsl.AnchorSimilarity):
            part, final, nch = splits * block_d, block_d, 1
        elif isinstance(node, dsl.ProxyAttention):
            w = proxy_window(node, n, w_total)
            w_pad, qb = proxy_tiling(w, group, d, itemsize)
            q_rows = max(group * w_pad, qb)   # query rows, padding included: nch chunks of qb
            nch = q_rows // qb
            part, final = nch * splits * 2 * qb, q_rows   # final: each row's lse
            constexprs[f"W_PAD_{i}"], constexprs[f"QB_{i}"], constexprs[f"QR_{i}"] = w_pad, qb, q_rows
            constexprs[f"LG_{i}"] = keeps = keeps_logits(node, n, w_total, group, d, itemsize)
            if keeps:
                logits_regions.append((i, rows * group * n))
        elif isinstance(node, dsl.Normalize):
            part, final, nch = splits * 3, 2, 1
        else:
            part, final, nch = splits * 2, 2, 1
        chunks[i] = nch
        placed.append((partials, offset, [w, 0] if isinstance(node, dsl.ProxyAttention) else []))
        partials += rows * part
        offset += rows * final
        if after and i in program.pooled:   # its slot's edges, right after its rows' lse (kernels/pooling.row_edges)
            offset += rows * edge_floats(n, node.pool_kernel, constexprs["POOL_SEG"])
    for i, numel in logits_regions:
        placed[i][2][1] = offset
        offset += numel
    chunks_per_level = tuple(max(chunks[i] for i in members) for members in program.levels)
    tiling = deferred_tiling(n, lambda tiles: stats_splits(rows, tiles, device))
    deferred = []
    for slot in program.slots:
        if slot.deferred:
            deferred.append(offset)
            offset += rows * tiling[0] * 3
    moments = []
    for _ in program.moment_slots:
        moments.append(offset)
        offset += rows * tiling[0] * 3
    workspace = -(-max(offset, 1) // 4) * 4   # the slots start 16-byte aligned
    per_global = [v for part, final, window in placed for v in [workspace + part, final, *window]]
    warps = _override("TRITONKV_WARPS", 8 if has_proxy or block_n * block_d >= 8192 else 4)
    stages = os.environ.get("TRITONKV_STAGES")
    dense = fixed_splits is None and page == 0   # the splits are this module's to choose
    score_tiling, fused = None, False
    if dense and program.slots and not _score_reads_cache(program, constexprs):
        # a score pass of a few bytes per token and head: its own programs, and where every slot
        # is head-reduced, one program row per batch row that reduces the heads itself
        fused = program.score_heads and os.environ.get("TRITONKV_SCORE_HEADS", "1") != "0"
        programs = score_splits(rows // h if fused else rows, n_tiles, device)
        if programs:
            score_tiling = even_tiling(n_tiles, programs)
        fused = fused and score_tiling is not None
    one_chunk = has_proxy and not logits_only and all(chunks[i] == 1 for i in program.proxies)
    cap = score_register_cap(dense and one_chunk and itemsize == 2 and block_d <= 128 and warps == 8
                             and stages is None and score_tiling is None)
    return Geometry(constexprs, tuple(per_global), rows, splits, tiles_per_prog, chunks_per_level,
                    workspace, warps, int(stages) if stages else None, tuple(deferred), tiling, tuple(moments),
                    partials, n_tiles if dense else 0, score_tiling, fused, cap)


SCORE_REGISTER_CAP = 128   # registers per thread of two 8-warp programs per multiprocessor


def score_register_cap(two_fit: bool) -> Optional[int]:
    """Registers per thread the score kernel may use (Triton's ``maxnreg``; ptxas spills past it),
    None for no cap. ``two_fit``: the kernel is one whose shared memory holds two programs per SM,
    a proxy attention's score pass over 16-bit keys of at most 128 dims with its query rows in one
    chunk (8 warps, K tiles 3 deep: 115,710 B each on sm_90). There a cap of 128 fits two programs
    where the build takes more: H2O's score pass builds to 162 registers (its causal compare), and
    capped it runs 0.859-0.865x the graph time (H100, 0fd0438); SnapKV's and NACL's build under 128,
    which the cap leaves as they are. ``TRITONKV_SCORE_MAXNREG``: another cap for every score kernel
    (0: none; A/B timing)."""
    cap = _override("TRITONKV_SCORE_MAXNREG", SCORE_REGISTER_CAP if two_fit else 0)
    return cap if cap > 0 else None
