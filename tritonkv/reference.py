"""Plain PyTorch semantics of every policy node: the source of truth.

Written for clarity, not speed. Every score is computed in float32 from inputs upcast
to float32 and has shape [B, H_kv, N]. The compiled Triton path must agree with this
module: scores within the tolerances stated in tests/tolerances.py, kept tokens exactly
wherever the scores are not tied to within those tolerances.

Selection rules (shared with the kernels):
- a priority is the clause's score (``top``; with ``chunk`` / ``head_reduce`` reduced over
  chunks / heads by clause_transform) or ``score / temperature + Gumbel`` noise (``sample``:
  the Gumbel-top-k trick draws without replacement with P ∝ softmax);
- NaN priorities count as -inf; -0.0 equals +0.0; ties go to the lower token index;
- every head keeps exactly min(budget, N) tokens: a policy of forced windows only that
  leaves part of the budget unused (``sink(4)`` at budget 10) fills it with the most
  recent tokens not kept yet, as if it ended with ``recent()`` (budget.allocate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import dsl
from .budget import Allocation, allocate, fraction_to_count
from .philox import uniform_grid

NORM_EPS = 1e-12  # as torch.nn.functional.normalize: x / max(||x||, eps)
GUMBEL_STREAM_BASE = dsl.MAX_RANDOM_STREAM


def gumbel_stream(clause_index: int) -> int:
    """Philox stream of the Gumbel noise of the selective clause at ``clause_index``."""
    return GUMBEL_STREAM_BASE + clause_index


@dataclass
class Inputs:
    """What scores are computed from: float32 copies of the cache, and the run's seed."""

    keys: torch.Tensor                   # [B, H, N, D]
    values: torch.Tensor                 # [B, H, N, Dv]
    queries: Optional[torch.Tensor]      # [B, Hq, W, D] or None
    seed: int = 0
    signals: Optional[Dict[str, torch.Tensor]] = None      # name -> [B, H, N] (or broadcastable)
    directions: Optional[Dict[str, torch.Tensor]] = None   # name -> [H, D] or [B, H, D]

    @property
    def device(self):
        return self.keys.device

    @property
    def shape(self):
        b, h, n, _ = self.keys.shape
        return b, h, n


# --------------------------------------------------------------------------- primitives


def anchor_similarity(keys: torch.Tensor) -> torch.Tensor:
    """cos(k_i, a) with a = mean_j normalize(k_j): KeyDiff's anchor, per head.

    normalize(x) = x / max(||x||_2, 1e-12); cos(k, a) = normalize(k) . normalize(a).
    A zero key scores 0.
    """
    unit = F.normalize(keys, dim=-1, eps=NORM_EPS)
    anchor = F.normalize(unit.mean(dim=-2, keepdim=True), dim=-1, eps=NORM_EPS)
    return (unit * anchor).sum(-1)


def key_norm(keys: torch.Tensor) -> torch.Tensor:
    """||k_i||_2."""
    return torch.linalg.vector_norm(keys, dim=-1)


def value_norm(values: torch.Tensor) -> torch.Tensor:
    """||v_i||_2."""
    return torch.linalg.vector_norm(values, dim=-1)


def signal(values: torch.Tensor, shape) -> torch.Tensor:
    """signal(name): the tensor passed as ``signals[name]``, converted to float32 (exact from
    fp16 / bf16 and from integers below 2^24, round to nearest from fp64 and larger integers),
    broadcast to [B, H, N]."""
    return values.float().expand(shape)


def key_dot(keys: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """key_dot(name): k_i . u = sum_d k_i[d] u[d] in float32, u the head's direction
    ``directions[name]`` ([H, D] shared by the batch, or [B, H, D])."""
    u = direction.float()
    u = u if u.ndim == 3 else u.unsqueeze(0)
    return (keys * u.unsqueeze(-2)).sum(-1)


def position(shape, device=None) -> torch.Tensor:
    """i / N for token i."""
    b, h, n = shape
    return (torch.arange(n, dtype=torch.float32, device=device) / n).expand(b, h, n)


def proxy_window(node: dsl.ProxyAttention, n: int, available: int) -> int:
    """How many of the ``available`` proxy queries the node uses (the last ones)."""
    if node.window is None:
        return available
    if isinstance(node.window, float):
        w = max(1, min(n, math.floor(node.window * n + 0.5)))
    else:
        w = node.window
    if w > available:
        raise ValueError(f"queries: {node!r} needs the last {w} proxy queries, "
                         f"but queries has only {available} (dim 2)")
    return w


def _reduce(x: torch.Tensor, how: str, dim: int) -> torch.Tensor:
    if how == "mean":
        return x.mean(dim)
    if how == "sum":
        return x.sum(dim)
    return x.amax(dim)


def pool1d(x: torch.Tensor, kernel: int, mode: str) -> torch.Tensor:
    """Pool over the last dim, stride 1, same length, centred window of ``kernel``.

    avg: sum over the window / kernel, tokens outside [0, N) count as 0 (PyTorch's
    avg_pool1d with count_include_pad=True, as SnapKV uses it); max: outside is -inf.
    """
    if kernel == 1:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    if mode == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    return out.reshape(shape)


def proxy_attention(node: dsl.ProxyAttention, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Attention of the proxy queries to every key, per KV head.

    With q the last w rows of ``queries`` (the last w positions of the sequence, so row r
    sits at position N - w + r):
      p[g, r, i] = softmax_i(q[g, r] . k[i] / sqrt(D))   over keys i <= N - w + r if causal,
                                                          over all keys otherwise;
      s[g, i]    = reduce_r p[g, r, i]                    (mean / sum / max over the window);
      s[g, i]    = pool(s[g, :])[i]                        (per query head, see pool1d);
      score[i]   = group_reduce_g s[g, i]                  over the H_q / H_kv query heads
                                                           of the KV head (GQA).
    With ``exclude_window`` (SnapKV's boundary rule) the pooling sees only the keys before
    the window, s[g, :N - w] (so avg pooling pads with 0 and max pooling with -inf where the
    window starts), and the window's own keys i >= N - w score 0.
    Computed in float32.
    """
    b, h_kv, n, d = keys.shape
    h_q = queries.shape[1]
    group = h_q // h_kv
    w = proxy_window(node, n, queries.shape[2])
    q = queries[:, :, -w:, :].reshape(b, h_kv, group, w, d)
    logits = torch.einsum("bhgwd,bhnd->bhgwn", q, keys) / math.sqrt(d)
    if node.causal:
        query_pos = torch.arange(n - w, n, device=keys.device).view(w, 1)
        logits = logits.masked_fill(torch.arange(n, device=keys.device).view(1, n) > query_pos, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    per_query_head = _reduce(probs, node.reduce, dim=3)
    if node.exclude_window:   # SnapKV: the window's keys are cut off, the prefix pooled alone
        prefix = per_query_head[..., : n - w]
        if n > w:
            prefix = pool1d(prefix, node.pool_kernel, node.pool_mode)
        per_query_head = F.pad(prefix, (0, w), value=0.0)
    else:
        per_query_head = pool1d(per_query_head, node.pool_kernel, node.pool_mode)
    return _reduce(per_query_head, node.group_reduce, dim=2)


def attention_signal(logits: torch.Tensor, lse: torch.Tensor, group: int, how: str) -> torch.Tensor:
    """One query's attention to every key, combined over each KV head's query heads: the
    ``proxy_attention(window=1, group_reduce=how)`` score, from the logits an attention
    kernel already computed (kernels/decode.py's ``scores``). ``logits`` [B, H_q, N] and
    ``lse`` [B, H_q] are in base 2 (lse = log2 sum_n 2^logits); query head j belongs to KV
    head j // group. Returns float32 [B, H_q / group, N]:
      score[b, h, n] = how_g 2^(logits[b, h * group + g, n] - lse[b, h * group + g])."""
    b, hq, n = logits.shape
    p = torch.exp2(logits.float() - lse.float()[..., None])
    return _reduce(p.view(b, hq // group, group, n), how, dim=2)


def recency_ranked(score: torch.Tensor, positions: torch.Tensor, newest: torch.Tensor, recent: int) -> torch.Tensor:
    """``score`` [B, H, N] with +inf where ``positions`` [B, H, N] is above ``newest`` [B, H, 1]
    minus ``recent``: the one-clause form of ``top(position(), count=recent) | top(score)``
    (accumulated H2O) for rows that hold their ``recent`` newest positions, consecutive, up to
    ``newest``: ``top(rank)`` then keeps the same tokens, the newest first and the rest by score
    with the same ties. A cache that evicts that policy every step keeps that invariant
    (integrations/step_scores.py)."""
    return torch.where(positions > newest - recent, torch.full_like(score, float("inf")), score.float())


def random(node: dsl.Random, shape, seed: int, device=None) -> torch.Tensor:
    """Uniform [0, 1) from Philox keyed by (seed, batch, head, token, stream); see philox.py."""
    b, h, n = shape
    return uniform_grid(seed, b, h, n, node.stream, device)


NORMALIZE_RTOL = 1e-6


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the tokens of each head, std the population standard
    deviation. A head whose scores are equal to float32 precision (std <= 1e-6 * |mean|)
    gets 0 everywhere: dividing rounding noise by rounding noise would give arbitrary
    values (e.g. KeyDiff's cosines of two keys, equal in exact arithmetic)."""
    mean = x.mean(-1, keepdim=True)
    std = (x - mean).square().mean(-1, keepdim=True).sqrt()
    return torch.where(std > NORMALIZE_RTOL * mean.abs(), (x - mean) / std, torch.zeros_like(x))


def softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(x / temperature) over the tokens of each head."""
    return torch.softmax(x / temperature, dim=-1)


# --------------------------------------------------------------------------- expressions


def score(node: dsl.Score, inputs: Inputs, memo: Optional[Dict] = None) -> torch.Tensor:
    """Evaluate a score expression to float32 [B, H_kv, N]."""
    memo = {} if memo is None else memo
    if node in memo:
        return memo[node]
    sub = lambda child: score(child, inputs, memo)  # noqa: E731
    if isinstance(node, dsl.AnchorSimilarity):
        out = anchor_similarity(inputs.keys)
    elif isinstance(node, dsl.KeyNorm):
        out = key_norm(inputs.keys)
    elif isinstance(node, dsl.ValueNorm):
        out = value_norm(inputs.values)
    elif isinstance(node, dsl.Position):
        out = position(inputs.shape, inputs.device)
    elif isinstance(node, dsl.Random):
        out = random(node, inputs.shape, inputs.seed, inputs.device)
    elif isinstance(node, dsl.Signal):
        out = signal(_named(inputs.signals, "signals", node), inputs.shape)
    elif isinstance(node, dsl.KeyDot):
        out = key_dot(inputs.keys, _named(inputs.directions, "directions", node))
    elif isinstance(node, dsl.ProxyAttention):
        if inputs.queries is None:
            raise ValueError(f"queries: the policy uses {node!r}, which needs proxy queries; "
                             f"pass queries=[B, H_q, W, D]")
        out = proxy_attention(node, inputs.keys, inputs.queries)
    elif isinstance(node, dsl.Const):
        out = torch.full(inputs.shape, node.value, dtype=torch.float32, device=inputs.device)
    elif isinstance(node, dsl.Neg):
        out = -sub(node.operand)
    elif isinstance(node, dsl.BinaryOp):
        left, right = sub(node.left), sub(node.right)
        out = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[node.op](left, right)
    elif isinstance(node, dsl.Pool):
        out = pool1d(sub(node.operand), node.kernel, node.mode)
    elif isinstance(node, dsl.Normalize):
        out = normalize(sub(node.operand))
    elif isinstance(node, dsl.Softmax):
        out = softmax(sub(node.operand), node.temperature)
    else:  # pragma: no cover
        raise TypeError(f"unknown score node {node!r}")
    out = out.to(torch.float32).expand(inputs.shape)
    memo[node] = out
    return out


def _named(tensors: Optional[Dict[str, torch.Tensor]], argument: str, node) -> torch.Tensor:
    if not tensors or node.name not in tensors:
        raise ValueError(f"{argument}: the policy uses {node!r}; pass {argument}={{{node.name!r}: tensor}}")
    return tensors[node.name]


# --------------------------------------------------------------------------- selection


def gumbel(shape, seed: int, stream: int, device=None) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)), u uniform from Philox (u = 0 gives -inf)."""
    b, h, n = shape
    u = uniform_grid(seed, b, h, n, stream, device)
    return -torch.log(-torch.log(u))


def _nan_as_lowest(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)


def head_reduce(x: torch.Tensor, how: str) -> torch.Tensor:
    """Every KV head of a batch row gets the reduce ("mean", "sum", "max") of x over the
    row's heads; NaN counts as -inf."""
    x = _nan_as_lowest(x)
    return _reduce(x, how, dim=1).unsqueeze(1).expand_as(x)


def chunk_reduce(x: torch.Tensor, chunk: int, how: str) -> torch.Tensor:
    """Every token gets the reduce of x over its chunk: chunk j holds positions
    [j * chunk, (j + 1) * chunk), the last one what is left of N. "sum" and "max" run over the
    chunk's tokens, "mean" is their sum / their count; NaN counts as -inf."""
    n = x.shape[-1]
    x = _nan_as_lowest(x)
    pad = -n % chunk
    padded = F.pad(x, (0, pad), value=float("-inf") if how == "max" else 0.0)
    grouped = padded.reshape(*x.shape[:-1], -1, chunk)
    if how == "max":
        per_chunk = grouped.amax(-1)
    else:
        per_chunk = grouped.sum(-1)
        if how == "mean":
            counts = torch.full((per_chunk.shape[-1],), float(chunk), device=x.device)
            counts[-1] = n - (per_chunk.shape[-1] - 1) * chunk
            per_chunk = per_chunk / counts
    return per_chunk.repeat_interleave(chunk, dim=-1)[..., :n]


def clause_transform(clause: dsl.Clause, x: torch.Tensor) -> torch.Tensor:
    """What a top clause with ``head_reduce`` / ``chunk`` ranks by: first the reduce over the
    row's KV heads, then the reduce over each chunk. Ranking stays token by token, ties to
    the lower index: a chunk's tokens tie, so chunks are taken whole, best first, the lower
    chunk first among equal ones, and the last chunk taken is cut to the clause's count
    (earliest tokens first). Tokens already kept (the forced windows, earlier clauses) still
    count in their chunk's score but are not taken again: a chunk that overlaps a window
    contributes its other tokens."""
    if isinstance(clause, dsl.Top) and clause.head_reduce is not None:
        x = head_reduce(x, clause.head_reduce)
    if isinstance(clause, dsl.Top) and clause.chunk > 1:
        x = chunk_reduce(x, clause.chunk, clause.chunk_reduce)
    return x


def priority(clause: dsl.Clause, clause_score: torch.Tensor, clause_index: int, seed: int) -> torch.Tensor:
    """What a selective clause ranks by: its score (through clause_transform), or
    score / temperature + Gumbel."""
    if isinstance(clause, dsl.Sample):
        inverse_t = torch.tensor(1.0 / clause.temperature, dtype=torch.float32, device=clause_score.device)
        return clause_score * inverse_t + gumbel(clause_score.shape, seed, gumbel_stream(clause_index), clause_score.device)
    return clause_transform(clause, clause_score)


def rank_key(p: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf and -0.0 -> +0.0, so the ordering is the one the kernels use."""
    p = _nan_as_lowest(p)
    return torch.where(p == 0, torch.zeros_like(p), p)


def take_top(p: torch.Tensor, taken: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` highest ``p`` among tokens not ``taken`` (ties: lower index)."""
    if count == 0:
        return torch.zeros_like(taken)
    order = torch.sort(rank_key(p), dim=-1, descending=True, stable=True).indices
    # stable sort by "already taken" keeps candidates first, still in priority order
    order = torch.gather(order, -1, torch.sort(torch.gather(taken, -1, order).to(torch.int8),
                                               dim=-1, stable=True).indices)
    chosen = torch.zeros_like(taken)
    chosen.scatter_(-1, order[..., :count], True)
    return chosen


def forced_mask(alloc: Allocation, shape, device=None) -> torch.Tensor:
    b, h, n = shape
    i = torch.arange(n, device=device)
    return ((i < alloc.n_sink) | (i >= n - alloc.n_recent)).expand(b, h, n).clone()


def clause_priorities(policy: dsl.Policy, inputs: Inputs):
    """What each selective clause ranks by, float32 [B, H_kv, N] each, in clause order."""
    memo: Dict = {}
    return [priority(clause, score(clause.score, inputs, memo), index, inputs.seed)
            for index, clause in enumerate(policy.selective)]


def select_by_priority(alloc: Allocation, priorities, shape, device=None) -> torch.Tensor:
    """Kept-token mask: the forced windows, then each clause's top ``count`` priorities
    among the tokens not kept yet, in clause order."""
    kept = forced_mask(alloc, shape, device)
    for p, count in zip(priorities, alloc.clause_counts):
        kept |= take_top(p, kept, count)
    return kept


def select(policy: dsl.Policy, inputs: Inputs, k: int) -> torch.Tensor:
    """Kept-token mask [B, H_kv, N] of a policy with a uniform per-head budget ``k``."""
    alloc = allocate(policy, inputs.shape[2], k)
    return select_by_priority(alloc, clause_priorities(policy, inputs), inputs.shape, inputs.device)


def select_adaptive(policy: dsl.Policy, inputs: Inputs, k: int) -> torch.Tensor:
    """AdaKV (arXiv 2407.11550): one budget of H * k tokens per batch row, spread across
    heads by score; see select_adaptive_by_priority."""
    alloc = allocate(policy, inputs.shape[2], k)
    return select_adaptive_by_priority(policy, alloc, score(policy.selective[0].score, inputs))


def select_adaptive_by_priority(policy: dsl.Policy, alloc: Allocation, s: torch.Tensor) -> torch.Tensor:
    """Each head keeps its forced tokens and, as a floor, the top round(head_floor * R) of
    its own candidates (R = what the forced tokens leave of k); the rest of the row's budget
    goes to the highest scores over all heads (ties: lower head, then lower token)."""
    b, h, n = s.shape
    remainder = alloc.clause_counts[0]
    kept = forced_mask(alloc, s.shape, s.device)
    floor = min(remainder, fraction_to_count(policy.head_floor, remainder))
    kept |= take_top(s, kept, floor)
    pooled = take_top(s.reshape(b, 1, h * n), kept.reshape(b, 1, h * n), h * (remainder - floor))
    return kept | pooled.reshape(b, h, n)


# --------------------------------------------------------------------------- gathering


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, h, index[b, h, j], :] as [B, H, n_kept, D]."""
    return torch.gather(x, 2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def hole_sources(indices: torch.Tensor) -> torch.Tensor:
    """Where each of the first ``n_kept`` slots takes its row from when the kept rows are
    compacted without keeping their order (what tritonkv.kernels.holes does in place).

    ``indices`` [B, H, n_kept]: the kept slots of each row, ascending (what evict returns).
    A kept slot below n_kept stays where it is; the r-th slot below n_kept that is not kept
    (a hole, in ascending order) takes the r-th kept slot at or past n_kept (ascending).
    Returns int64 [B, H, n_kept]: slot j's source (j itself where nothing moves)."""
    k = indices.shape[-1]
    if k == 0:
        return indices.clone()
    width = max(k, int(indices.max()) + 1)
    kept = torch.zeros(*indices.shape[:-1], width, dtype=torch.bool, device=indices.device)
    kept = kept.scatter_(-1, indices, True)[..., :k]
    holes = ~kept
    rank = holes.long().cumsum(-1) - 1                                 # the r of each hole
    moved = holes.sum(-1, keepdim=True)                                # kept slots >= k: as many as holes
    first = k - moved                                                  # where they start in indices
    source = indices.gather(-1, (first + rank).clamp(0, k - 1))
    slots = torch.arange(k, device=indices.device).expand_as(indices)
    return torch.where(holes, source, slots)


def kept_indices(kept: torch.Tensor) -> torch.Tensor:
    """Ascending token indices of a mask with the same count in every row: [B, H, n_kept]."""
    b, h, n = kept.shape
    count = int(kept[0, 0].sum()) if kept.numel() else 0
    positions = torch.arange(n, device=kept.device).expand(b, h, n)
    return positions[kept].view(b, h, count)


def slot_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor,
                   length: torch.Tensor, scale: float) -> torch.Tensor:
    """What tritonkv.kernels.decode computes, in float64: softmax(q . k * scale) v of each
    query head [B, H_q, 1, D] over the slots [start[b], length) of its KV head (GQA:
    query head j reads KV head j // (H_q / H_kv)); returns [B, 1, H_q, D_v] float64."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    s = torch.einsum("bhqd,bhnd->bhqn", query.double(), k) * scale
    slots = torch.arange(keys.shape[2], device=keys.device)
    seen = (slots >= start[:, None].to(slots.device)) & (slots < length.to(slots.device))
    s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
    return torch.einsum("bhqn,bhnd->bqhd", s.softmax(-1), v)
