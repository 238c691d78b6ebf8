"""Attention of one new query per (row, query head) over a fixed-capacity slot buffer, split
over the keys (flash decoding), reading which slots are occupied from the device.

A StaticEvictingCache layer holds C slots per (row, KV head); row b's tokens sit in slots
``[start[b], length)``. SDPA can only read them through a boolean mask over all C slots,
and with a mask PyTorch picks the memory-efficient kernel, whose grid for one query is
B * H_q programs that each stream all C keys: on an H200 that is ~0.7 ms per layer at
13K slots, 25x the time to read them. Here the grid is (B * H_kv, splits): each program
takes one contiguous chunk of slots for all G query heads of its KV head (GQA packed:
each key tile is read once for the group, and the [G, D] query tile feeds tensor cores),
and keeps a float32 online softmax (max m, sum l of 2^(s - m), output acc). A second
kernel merges the splits' partials by their maxima; with one split (short buffers, or enough
rows to fill the GPU) the split kernel normalizes and writes the output itself and the
merge launch is left out. The number of splits depends on the shapes only, never on
``length``: a CUDA graph replays the same launches every step, and chunks past ``length``
(or before ``start``) finish at once with an empty partial.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import cdiv, check_float32, ieee_products, multiprocessor_count, next_power_of_2
from .launch import launch
from .proxy import _logits

DECODE_WARPS = 4
MIN_CHUNK = 256          # slots per split at least: shorter chunks cost more to merge than to read


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, start_ptr, length_ptr, part_o_ptr, part_ml_ptr,
                         sc_ptr, s_scb, s_sch, s_scn, out_ptr, s_ob, s_oh, s_od, lse_ptr, s_lb, s_lh,
                         s_qb, s_qh, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                         H, CHUNK, SPLITS,
                         D: tl.constexpr, DV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         QK_SCALE: tl.constexpr, IEEE: tl.constexpr, SCORES: tl.constexpr,
                         DIRECT: tl.constexpr):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    lo = tl.maximum(tl.load(start_ptr + i_b).to(tl.int32), i_s * CHUNK)
    hi = tl.minimum(tl.load(length_ptr).to(tl.int32), i_s * CHUNK + CHUNK)
    o_g, o_d, o_dv = tl.arange(0, G_PAD), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_g = o_g < G
    p_q = q_ptr + i_b.to(tl.int64) * s_qb + (i_h * G + o_g).to(tl.int64)[:, None] * s_qh + o_d[None, :] * s_qd
    b_q = tl.load(p_q, mask=m_g[:, None] & (o_d[None, :] < D), other=0.0)
    k_base = k_ptr + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    v_base = v_ptr + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):   # every tile holds at least one occupied slot
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < hi
        b_k = tl.load(k_base + o_n.to(tl.int64)[:, None] * s_kn + o_d[None, :] * s_kd,
                      mask=m_n[:, None] & (o_d[None, :] < D), other=0.0)
        s = tl.where(m_n[None, :], _logits(b_q, b_k, QK_SCALE, IEEE), float("-inf"))
        if SCORES:   # the logits of the G query heads, for a policy scored by this very query
            p_sc = sc_ptr + i_b.to(tl.int64) * s_scb + (i_h * G + o_g).to(tl.int64)[:, None] * s_sch \
                + o_n.to(tl.int64)[None, :] * s_scn
            tl.store(p_sc, s, mask=m_g[:, None] & m_n[None, :])
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        b_v = tl.load(v_base + o_n.to(tl.int64)[:, None] * s_vn + o_dv[None, :] * s_vd,
                      mask=m_n[:, None] & (o_dv[None, :] < DV), other=0.0)
        if IEEE:
            pv = tl.dot(p, b_v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(b_v.dtype), b_v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    if DIRECT:   # one split: this program holds the whole row; what the merge would write
        p_o = out_ptr + i_b.to(tl.int64) * s_ob + (i_h * G + o_g).to(tl.int64)[:, None] * s_oh \
            + o_dv[None, :] * s_od
        tl.store(p_o, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=m_g[:, None] & (o_dv[None, :] < DV))
        if SCORES:
            p_l = lse_ptr + i_b.to(tl.int64) * s_lb + (i_h * G + o_g).to(tl.int64) * s_lh
            tl.store(p_l, m + tl.log2(l), mask=m_g)
    else:
        row = i_bh * SPLITS + i_s
        tl.store(part_ml_ptr + (row * 2) * G_PAD + o_g, m)
        tl.store(part_ml_ptr + (row * 2 + 1) * G_PAD + o_g, l)
        tl.store(part_o_ptr + (row * G_PAD + o_g)[:, None] * BLOCK_DV + o_dv[None, :], acc)


@triton.jit
def _decode_merge_kernel(part_o_ptr, part_ml_ptr, out_ptr, s_ob, s_oh, s_od, lse_ptr, s_lb, s_lh, H, SPLITS,
                         G: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                         SCORES: tl.constexpr):
    """out[b, h * G + g] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits
    (and with SCORES, lse[b, h * G + g] = M + log2(sum_s 2^(m_s - M) l_s))."""
    i_bh, g = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_dv = tl.arange(0, BLOCK_DV)
    # running max and sum, broadcast over the output's columns (one loop-carried type);
    # -1e30 rather than -inf: an empty split's m = -inf then weighs 2^-inf = 0, never NaN
    m_tot = tl.full([BLOCK_DV], -1e30, tl.float32)
    l_tot = tl.zeros([BLOCK_DV], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for i_s in range(0, SPLITS):
        row = i_bh * SPLITS + i_s
        m_s = tl.load(part_ml_ptr + (row * 2) * G_PAD + g)
        l_s = tl.load(part_ml_ptr + (row * 2 + 1) * G_PAD + g)
        m_new = tl.maximum(m_tot, m_s)
        a_old, a_s = tl.exp2(m_tot - m_new), tl.exp2(m_s - m_new)
        acc = acc * a_old + a_s * tl.load(part_o_ptr + (row * G_PAD + g) * BLOCK_DV + o_dv)
        l_tot = l_tot * a_old + a_s * l_s
        m_tot = m_new
    p_o = out_ptr + i_b.to(tl.int64) * s_ob + (i_h * G + g).to(tl.int64) * s_oh + o_dv * s_od
    tl.store(p_o, (acc / l_tot).to(out_ptr.dtype.element_ty), mask=o_dv < DV)
    if SCORES:   # m_tot and l_tot hold one value in every column: store column 0's
        p_l = lse_ptr + i_b.to(tl.int64) * s_lb + (i_h * G + g).to(tl.int64) * s_lh + o_dv * 0
        tl.store(p_l, m_tot + tl.log2(l_tot), mask=o_dv == 0)


def splits_for(batch_heads: int, capacity: int, device: torch.device) -> int:
    """Splits of the slots per (row, KV head): enough programs for two waves of the GPU's
    multiprocessors, no chunk under MIN_CHUNK slots. A function of the shapes alone."""
    programs = 2 * (multiprocessor_count(device) if device.type == "cuda" else 4)
    return max(1, min(cdiv(programs, batch_heads), cdiv(capacity, MIN_CHUNK)))


def decode_launches(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor,
                    length: torch.Tensor, scale: float, scores=None):
    """([(kernel, grid, args, constexprs, num_warps)] of the split and merge kernels, output) of
    :func:`decode_attention` (also what tritonkv.aot compiles)."""
    b, hq, t, d = query.shape
    _, h, c, dk = keys.shape
    dv = values.shape[-1]
    if t != 1:
        raise ValueError(f"query: expected one query per row [B, H_q, 1, D], got {tuple(query.shape)}")
    if dk != d or hq % h or values.shape[:3] != keys.shape[:3] or keys.shape[0] != b:
        raise ValueError(f"keys / values: expected [B={b}, H_kv dividing {hq}, C, D={d}] and [B, H_kv, C, D_v], "
                         f"got {tuple(keys.shape)} and {tuple(values.shape)}")
    if scores is not None:
        check_float32("scores[0] (logits)", scores[0], (b, hq, c), keys.device)
        check_float32("scores[1] (lse)", scores[1], (b, hq), keys.device)
    group = hq // h
    g_pad = max(16, next_power_of_2(group))            # tl.dot's smallest tile
    block_d, block_dv = max(16, next_power_of_2(d)), max(16, next_power_of_2(dv))
    block_n = 64 if max(block_d, block_dv) <= 128 else 32
    device = keys.device
    splits = splits_for(b * h, c, device)
    chunk = cdiv(cdiv(c, splits), block_n) * block_n
    direct = splits == 1
    out = torch.empty(b, 1, hq, dv, dtype=query.dtype, device=device)
    q, o = query[:, :, 0], out[:, 0]
    if direct:   # one split writes the output itself: its partials are placeholders it never touches
        part_o = part_ml = out
    else:
        part_o = torch.empty(b * h * splits, g_pad, block_dv, dtype=torch.float32, device=device)
        part_ml = torch.empty(b * h * splits, 2, g_pad, dtype=torch.float32, device=device)
    # without scores the pointers are placeholders the kernels never touch
    logits, lse = scores if scores is not None else (out, out)
    s_logits = logits.stride() if scores is not None else (0, 0, 0)
    s_lse = lse.stride() if scores is not None else (0, 0)
    split = (_decode_split_kernel, (b * h, splits),
             [q, keys, values, start, length, part_o, part_ml, logits, *s_logits,
              o, o.stride(0), o.stride(1), o.stride(2), lse, *s_lse,
              q.stride(0), q.stride(1), q.stride(2), *keys.stride(), *values.stride(), h, chunk, splits],
             dict(D=d, DV=dv, G=group, G_PAD=g_pad, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
                  QK_SCALE=scale * math.log2(math.e), IEEE=ieee_products(keys.dtype), SCORES=scores is not None,
                  DIRECT=direct),
             DECODE_WARPS)
    if direct:
        return [split], out
    merge = (_decode_merge_kernel, (b * h, group),
             [part_o, part_ml, o, o.stride(0), o.stride(1), o.stride(2), lse, *s_lse, h, splits],
             dict(G=group, G_PAD=g_pad, DV=dv, BLOCK_DV=block_dv, SCORES=scores is not None), DECODE_WARPS)
    return [split, merge], out


def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor,
                     length: torch.Tensor, scale: float, scores=None) -> torch.Tensor:
    """Softmax attention of ``query`` [B, H_q, 1, D] over the slots ``[start[b], length)`` of
    ``keys`` [B, H_kv, C, D] / ``values`` [B, H_kv, C, D_v] (H_q a multiple of H_kv: query
    head j reads KV head j // (H_q / H_kv)), scores scaled by ``scale``. ``start`` [B] and
    ``length`` (0-d) are integer device tensors; every row must see at least one slot (the
    output of a row that sees none is NaN). Reads no device value on the host: capturable
    in a CUDA graph. Returns [B, 1, H_q, D_v] in the query's dtype (transformers' attention
    output layout).

    ``scores`` = (logits, lse), float32 [B, H_q, C] and [B, H_q] (any strides), also receive
    the attention's logits and normalizer in base 2: ``logits[b, j, n] = q_j . k_n * scale *
    log2(e)`` for the slots read (the others are not written) and ``lse[b, j] = log2 sum_n
    2^logits[b, j, n]``, so ``2^(logits - lse)`` is the attention itself (what
    kernels/attention_signal.py reduces for a policy scored by this query: TOVA). The
    key tiles are read once for both."""
    launches, out = decode_launches(query, keys, values, start, length, scale, scores)
    for fn, grid, args, constexprs, warps in launches:
        launch(fn, grid, args, constexprs, warps)
    return out
