"""ChunkKV (Liu et al., arXiv 2502.00299): whole chunks of tokens, ranked by window attention."""

from __future__ import annotations

from .. import dsl


def chunkkv(window: int = 64, chunk: int = 10, head_reduce=None) -> dsl.Policy:
    """ChunkKV: keep the observation window (the last ``window`` tokens) and whole chunks of
    ``chunk`` consecutive tokens (10 in the paper) ranked by the window's causal attention
    summed over the window rows and over the chunk; the window's own keys are cut off first,
    as in SnapKV. ``head_reduce="sum"`` shares one chunk ranking across a layer's KV heads,
    as kvpress' ChunkKVPress does; the default ranks per head. The paper's layer-wise index
    reuse is ``EvictingCache(..., reuse_layers=2)`` or ``tkv.gather`` by hand."""
    attention = dsl.proxy_attention(window=window, causal=True, reduce="sum", exclude_window=True)
    return dsl.recent(window) | dsl.top(attention, chunk=chunk, head_reduce=head_reduce)
