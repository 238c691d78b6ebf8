"""The attention function that evicting caches run under (``enable``), and the attention math
of layouts SDPA cannot read as they are (AdaKV's packed rows).

A cache layer's ``update()`` announces itself with :func:`expect` and the keys it returned;
the model calls attention right after, with those keys, and the call goes to the layer's
``attend`` (which records proxy queries, attends over its own layout and evicts when due).
Any other attention call is plain SDPA.
"""

from __future__ import annotations

import threading

import torch

try:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover
    raise ImportError("tritonkv.integrations needs transformers: pip install 'tritonkv[hf]'") from e

from ..kernels.common import interpreting
from ..kernels.decode import decode_attention
from ..results import EvictedVarlen

ATTENTION = "tritonkv_sdpa"
_REGISTERED = False
# The layer whose update() ran last in this thread, and the keys it returned: the model calls
# attention right after it.
_CURRENT = threading.local()


def enable(model) -> None:
    """Route the model's attention through tritonkv's (SDPA + proxy queries + eviction)."""
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        _REGISTERED = True
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)


def expect(layer, keys: torch.Tensor) -> None:
    """The next attention call with ``keys`` goes to ``layer.attend``."""
    _CURRENT.layer, _CURRENT.keys = layer, keys


def _attention(module, query, key, value, attention_mask, **kwargs):
    layer, keys = getattr(_CURRENT, "layer", None), getattr(_CURRENT, "keys", None)
    _CURRENT.layer = _CURRENT.keys = None
    if layer is None or key is not keys:   # not an evicting cache's layer: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return layer.attend(module, query, key, value, attention_mask, kwargs), None


ATTENTION_CHOICES = ("auto", "triton", "sdpa")


def check_attention(attention: str) -> str:
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention: expected one of {ATTENTION_CHOICES}, got {attention!r}")
    return attention


def resolve_attention(attention: str, cuda: bool) -> str:
    """What "auto" means: the decode kernel on CUDA, SDPA elsewhere."""
    return ("triton" if cuda else "sdpa") if attention == "auto" else attention


def _plain(module, kwargs) -> bool:
    """Softmax attention the decode kernel computes: no dropout, soft-capping, sliding window
    or attention sinks."""
    dropout = kwargs.get("dropout", 0.0) if module is None or getattr(module, "training", False) else 0.0
    return not dropout and all(kwargs.get(name) is None for name in ("softcap", "sliding_window", "s_aux"))


def attention_scale(query, kwargs) -> float:
    """The model's softmax scale (transformers' ``scaling``; 1 / sqrt(D) when it passes none)."""
    scale = kwargs.get("scaling")
    return query.shape[-1] ** -0.5 if scale is None else scale


def decode_kernel_runs(module, key, kwargs, attention: str) -> bool:
    """Whether :func:`attend_slots` takes the decode kernel for this call (not SDPA)."""
    attention = resolve_attention(attention, key.is_cuda)
    return attention == "triton" and (key.is_cuda or interpreting()) and _plain(module, kwargs)


def attend_slots(module, query, key, value, start, length, visible, kwargs, attention: str, scores=None):
    """One decoded query per row [B, H_q, 1, D] over a slot buffer whose rows hold slots
    ``[start[b], length)`` (device tensors). ``attention``: "triton" (tritonkv.kernels.decode:
    split over the slots, reads start / length on the device), "sdpa" (SDPA over every slot,
    ``visible()`` the mask), "auto" (triton on CUDA). Models whose attention the kernel does
    not compute (dropout, soft-capping, sliding windows, sinks) always take SDPA.
    ``scores`` (only where :func:`decode_kernel_runs`): the kernel's logits and log-sum-exp
    outputs (kernels/decode.py). Returns [B, 1, H_q, D_v] like transformers' SDPA."""
    attention = resolve_attention(attention, key.is_cuda)
    if attention == "triton" and not key.is_cuda and not interpreting():
        raise ValueError(f"attention: 'triton' runs on CUDA tensors (or under TRITON_INTERPRET=1), the cache is on "
                         f"{key.device}; use attention='auto' or 'sdpa'")
    if decode_kernel_runs(module, key, kwargs, attention):
        return decode_attention(query, key, value, start, length, attention_scale(query, kwargs), scores)
    if scores is not None:
        raise RuntimeError("attend_slots: scores were asked of a call that SDPA serves (see decode_kernel_runs)")
    out, _ = sdpa_attention_forward(module, query, key, value, visible(), **kwargs)
    return out


def attend_packed(packed: EvictedVarlen, segment, query, key, value, scaling: float):
    """Attention over a packed (per-head lengths) prefix and the dense rows added since,
    merged by their log-sum-exp; the T new queries see the whole prefix and the dense rows
    causally. Returns [B, T, H_q, D_v] like transformers' SDPA."""
    b, hq, t, d = query.shape
    h = key.shape[1]
    group = hq // h
    q = query.float().reshape(b * h, group, t, d) * scaling
    # prefix: the rows of head (b, h) attend with that head's G query heads
    s = torch.einsum("rgtd,rd->rgt", q[segment], packed.keys.float())
    rows = segment[:, None, None].expand(-1, group, t)
    m_p = torch.full((b * h, group, t), float("-inf"), device=q.device).scatter_reduce(0, rows, s, "amax")
    e = torch.exp(s - m_p[segment])
    l_p = torch.zeros(b * h, group, t, device=q.device).index_add_(0, segment, e)
    o_p = torch.zeros(b * h, group, t, packed.values.shape[-1], device=q.device).index_add_(
        0, segment, e[..., None] * packed.values.float()[:, None, None, :])
    # suffix: the rows added since the eviction, dense and causal for the new queries
    n = key.shape[2]
    s2 = torch.einsum("rgtd,rnd->rgtn", q, key.float().reshape(b * h, n, d))
    hidden = torch.ones(t, n, dtype=torch.bool, device=q.device).triu(n - t + 1)
    s2 = s2.masked_fill(hidden, float("-inf"))
    m_s = s2.amax(-1)
    e2 = torch.exp(s2 - m_s[..., None])
    l_s = e2.sum(-1)
    o_s = torch.einsum("rgtn,rnd->rgtd", e2, value.float().reshape(b * h, n, -1))
    m = torch.maximum(m_p, m_s)
    a_p, a_s = torch.exp(m_p - m), torch.exp(m_s - m)
    out = (o_p * a_p[..., None] + o_s * a_s[..., None]) / (l_p * a_p + l_s * a_s)[..., None]
    return out.reshape(b, hq, t, -1).transpose(1, 2).to(query.dtype)
