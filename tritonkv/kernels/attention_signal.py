"""One query's attention probabilities, combined over each KV head's query heads, from logits
an attention kernel already wrote: the ``proxy_attention(window=1)`` score (TOVA's) of the
token a decode step just attended with, without reading the keys again.

kernels/decode.py's ``scores`` output holds, per query head, the logits of every slot and
their log-sum-exp, both in base 2. Here one program takes one (row, KV head) and a block of
slots: it loads the G query heads' logits [G, BLOCK] (G * 4 bytes per slot, against the
key's D * 2 that a proxy-attention pass reads) and writes ``reduce_g 2^(logit - lse)``,
float32 [B, H_kv, N]: what a ``signal`` of the policy reads (reference.attention_signal).
With ``accumulate`` it adds them to what ``out`` holds instead: the attention every decoded
token paid each slot, summed over the decode steps (H2O's accumulated attention); ``fresh``
names a slot (a device index) whose sum starts from 0 there, the one the step's token went to.
With ``rank`` (and ``positions``, ``recent``) it also writes the accumulated H2O's one-clause
ranking (reference.recency_ranked): +inf where a slot's position is among the ``recent`` newest
(above the fresh slot's position minus ``recent``), else the sum.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import cdiv, check_float32, interpreting, next_power_of_2
from .launch import launch
from ..reference import attention_signal as attention_signal_reference, recency_ranked

SIGNAL_WARPS = 4
BLOCK = 1024
HOW_CODES = {"mean": 0, "sum": 1, "max": 2}


@triton.jit
def _attention_signal_kernel(sc_ptr, lse_ptr, out_ptr, fresh_ptr, pos_ptr, rank_ptr, s_scb, s_sch, s_scn, s_lb,
                             s_lh, s_ob, s_oh, s_on, s_pb, s_ph, s_pn, s_rb, s_rh, s_rn, H, N, recent,
                             G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HOW: tl.constexpr,
                             ACCUMULATE: tl.constexpr, FRESH: tl.constexpr, RANK: tl.constexpr):
    i_bh, i_n = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_g = tl.arange(0, G_PAD)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_g, m_n = o_g < G, o_n < N
    heads = (i_h * G + o_g).to(tl.int64)
    lse = tl.load(lse_ptr + i_b.to(tl.int64) * s_lb + heads * s_lh, mask=m_g, other=0.0)
    p_sc = sc_ptr + i_b.to(tl.int64) * s_scb + heads[:, None] * s_sch + o_n.to(tl.int64)[None, :] * s_scn
    s = tl.load(p_sc, mask=m_g[:, None] & m_n[None, :], other=float("-inf"))
    p = tl.exp2(s - lse[:, None])                       # padding heads: 2^-inf = 0
    if HOW == 2:
        out = tl.max(tl.where(m_g[:, None], p, float("-inf")), 0)
    else:
        out = tl.sum(p, 0)
        if HOW == 0:
            out = out / G
    p_out = out_ptr + i_b.to(tl.int64) * s_ob + i_h.to(tl.int64) * s_oh + o_n.to(tl.int64) * s_on
    if ACCUMULATE:   # one program owns each element: a plain read-modify-write
        prior = tl.load(p_out, mask=m_n, other=0.0)
        if FRESH:    # the slot just written holds a new token: nothing accumulated yet
            prior = tl.where(o_n == tl.load(fresh_ptr), 0.0, prior)
        out += prior
    tl.store(p_out, out, mask=m_n)
    if RANK:   # the fresh slot holds the row's newest position; the `recent` newest rank first
        p_pos = pos_ptr + i_b.to(tl.int64) * s_pb + i_h.to(tl.int64) * s_ph
        newest = tl.load(p_pos + tl.load(fresh_ptr) * s_pn)
        pos = tl.load(p_pos + o_n.to(tl.int64) * s_pn, mask=m_n, other=0)
        rank = tl.where(pos > newest - recent, float("inf"), out)
        tl.store(rank_ptr + i_b.to(tl.int64) * s_rb + i_h.to(tl.int64) * s_rh + o_n.to(tl.int64) * s_rn, rank,
                 mask=m_n)


def _check(logits, lse, group, how, out, accumulate, fresh, rank, positions, recent) -> None:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.dtype != torch.float32:
        raise ValueError(f"logits: expected a float32 tensor [B, H_q, N], got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {list(getattr(logits, 'shape', []))}")
    b, hq, n = logits.shape
    check_float32("lse", lse, (b, hq), logits.device)
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or hq % group:
        raise ValueError(f"group: expected query heads per KV head, an int dividing H_q = {hq}, got {group!r}")
    if how not in HOW_CODES:
        raise ValueError(f"how: expected one of {tuple(HOW_CODES)}, got {how!r}")
    if not isinstance(accumulate, bool):
        raise ValueError(f"accumulate: expected a bool, got {accumulate!r}")
    if accumulate and out is None:
        raise ValueError("out: accumulate=True adds to out, which must be given")
    if fresh is not None and (not accumulate or not isinstance(fresh, torch.Tensor) or fresh.numel() != 1
                              or fresh.dtype != torch.int64 or fresh.device != logits.device):
        raise ValueError(f"fresh: expected (with accumulate=True) an int64 tensor of one slot index on "
                         f"{logits.device}, got {getattr(fresh, 'dtype', type(fresh).__name__)} "
                         f"{list(getattr(fresh, 'shape', []))}")
    if out is not None:
        check_float32("out", out, (b, hq // group, n), logits.device)
    if rank is None:
        if positions is not None or recent:
            raise ValueError("positions, recent: they describe the rank output, which was not given")
        return
    if fresh is None:
        raise ValueError("rank: ranks by the fresh slot's position, so accumulate=True and fresh must be given")
    check_float32("rank", rank, (b, hq // group, n), logits.device)
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64 \
            or tuple(positions.shape) != (b, hq // group, n) or positions.device != logits.device:
        raise ValueError(f"positions: expected an int64 tensor {[b, hq // group, n]} on {logits.device}, got "
                         f"{getattr(positions, 'dtype', type(positions).__name__)} "
                         f"{list(getattr(positions, 'shape', []))}")
    if isinstance(recent, bool) or not isinstance(recent, int) or not 0 <= recent <= n:
        raise ValueError(f"recent: expected an int in [0, N = {n}], got {recent!r}")


def attention_signal(logits: torch.Tensor, lse: torch.Tensor, group: int, how: str = "mean",
                     out: Optional[torch.Tensor] = None, accumulate: bool = False,
                     fresh: Optional[torch.Tensor] = None, rank: Optional[torch.Tensor] = None,
                     positions: Optional[torch.Tensor] = None, recent: int = 0) -> torch.Tensor:
    """``reference.attention_signal`` into ``out`` (float32 [B, H_q / group, N], any strides;
    allocated when None), or added to it (``accumulate``; ``fresh``: an int64 device index of
    one slot whose prior value counts as 0 in every row); with ``rank`` (float32, as ``out``),
    also ``reference.recency_ranked`` of the result by ``positions`` (int64, as ``out``), the
    newest position of each row the one at ``fresh``. One launch that reads no device value on
    the host (CUDA-graph safe). CPU tensors outside Triton's interpreter take the PyTorch
    reference."""
    _check(logits, lse, group, how, out, accumulate, fresh, rank, positions, recent)
    b, hq, n = logits.shape
    if out is None:
        out = torch.empty(b, hq // group, n, dtype=torch.float32, device=logits.device)
    if not (logits.is_cuda or interpreting()):
        signal = attention_signal_reference(logits, lse, group, how)
        if fresh is not None:
            out.index_fill_(2, fresh.view(1), 0.0)
        out.add_(signal) if accumulate else out.copy_(signal)
        if rank is not None:
            newest = positions.index_select(2, fresh.view(1))
            rank.copy_(recency_ranked(out, positions, newest, recent))
        return out
    launch(*attention_signal_launch(logits, lse, group, how, out, accumulate, fresh, rank, positions, recent))
    return out


def attention_signal_launch(logits: torch.Tensor, lse: torch.Tensor, group: int, how: str, out: torch.Tensor,
                            accumulate: bool = False, fresh: Optional[torch.Tensor] = None,
                            rank: Optional[torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
                            recent: int = 0):
    """The launch ``(fn, grid, args, constexprs, num_warps)`` of attention_signal."""
    b, hq, n = logits.shape
    h = hq // group
    ranked = rank is not None
    return (_attention_signal_kernel, (b * h, cdiv(n, BLOCK)),
            [logits, lse, out, lse if fresh is None else fresh,   # placeholders the kernel never reads
             positions if ranked else lse, rank if ranked else lse,
             *logits.stride(), *lse.stride(), *out.stride(), *(positions.stride() if ranked else (0, 0, 0)),
             *(rank.stride() if ranked else (0, 0, 0)), h, n, recent],
            dict(G=group, G_PAD=next_power_of_2(group), BLOCK_N=BLOCK, HOW=HOW_CODES[how], ACCUMULATE=accumulate,
                 FRESH=fresh is not None, RANK=ranked),
            SIGNAL_WARPS)
