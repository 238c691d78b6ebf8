"""Triton source for a policy's kernels, generated from its score expressions.

The generated module holds, for a plan (see compiler.py):
  - ``stats_<L>`` / ``merge_<L>`` for each statistics level L: the row quantities that
    scores need first (anchor, proxy softmax statistics, moments for normalize, softmax
    sums), accumulated per program over tiles and merged per row in a fixed order;
  - ``score``: ONE kernel that evaluates every slot's score for a tile of tokens and
    stores one float32 per token per slot. A slot is a score some clauses rank: a top
    clause ranks it as it is (after its in-place normalize / transform), a sample clause
    adds its Gumbel noise in the select kernel (kernels/keys.py), so sample and top clauses
    of one score share a slot.

Each score node becomes one or two lines that call the hand-written helpers of
``tritonkv.kernels``; identical subtrees are emitted once. The source depends only on the
policy's structure; shapes and dtypes enter as constexprs, so Triton specializes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import dsl
from .kernels.keys import ClauseKey
from .kernels.pooling import MAX_DEFERRED_KERNEL
from .kernels.proxy import REDUCE_CODES

GLOBAL_NODES = (dsl.AnchorSimilarity, dsl.ProxyAttention, dsl.Normalize, dsl.Softmax)
RUNTIME_ARGS = ("N", "H", "W_total", "seed", "rows", "S", "tiles_per_prog", "z_numel")
# bt: a paged block table [B, max_pages], sq: its sequence table (kernels/sequences.py)
POINTER_ARGS = ("k_ptr", "v_ptr", "q_ptr", "ws_ptr", "out_ptr", "z_ptr", "bt_ptr", "sq_ptr")
STRIDE_ARGS = ("s_kb", "s_kh", "s_kn", "s_kd", "s_vb", "s_vh", "s_vn", "s_vd", "s_qb", "s_qh", "s_qw", "s_qd")
SEED_ARG = len(POINTER_ARGS) + len(STRIDE_ARGS) + RUNTIME_ARGS.index("seed")   # where the seed is passed
CONSTEXPR_ARGS = ("D", "DV", "G", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "HALO", "IEEE", "QK_SCALE", "PAGE", "STAGES",
                  "ANCHOR_FOLD", "ALL_HEAD_ROWS", "POOL_AFTER", "POOL_SEG")
# the tile loops: STAGES-deep software pipelining of their loads, None for Triton's default (geometry.loop_stages)
TILE_LOOP = "    for it in tl.range(0, tiles_per_prog, num_stages=STAGES):"


def is_global(node: dsl.Score) -> bool:
    return isinstance(node, GLOBAL_NODES)


def stats_level(node: dsl.Score) -> int:
    """The pass in which a global node's row statistics are computed: anchor and proxy
    statistics read only the cache (level 0); normalize / softmax need their operand,
    so they come one level after the global nodes inside it."""
    if isinstance(node, (dsl.AnchorSimilarity, dsl.ProxyAttention)):
        return 0
    inner = [stats_level(n) for n in dsl.walk(node.operand) if is_global(n)]
    return 1 + max(inner) if inner else 0


def halo(node: dsl.Score, pooled_after: Sequence[dsl.Score] = ()) -> int:
    """How many neighbouring tokens on each side a token's value depends on in the score kernel
    (none for the pooling of a node in ``pooled_after``: kernels/pooling.py's pass pools it)."""
    own = 0
    if isinstance(node, dsl.Pool):
        own = node.kernel // 2
    elif isinstance(node, dsl.ProxyAttention) and node not in pooled_after:
        own = node.pool_kernel // 2
    return own + max((halo(c, pooled_after) for c in node.children()), default=0)


def poolable_after(node: dsl.Score) -> bool:
    """A proxy attention whose pooling kernels/pooling.py can apply after the score kernel: an
    average pooling (of width <= MAX_DEFERRED_KERNEL) that commutes with its group's sum or mean,
    so the score kernel stores the group's sum unpooled (kernels/proxy.py's _pools_each_head)."""
    return (isinstance(node, dsl.ProxyAttention) and 1 < node.pool_kernel <= MAX_DEFERRED_KERNEL
            and node.pool_mode == "avg" and node.group_reduce != "max")


def deferred_pools(slots: Sequence["Slot"]) -> Tuple[dsl.Score, ...]:
    """The proxy attentions pooled after the score kernel: poolable_after, and the whole of what
    some slots store and part of no other slot's score (which would need them pooled in the tile)."""
    roots = [s.stored for s in slots]
    inner = {node for root in roots for node in dsl.walk(root) if node is not root}
    return tuple(dict.fromkeys(r for r in roots if poolable_after(r) and r not in inner))


def own_tiles(node: dsl.Score) -> bool:
    """Whether a statistic reads each token alone, so that its statistics pass may tile the
    tokens without the score's halo (tiles that overlap by 2 * HALO, whose overlap counts once):
    an anchor or a proxy attention's softmax statistics (its pooling is the score's, not the
    statistics'), a normalize or softmax of a per-token value."""
    if isinstance(node, (dsl.AnchorSimilarity, dsl.ProxyAttention)):
        return True
    return halo(node.operand) == 0


@dataclass(frozen=True)
class Slot:
    """One float32 per token that the select kernel ranks clauses by (kernels/keys.py)."""

    score: dsl.Score
    chunk: int = 1                 # a top clause's reference.clause_transform, applied by
    chunk_reduce: str = "sum"      # kernels/transform.py after the score kernel
    head_reduce: Optional[str] = None

    @property
    def transformed(self) -> bool:
        return self.chunk > 1 or self.head_reduce is not None

    @property
    def deferred(self) -> bool:
        """A score ``x.normalize()``: the score kernel stores x, kernels/deferred.py normalizes
        it from the stored values, instead of a statistics pass that recomputes x."""
        return isinstance(self.score, dsl.Normalize)

    @property
    def stored(self) -> dsl.Score:
        """What the score kernel writes to the slot."""
        return self.score.operand if self.deferred else self.score


@dataclass(frozen=True)
class Program:
    """What the generated module contains and how to call it."""

    slots: Tuple[Slot, ...]
    clause_keys: Tuple[ClauseKey, ...]        # per selective clause: its slot and how it ranks it
    reads_cache: bool                          # some score loads K or V tiles
    globals: Tuple[dsl.Score, ...]            # index i names po_i / fo_i / w_i
    levels: Tuple[Tuple[int, ...], ...]       # global indices per statistics level
    halo: int                                  # pooling in the tile
    own_tiles: Tuple[bool, ...]               # per level: its statistics tile the tokens without halo
    source: str
    signals: Tuple[str, ...] = ()              # sg_i: the policy's signal tensors, in order
    directions: Tuple[str, ...] = ()           # dr_i: its key_dot directions, in order
    score_heads: bool = False                  # the module also has ``score_heads`` (heads_fusable)
    pooled: Tuple[int, ...] = ()               # global indices of the proxy attentions that may be pooled
    # after the score kernel (deferred_pools; kernels/pooling.py; POOL_AFTER), their slots' edges after their lse
    halo_pooled_after: int = 0                 # the halo with those pooled after the score kernel

    def pooled_global(self, slot: "Slot") -> Optional[int]:
        """The global index of the proxy attention a slot stores unpooled, else None."""
        return next((gi for gi in self.pooled if self.globals[gi] == slot.stored), None)

    @property
    def proxies(self) -> Tuple[int, ...]:
        return tuple(i for i, g in enumerate(self.globals) if isinstance(g, dsl.ProxyAttention))

    @property
    def moment_slots(self) -> Tuple[int, ...]:
        """The slots whose row moments the select kernel reads (a sample clause of x.normalize())."""
        return tuple(sorted({k.slot for k in self.clause_keys if k.normalized}))


def plan_slots(policy: dsl.Policy) -> Tuple[Tuple[Slot, ...], Tuple[ClauseKey, ...]]:
    """The slots the score kernel writes and each selective clause's key. A top clause's slot
    holds its priority; a sample clause ranks the slot of its score, or of x for a score
    ``x.normalize()`` (standardized as select loads it), plus its noise: it shares the slot
    of a top clause that ranks the same values."""
    slots: List[Slot] = []
    keys = []
    for clause in policy.selective:
        normalized = isinstance(clause, dsl.Sample) and isinstance(clause.score, dsl.Normalize)
        if isinstance(clause, dsl.Sample):
            slot = Slot(clause.score.operand if normalized else clause.score)
        else:
            slot = Slot(clause.score, chunk=clause.chunk,
                        chunk_reduce=clause.chunk_reduce if clause.chunk > 1 else "sum",
                        head_reduce=clause.head_reduce)
        if slot not in slots:
            slots.append(slot)
        sampled = isinstance(clause, dsl.Sample)
        keys.append(ClauseKey(slots.index(slot), sampled, clause.temperature if sampled else 1.0, normalized))
    return tuple(slots), tuple(keys)


def collect_globals(scores: Sequence[dsl.Score]) -> Tuple[dsl.Score, ...]:
    out: List[dsl.Score] = []
    for s in scores:
        for node in dsl.walk(s):
            if is_global(node) and node not in out:
                out.append(node)
    return tuple(out)


class TileEmitter:
    """Emits the lines that evaluate score nodes on the current tile."""

    def __init__(self, program_globals: Tuple[dsl.Score, ...], prologue: List[str], body: List[str], indent: str,
                 names: "Names", causal: bool = True, pooled_after: Sequence[dsl.Score] = ()):
        self.globals = program_globals
        self.pooled_after = pooled_after   # proxy attentions emitted unpooled (FINISH off)
        self.names = names
        self.causal = causal   # False: the tile is before every causal window's keys (no compare)
        self.prologue = prologue
        self.body = body
        self.indent = indent
        self.memo: Dict[object, str] = {}
        self.counter = 0

    def emit(self, line: str) -> None:
        self.body.append(self.indent + line)

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}_{self.counter}"

    def once(self, key, make) -> str:
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    # inputs of the tile ---------------------------------------------------------------
    def rows(self) -> None:
        """The tile's token addresses: (batch, position) or, paged, (page, slot); see token_rows."""
        self.once("rows", lambda: self.emit("t_out, t_in = token_rows(bt_ptr, i_b, o_n, m_n, PAGE)"))

    def keys(self) -> Tuple[str, str]:
        def load():
            self.rows()
            self.emit("p_k = k_ptr + t_out[:, None] * s_kb + i_h.to(tl.int64) * s_kh "
                      "+ t_in[:, None] * s_kn + o_d[None, :] * s_kd")
            self.emit("b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)")
            self.emit("b_kf = b_k.to(tl.float32)")
            return "b_k"
        self.once("keys", load)
        return "b_k", "b_kf"

    def key_norm(self) -> str:
        def make():
            _, kf = self.keys()
            self.emit("b_knorm = row_norm(b_kf)")
            return "b_knorm"
        return self.once("key_norm", make)

    def value_norm(self) -> str:
        def make():
            self.rows()
            self.emit("p_v = v_ptr + t_out[:, None] * s_vb + i_h.to(tl.int64) * s_vh "
                      "+ t_in[:, None] * s_vn + o_dv[None, :] * s_vd")
            self.emit("b_vf = tl.load(p_v, mask=m_n[:, None] & m_dv[None, :], other=0.0).to(tl.float32)")
            self.emit("b_vnorm = row_norm(b_vf)")
            return "b_vnorm"
        return self.once("value_norm", make)

    # score nodes -----------------------------------------------------------------------
    def value(self, node: dsl.Score) -> str:
        return self.once(node, lambda: self._value(node))

    def _assign(self, expr: str, stem: str = "x") -> str:
        name = self.fresh(stem)
        self.emit(f"{name} = {expr}")
        return name

    def _value(self, node: dsl.Score) -> str:
        gi = self.globals.index(node) if is_global(node) else -1
        if isinstance(node, dsl.KeyNorm):
            return self.key_norm()
        if isinstance(node, dsl.ValueNorm):
            return self.value_norm()
        if isinstance(node, dsl.Position):
            return self._assign("position(o_n, N)")
        if isinstance(node, dsl.Random):
            return self._assign(f"uniform(seed, o_n, i_draw, i_h, {node.stream})")
        if isinstance(node, dsl.Signal):
            i = self.names.signals.index(node.name)
            return self._assign(f"tl.load(sg_{i} + i_b.to(tl.int64) * s_sgb_{i} + i_h.to(tl.int64) * s_sgh_{i} "
                                f"+ o_n.to(tl.int64) * s_sgn_{i}, mask=m_n, other=0.0).to(tl.float32)", "sig")
        if isinstance(node, dsl.KeyDot):
            i = self.names.directions.index(node.name)
            line = (f"    b_dir_{i} = tl.load(dr_{i} + i_b.to(tl.int64) * s_drb_{i} + i_h.to(tl.int64) * s_drh_{i} "
                    f"+ o_d * s_drd_{i}, mask=m_d, other=0.0).to(tl.float32)")
            if line not in self.prologue:
                self.prologue.append(line)
            self.keys()
            return self._assign(f"tl.sum(b_kf * b_dir_{i}[None, :], 1)", "kdot")
        if isinstance(node, dsl.Const):
            return self._assign(f"tl.full([BLOCK_N], {node.value!r}, tl.float32)")
        if isinstance(node, dsl.Neg):
            return self._assign(f"-{self.value(node.operand)}")
        if isinstance(node, dsl.BinaryOp):
            symbol = dsl.BINARY_SYMBOLS[node.op]
            return self._assign(f"{self.value(node.left)} {symbol} {self.value(node.right)}")
        if isinstance(node, dsl.Pool):
            x = self.value(node.operand)
            return self._assign(f"pool({x}, o_t, o_n, N, {node.kernel}, {node.mode == 'max'}, BLOCK_N)")
        if isinstance(node, dsl.AnchorSimilarity):
            self.prologue.append(f"    b_anchor_{gi} = tl.load(ws_ptr + fo_{gi} + i_row * BLOCK_D + o_d)")
            self.keys()
            return self._assign(f"cosine_to(b_kf, {self.key_norm()}, b_anchor_{gi})")
        if isinstance(node, dsl.ProxyAttention):
            chunk = f"b_q_{gi}, w_r_{gi}, b_lse_{gi}"   # chunk 0: queries, window rows, log-sum-exp
            self.prologue.append(f"    p_stats_{gi} = ws_ptr + fo_{gi} + i_row * QR_{gi}")
            self.prologue.append(f"    p_lg_{gi} = ws_ptr + lo_{gi} + i_row.to(tl.int64) * G * NS")
            self.prologue.append(f"    b_q_{gi}, w_r_{gi}, _, b_lse_{gi} = proxy_chunk(q_ptr, s_qb, s_qh, s_qw, s_qd, p_stats_{gi}, i_b, i_h, "
                                 f"W_total, w_{gi}, 0, D, BLOCK_D, G, W_PAD_{gi}, QB_{gi}, True)")
            self.keys()
            return self._assign(
                f"proxy_attention_tile(b_k, {chunk}, q_ptr, s_qb, s_qh, s_qw, s_qd, p_stats_{gi}, p_lg_{gi}, NS, "
                f"i_b, i_h, N, W_total, w_{gi}, o_t, o_n, m_n, D, BLOCK_D, BLOCK_N, G, W_PAD_{gi}, QB_{gi}, QR_{gi}, "
                f"{node.causal and self.causal}, {REDUCE_CODES[node.reduce]}, {node.pool_kernel}, "
                f"{node.pool_mode == 'max'}, "
                f"{REDUCE_CODES[node.group_reduce]}, {node.exclude_window}, QK_SCALE, IEEE, LG_{gi}, "
                f"{'not POOL_AFTER' if node in self.pooled_after else True})")
        if isinstance(node, dsl.Normalize):
            self.prologue.append(f"    mean_{gi} = tl.load(ws_ptr + fo_{gi} + i_row * 2)")
            self.prologue.append(f"    std_{gi} = tl.load(ws_ptr + fo_{gi} + i_row * 2 + 1)")
            return self._assign(f"standardize({self.value(node.operand)}, mean_{gi}, std_{gi})")
        if isinstance(node, dsl.Softmax):
            self.prologue.append(f"    smax_{gi} = tl.load(ws_ptr + fo_{gi} + i_row * 2)")
            self.prologue.append(f"    ssum_{gi} = tl.load(ws_ptr + fo_{gi} + i_row * 2 + 1)")
            return self._assign(f"softmax_apply({self.value(node.operand)}, {node.temperature!r}, smax_{gi}, ssum_{gi})")
        raise TypeError(f"no code generation for {node!r}")  # pragma: no cover


HEADER = '''# Generated by tritonkv.codegen for:
#   {policy}
# Do not edit: the file name is a hash of its contents.
import triton
import triton.language as tl

from tritonkv.kernels.pooling import row_edges, store_edges
from tritonkv.kernels.primitives import (cosine_to, pool, position, row_norm, softmax_apply, standardize,
                                         token_rows, uniform)
from tritonkv.kernels.proxy import proxy_attention_tile, proxy_chunk, proxy_stats_merge, proxy_stats_tile
from tritonkv.kernels.select import zero_fill
from tritonkv.kernels.sequences import sequence_of
from tritonkv.kernels.stats import (anchor_merge, anchor_store, anchor_tile, moments_merge, moments_store, moments_tile,
                                    softmax_merge, softmax_store, softmax_tile)
'''

# A paged launch (PAGE > 0) serves a batch of sequences: row i_row is head i_h of the batch's
# sequence i_row // H, whose length, tiling and block table row come from the sequence table;
# the scalar N is then the longest length, the slots' row stride NS. Random draws use batch
# row 0 (i_draw), as on the sequence's dense copy [1, H, N, D].
SEQUENCE = '''    NS = N
    i_b = i_row // H
    i_draw = i_b
    if PAGE > 0:
        i_b, N, seq_splits, seq_tiles, bt_offset = sequence_of(sq_ptr, i_row // H)
        bt_ptr += bt_offset
        i_draw = i_b * 0
        {tiles}'''

PROLOGUE = SEQUENCE.format(tiles="tiles_per_prog = tl.where(i_s < seq_splits, seq_tiles, 0)") + '''
    i_h = i_row % H
    o_t = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_dv = tl.arange(0, BLOCK_DV)
    m_dv = o_dv < DV'''

TILE_START = '''{ind}o_n = {base} + o_t
{ind}m_n = (o_n >= 0) & (o_n < N)
{ind}m_val = (o_t >= HALO) & (o_t < BLOCK_N - HALO) & m_n'''
SCORE_TILE = "(i_s * tiles_per_prog + it) * (BLOCK_N - 2 * HALO) - HALO"

# A statistics pass of its own tiles (``own_tiles``): program i_s reads the tokens of the score
# tiles it would read (tiles_per_prog tiles of BLOCK_N - 2 * HALO new tokens each), BLOCK_N at a
# time with no overlap, so every lane it loads counts (SnapKV, HALO = 2: 60 of each 64 before)
TOKEN_RANGE = '''    span = tiles_per_prog * (BLOCK_N - 2 * HALO)
    t_lo = i_s * span
    t_hi = tl.minimum(t_lo + span, N)'''
OWN_TILE_LOOP = TOKEN_RANGE + '''
    for it in tl.range(0, tl.cdiv(span, BLOCK_N), num_stages=STAGES):
        o_n = t_lo + it * BLOCK_N + o_t
        m_n = o_n < t_hi
        m_val = m_n'''
# with a proxy attention: first the range's whole tiles before ``free`` (where the causal windows'
# keys start), with no mask, then the rest with masks (at most the last tile and the window's)
SPLIT_TILE_LOOP = TOKEN_RANGE + '''
    n_whole = tl.maximum(tl.minimum(t_hi, {free}) - t_lo, 0) // BLOCK_N
    for it in tl.range(0, n_whole, num_stages=STAGES):
        o_n = t_lo + it * BLOCK_N + o_t
        m_n = o_t >= 0
        m_val = m_n'''
MASKED_TILE_LOOP = '''    for it in tl.range(n_whole, tl.cdiv(t_hi - t_lo, BLOCK_N), num_stages=1):
        o_n = t_lo + it * BLOCK_N + o_t
        m_n = o_n < t_hi
        m_val = m_n'''


@dataclass(frozen=True)
class Names:
    """The named inputs of a policy, in the order its kernels take them."""

    signals: Tuple[str, ...] = ()
    directions: Tuple[str, ...] = ()


def _signature(program_globals, names: Names) -> Tuple[str, List[str]]:
    params = [*POINTER_ARGS, *STRIDE_ARGS, *RUNTIME_ARGS]
    no_spec = list(RUNTIME_ARGS)
    for i, g in enumerate(program_globals):
        params += [f"po_{i}", f"fo_{i}"]
        no_spec += [f"po_{i}", f"fo_{i}"]
        if isinstance(g, dsl.ProxyAttention):   # its window, and where its logits go (LG_i: if they do)
            params += [f"w_{i}", f"lo_{i}"]
            no_spec += [f"w_{i}", f"lo_{i}"]
    for i in range(len(names.signals)):      # a pointer and its [B, H, N] strides (0: broadcast)
        params += [f"sg_{i}", f"s_sgb_{i}", f"s_sgh_{i}", f"s_sgn_{i}"]
    for i in range(len(names.directions)):   # a pointer and its [B, H, D] strides
        params += [f"dr_{i}", f"s_drb_{i}", f"s_drh_{i}", f"s_drd_{i}"]
    params += [f"{c}: tl.constexpr" for c in CONSTEXPR_ARGS]
    for i, g in enumerate(program_globals):
        if isinstance(g, dsl.ProxyAttention):
            params += [f"W_PAD_{i}: tl.constexpr", f"QB_{i}: tl.constexpr", f"QR_{i}: tl.constexpr",
                       f"LG_{i}: tl.constexpr"]
    return ", ".join(params), no_spec


def _kernel(name: str, program_globals, names: Names, lines: List[str]) -> List[str]:
    params, no_spec = _signature(program_globals, names)
    return [f"@triton.jit(do_not_specialize={no_spec!r})", f"def {name}({params}):", *lines, ""]


def _stats_parts(members: Sequence[int], program_globals, names: Names, prologue: List[str], full: bool):
    """(init, tile, store) lines of a level's statistics kernel; ``tile`` evaluates one tile at an
    indent of 8 (its emitter adds what it needs once per program to ``prologue``). ``full``: every
    lane of the tile counts, so a proxy attention's statistics mask none (proxy_stats_tile's FULL)."""
    body: List[str] = []
    emitter = TileEmitter(program_globals, prologue, body, " " * 8, names)
    init, update, store = [], [], []
    for gi in members:
        node = program_globals[gi]
        if isinstance(node, dsl.AnchorSimilarity):
            init.append(f"    acc_{gi} = tl.zeros([BLOCK_N // ANCHOR_FOLD, BLOCK_D], dtype=tl.float32)")
            emitter.keys()
            update.append(f"acc_{gi} = anchor_tile(acc_{gi}, b_kf, {emitter.key_norm()}, m_val)")
            store.append(f"    anchor_store(ws_ptr, po_{gi}, i_row, i_s, S, acc_{gi}, i_c == 0, BLOCK_D)")
        elif isinstance(node, dsl.ProxyAttention):
            init.append(f"    NCH_{gi}: tl.constexpr = QR_{gi} // QB_{gi}")
            init.append(f"    c_{gi} = tl.minimum(i_c, NCH_{gi} - 1)")
            init.append(f"    run_m_{gi} = tl.full([QB_{gi}], float('-inf'), tl.float32)")
            init.append(f"    run_l_{gi} = tl.zeros([QB_{gi}], dtype=tl.float32)")
            init.append(f"    bs_q_{gi}, ws_r_{gi}, _, _ = proxy_chunk(q_ptr, s_qb, s_qh, s_qw, s_qd, ws_ptr, "
                        f"i_b, i_h, W_total, w_{gi}, c_{gi}, D, BLOCK_D, G, W_PAD_{gi}, QB_{gi}, False)")
            init.append(f"    p_lg_{gi} = ws_ptr + lo_{gi} + i_row.to(tl.int64) * G * NS")
            emitter.keys()
            update.append(f"run_m_{gi}, run_l_{gi} = proxy_stats_tile(run_m_{gi}, run_l_{gi}, b_k, bs_q_{gi}, "
                          f"ws_r_{gi}, N, w_{gi}, o_n, m_val, p_lg_{gi}, NS, i_c < NCH_{gi}, "
                          f"{node.causal}, QK_SCALE, IEEE, G, QB_{gi}, LG_{gi}, {full})")
            store.append(f"    o_q_{gi} = tl.arange(0, QB_{gi})")
            store.append(f"    p_part_{gi} = ws_ptr + po_{gi} + ((i_row * NCH_{gi} + i_c) * S + i_s) * (2 * QB_{gi})")
            store.append(f"    tl.store(p_part_{gi} + o_q_{gi}, run_m_{gi}, mask=(o_q_{gi} >= 0) & (i_c < NCH_{gi}))")
            store.append(f"    tl.store(p_part_{gi} + QB_{gi} + o_q_{gi}, run_l_{gi}, mask=(o_q_{gi} >= 0) & (i_c < NCH_{gi}))")
        elif isinstance(node, dsl.Normalize):
            init.append(f"    n_{gi} = tl.full([], 0.0, tl.float32)")
            init.append(f"    mean_acc_{gi} = tl.full([], 0.0, tl.float32)")
            init.append(f"    m2_{gi} = tl.full([], 0.0, tl.float32)")
            x = emitter.value(node.operand)
            update.append(f"n_{gi}, mean_acc_{gi}, m2_{gi} = moments_tile(n_{gi}, mean_acc_{gi}, m2_{gi}, {x}, m_val)")
            store.append(f"    moments_store(ws_ptr, po_{gi}, i_row, i_s, S, n_{gi}, mean_acc_{gi}, m2_{gi}, i_c == 0)")
        elif isinstance(node, dsl.Softmax):
            init.append(f"    sm_m_{gi} = tl.full([], float('-inf'), tl.float32)")
            init.append(f"    sm_l_{gi} = tl.full([], 0.0, tl.float32)")
            x = emitter.value(node.operand)
            update.append(f"sm_m_{gi}, sm_l_{gi} = softmax_tile(sm_m_{gi}, sm_l_{gi}, {x}, {node.temperature!r}, m_val)")
            store.append(f"    softmax_store(ws_ptr, po_{gi}, i_row, i_s, S, sm_m_{gi}, sm_l_{gi}, i_c == 0)")
    return init, body + [" " * 8 + u for u in update], store


def _max_of(names: Sequence[str]) -> str:
    """tl.maximum over the names, two at a time."""
    expr = names[0]
    for name in names[1:]:
        expr = f"tl.maximum({expr}, {name})"
    return expr


def _stats_kernel(level: int, members: Sequence[int], program_globals, names: Names, own: bool) -> List[str]:
    """``own``: the level's statistics tile the tokens themselves (``own_tiles``)."""
    prologue = ["    i_s = tl.program_id(0)", "    i_row = tl.program_id(1)", "    i_c = tl.program_id(2)",
                PROLOGUE]
    proxies = [gi for gi in members if isinstance(program_globals[gi], dsl.ProxyAttention)]
    if own and proxies:
        # whole tiles that no row's causal window reaches need no mask per logit (proxy_stats_tile's
        # FULL); the rest of the range (a partial last tile, the window's keys) is masked
        causal = [f"w_{gi}" for gi in proxies if program_globals[gi].causal]
        free = f"N - {_max_of(causal)}" if causal else "N"
        init, whole, store = _stats_parts(members, program_globals, names, prologue, True)
        _, masked, _ = _stats_parts(members, program_globals, names, [], False)   # the same prologue lines
        lines = prologue + init + [SPLIT_TILE_LOOP.format(free=free)] + whole + [MASKED_TILE_LOOP] + masked + store
    elif own:
        init, tile, store = _stats_parts(members, program_globals, names, prologue, False)
        lines = prologue + init + [OWN_TILE_LOOP] + tile + store
    else:
        init, tile, store = _stats_parts(members, program_globals, names, prologue, False)
        lines = prologue + init + [TILE_LOOP, TILE_START.format(ind=" " * 8, base=SCORE_TILE)] + tile + store
    return _kernel(f"stats_{level}", program_globals, names, lines)


def _merge_kernel(level: int, members: Sequence[int], program_globals, names: Names) -> List[str]:
    lines = ["    i_row = tl.program_id(0)", "    i_c = tl.program_id(1)", SEQUENCE.format(tiles="")]
    for gi in members:
        node = program_globals[gi]
        if isinstance(node, dsl.AnchorSimilarity):
            lines += ["    if i_c == 0:", f"        anchor_merge(ws_ptr, po_{gi}, fo_{gi}, i_row, S, N, BLOCK_D)"]
        elif isinstance(node, dsl.ProxyAttention):
            lines += [f"    if i_c < QR_{gi} // QB_{gi}:",
                      f"        proxy_stats_merge(ws_ptr, po_{gi}, fo_{gi}, i_row, i_c, S, QR_{gi} // QB_{gi}, "
                      f"QB_{gi}, QR_{gi})"]
        elif isinstance(node, dsl.Normalize):
            lines.append(f"    moments_merge(ws_ptr, po_{gi}, fo_{gi}, i_row, S, i_c == 0)")
        elif isinstance(node, dsl.Softmax):
            lines.append(f"    softmax_merge(ws_ptr, po_{gi}, fo_{gi}, i_row, S, i_c == 0)")
    return _kernel(f"merge_{level}", program_globals, names, lines)


def causal_windows(program_globals) -> List[str]:
    """The windows (w_i) of the proxy attentions whose rows must not see the keys after their own
    position (causal, the window's own keys not excluded: H2O); only the last w keys are hidden."""
    return [f"w_{i}" for i, g in enumerate(program_globals)
            if isinstance(g, dsl.ProxyAttention) and g.causal and not g.exclude_window]


# With causal windows, each score program first evaluates its tiles whose lanes (halo included) are
# all before ``free``, where the windows' keys start, with no causal compare, then the rest with it
SCORE_SPLIT = '''    free = N - {windows}
    x_free = free + HALO - BLOCK_N   # a tile g is before ``free`` where g * (BLOCK_N - 2 * HALO) <= x_free
    n_free = tl.where(x_free >= 0, x_free // (BLOCK_N - 2 * HALO) + 1, 0) - i_s * tiles_per_prog
    n_free = tl.minimum(tl.maximum(n_free, 0), tiles_per_prog)'''
CAUSAL_LOOP = "    for it in tl.range(n_free, tiles_per_prog, num_stages=1):"


def _score_body(slots: Sequence[Slot], program_globals, names: Names, prologue: List[str], causal: bool,
                pooled_after: Sequence[dsl.Score]) -> List[str]:
    body: List[str] = [TILE_START.format(ind=" " * 8, base=SCORE_TILE)]
    emitter = TileEmitter(program_globals, prologue, body, " " * 8, names, causal, pooled_after)
    for index, slot in enumerate(slots):
        x = emitter.value(slot.stored)
        emitter.emit(f"tl.store(out_ptr + ({index} * rows + i_row).to(tl.int64) * NS + o_n, {x}, mask=m_val)")
        if slot.stored in pooled_after:   # the keys next to each pooling segment's ends (kernels/pooling.py)
            gi, half = program_globals.index(slot.stored), slot.stored.pool_kernel // 2
            emitter.emit("if POOL_AFTER:")
            emitter.emit(f"    store_edges(row_edges(ws_ptr, fo_{gi}, rows, QR_{gi}, i_row, NS, POOL_SEG, {half}), "
                         f"{x}, o_n, m_val, POOL_SEG, {half})")
    return body


def _score_kernel(slots: Sequence[Slot], program_globals, names: Names, pooled_after: Sequence[dsl.Score]) -> List[str]:
    """Per tile, every slot's score. With causal windows (H2O) the tiles before the windows' keys
    drop the causal compare, whose per-query positions held through the loop cost registers and
    two instructions a logit; the program's remaining tiles (at most the last w + HALO keys) keep it."""
    # the score kernel also zeroes the select kernel's histograms and barrier counters
    # (z_numel int32 at z_ptr), which saves a memset launch per evict call
    prologue = ["    i_s = tl.program_id(0)", "    i_row = tl.program_id(1)", PROLOGUE,
                "    zero_fill(z_ptr, z_numel, i_row * S + i_s, S * rows)"]
    windows = causal_windows(program_globals)
    if not windows:
        body = _score_body(slots, program_globals, names, prologue, True, pooled_after)   # adds to the prologue
        return _kernel("score", program_globals, names, prologue + [TILE_LOOP] + body)
    free = _score_body(slots, program_globals, names, prologue, False, pooled_after)
    masked = _score_body(slots, program_globals, names, [], True, pooled_after)   # the same prologue lines
    lines = (prologue + [SCORE_SPLIT.format(windows=_max_of(windows))]
             + [TILE_LOOP.replace("tiles_per_prog", "n_free", 1)] + free + [CAUSAL_LOOP] + masked)
    return _kernel("score", program_globals, names, lines)


HEAD_REDUCE = {"mean": "acc_{k} + x_{k}", "sum": "acc_{k} + x_{k}", "max": "tl.maximum(acc_{k}, x_{k})"}
HEAD_INIT = {"mean": "0.0", "sum": "0.0", "max": "float('-inf')"}


def heads_fusable(slots: Sequence[Slot], pooled_after: Sequence[dsl.Score] = ()) -> bool:
    """Whether every slot is a head-reduced priority the score kernel could reduce itself
    (``score_heads``): reduced over heads, not chunked, not normalized or pooled after the score kernel."""
    return bool(slots) and all(s.head_reduce is not None and s.chunk == 1 and not s.deferred
                               and s.stored not in pooled_after for s in slots)


def _score_heads_kernel(slots: Sequence[Slot], program_globals, names: Names) -> List[str]:
    """The score kernel with kernels/transform.py's head reduce folded in, for a score that reads
    no K or V tile (the geometry launches it only then: each program evaluates a tile for every
    head of its batch row, which re-reads the row statistics per head but no cache). Program
    (i_s, i_bh): tiles i_s * tiles_per_prog .. of batch row i_bh; per tile, each slot's scores of
    the H heads are reduced in head order (NaN as -inf, as the transform does) and the result is
    stored in every head's row, which is what the score kernel and the transform leave there (or,
    with ALL_HEAD_ROWS off, in head 0's alone: an evict call whose select ranks one row per batch
    row, compiler.scored)."""
    per_row: List[str] = []
    body: List[str] = []
    emitter = TileEmitter(program_globals, per_row, body, " " * 12, names)
    for index, slot in enumerate(slots):
        x = emitter.value(slot.stored)
        emitter.emit(f"x_{index} = tl.where({x} != {x}, float('-inf'), {x})")
        emitter.emit(f"acc_{index} = " + HEAD_REDUCE[slot.head_reduce].format(k=index))
    lines = ["    i_s = tl.program_id(0)", "    i_bh = tl.program_id(1)",
             "    zero_fill(z_ptr, z_numel, i_bh * S + i_s, S * (rows // H))",
             "    NS = N", "    i_b = i_bh", "    i_draw = i_b",
             "    o_t = tl.arange(0, BLOCK_N)", "    o_d = tl.arange(0, BLOCK_D)", "    m_d = o_d < D",
             "    o_dv = tl.arange(0, BLOCK_DV)", "    m_dv = o_dv < DV",
             TILE_LOOP,
             TILE_START.format(ind=" " * 8, base=SCORE_TILE)]
    lines += [f"        acc_{k} = tl.full([BLOCK_N], {HEAD_INIT[slot.head_reduce]}, tl.float32)"
              for k, slot in enumerate(slots)]
    # the heads' loop (unrolled by 4 or 8 it read 0.997-1.007x TOVA's time: H100, eb48fc6)
    lines += ["        for j_h in range(0, H):",
              "            i_h = i_bh * 0 + j_h   # a tensor, as program ids are", "            i_row = i_bh * H + i_h"]
    lines += [" " * 8 + line for line in per_row] + body
    # every head's row gets the result (ALL_HEAD_ROWS: what the transform leaves there, which the
    # slots' readers expect), or head 0's alone, the one row a shared selection ranks
    lines += ["        head_rows = H", "        if not ALL_HEAD_ROWS:", "            head_rows = 1"]
    for k, slot in enumerate(slots):
        if slot.head_reduce == "mean":
            lines.append(f"        acc_{k} = acc_{k} / H")
        lines += ["        for j_h in range(0, head_rows):",
                  f"            tl.store(out_ptr + ({k} * rows + i_bh * H + j_h).to(tl.int64) * NS + o_n, acc_{k}, "
                  "mask=m_val)"]
    return _kernel("score_heads", program_globals, names, lines)


def generate(policy: dsl.Policy) -> Program:
    """The generated module's source and the facts needed to launch it."""
    slots, clause_keys = plan_slots(policy)
    program_globals = collect_globals([s.stored for s in slots])
    n_levels = 1 + max((stats_level(g) for g in program_globals), default=-1)
    levels = tuple(tuple(i for i, g in enumerate(program_globals) if stats_level(g) == level)
                   for level in range(n_levels))
    pooled_after = deferred_pools(slots)
    max_halo = max((halo(s.stored) for s in slots), default=0)
    names = Names(policy.signals, policy.directions)
    lines = [HEADER.format(policy=repr(policy).replace("\n", " "))]
    own = tuple(all(own_tiles(program_globals[gi]) for gi in members) for members in levels)
    for level, members in enumerate(levels):
        lines += _stats_kernel(level, members, program_globals, names, own[level])
        lines += _merge_kernel(level, members, program_globals, names)
    if slots:
        lines += _score_kernel(slots, program_globals, names, pooled_after)
    fusable = heads_fusable(slots, pooled_after)
    if fusable:
        lines += _score_heads_kernel(slots, program_globals, names)
    reads_cache = any(s.stored.needs_keys or s.stored.needs_values for s in slots)
    return Program(slots, clause_keys, reads_cache, program_globals, levels, max_halo, own, "\n".join(lines) + "\n",
                   names.signals, names.directions, fusable,
                   tuple(program_globals.index(node) for node in pooled_after),
                   max((halo(s.stored, pooled_after) for s in slots), default=0))


def qk_scale(d: int) -> float:
    return 1.4426950408889634 / math.sqrt(d)
