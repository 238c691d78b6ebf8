"""Fixed-capacity KV storage of one attention layer: shapes that never change while decoding.

A layer holds C slots per (batch row, KV head): ``keys`` [B, H_kv, C, D], ``values`` and the
true ``positions`` [B, H_kv, C] of what they hold. Slots ``[start[b], length)`` of row b hold
its tokens in ascending position order; slots before ``start[b]`` are empty (a row with fewer
tokens than the others, as left padding is) and slots from ``length`` on are not written yet.
``length`` and ``start`` live on the device, so writing a token and masking the empty slots
read no host value: the same kernels, with the same arguments, serve every decode step (what a
CUDA graph replays). Host mirrors (``filled``, ``starts``) are kept by whoever writes them.

Layers of one shape share stacked storage ([L, B, H_kv, C, D], see :class:`Storage`), so one
eviction call can take every layer's rows at once (``stacked_*``) without a copy.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def copy_slots(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` where ``dst`` is a slot range of a buffer (a strided view whose rows of
    D elements are contiguous), moved as 8-byte words where the layout allows: PyTorch copies
    into a non-contiguous view element by element, which for 2-byte K / V runs at about a fifth
    of the copy bandwidth (an H200, a 128K-prompt every-step eviction of the wide model of
    perf/generation.py: 254 us per copy of 107 MB)."""
    ratio = 8 // dst.element_size()
    if ratio > 1 and dst.dtype == src.dtype and all(_words(t, ratio) for t in (dst, src)):
        dst, src = dst.view(torch.int64), src.view(torch.int64)
    dst.copy_(src)


def _words(t: torch.Tensor, ratio: int) -> bool:
    """``t`` can be viewed as int64 words: contiguous rows of a multiple of 8 bytes, 8-byte aligned."""
    return (t.stride(-1) == 1 and t.shape[-1] % ratio == 0 and t.storage_offset() % ratio == 0
            and all(st % ratio == 0 for st in t.stride()[:-1]) and t.data_ptr() % 8 == 0)


class LayerBuffer:
    """Views of one layer's slots in a :class:`Storage`."""

    def __init__(self, storage: "Storage", layer: int):
        self.storage, self.layer = storage, layer
        self.keys, self.values = storage.keys[layer], storage.values[layer]
        self.positions = storage.positions[layer]
        self.length = storage.lengths[layer]      # 0-d int64: slots written
        self.start = storage.starts[layer]        # [B] int64: first occupied slot of each row
        self.capacity = self.keys.shape[2]
        self.slots = storage.slots

    @property
    def accumulated(self) -> Optional[torch.Tensor]:
        """float32 [B, H_kv, C]: the layer's rows of the storage's ``signal`` (the attention each
        slot's token accumulated, for a cache that accumulates it); None until allocated."""
        signal = self.storage.signal
        b = self.keys.shape[0]
        return None if signal is None else signal[self.layer * b:(self.layer + 1) * b]

    @property
    def queries(self) -> Optional[torch.Tensor]:
        """[B, H_q, W, D] the layer's last W queries (after RoPE), oldest first; None until allocated."""
        return None if self.storage.queries is None else self.storage.queries[self.layer]

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Store q new tokens [B, H_kv, q, D] at slots ``[length, length + q)``, in place; returns
        the slot index [q] (a device tensor: no host value is read)."""
        index = self.length + self.storage.arange(keys.shape[2])
        self.keys.index_copy_(2, index, keys)
        self.values.index_copy_(2, index, values)
        self.length.add_(keys.shape[2])
        return index

    def write_positions(self, index: torch.Tensor, positions: torch.Tensor) -> None:
        """True positions [B, q] of the tokens written at ``index``."""
        b, h = self.positions.shape[:2]
        self.positions.index_copy_(2, index, positions[:, None, :].expand(b, h, -1).to(torch.int64))

    def visible(self) -> torch.Tensor:
        """bool [B, 1, 1, C]: the occupied slots, which a one-token query attends to."""
        mask = (self.slots >= self.start[:, None]) & (self.slots < self.length)
        return mask[:, None, None, :]

    def push_queries(self, query: torch.Tensor) -> None:
        """Roll one decoded query [B, H_q, 1, D] into the query window, in place."""
        window = self.queries
        window.copy_(torch.cat([window[:, :, 1:], query.to(window.dtype)], dim=2))


class Storage:
    """Slots of ``n_layers`` layers of one shape, allocated once: keys / values
    [L, B, H_kv, C, D], positions [L, B, H_kv, C], and (once a forward shows their shape) the
    proxy-query windows [L, B, H_q, W, D]."""

    def __init__(self, n_layers: int, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        b, h, _, dk = keys.shape
        device = keys.device
        self.keys = torch.zeros(n_layers, b, h, capacity, dk, dtype=keys.dtype, device=device)
        self.values = torch.zeros(n_layers, b, h, capacity, values.shape[-1], dtype=values.dtype, device=device)
        self.positions = torch.zeros(n_layers, b, h, capacity, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(n_layers, dtype=torch.int64, device=device)
        self.starts = torch.zeros(n_layers, b, dtype=torch.int64, device=device)
        self.slots = torch.arange(capacity, device=device)
        self.queries: Optional[torch.Tensor] = None
        # a decode step's attention logits / log-sum-exp per query head, and the score made of
        # them ([L * B, H_kv, C]; summed over the steps for a cache that accumulates it):
        # allocated for caches that score evictions from the decode step
        self.logits: Optional[torch.Tensor] = None
        self.lse: Optional[torch.Tensor] = None
        self.signal: Optional[torch.Tensor] = None
        self.rank: Optional[torch.Tensor] = None   # accumulated H2O's one-clause ranking (step_scores.py)
        self.n_layers, self.batch, self.heads, self.capacity = n_layers, b, h, capacity
        for t in (self.keys, self.values, self.positions, self.lengths, self.starts):
            _mark_static(t)

    def arange(self, n: int) -> torch.Tensor:
        return self.slots[:n]

    def fits(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether a layer whose new states look like these can live in this storage."""
        return (keys.shape[:2] == self.keys.shape[1:3] and keys.shape[-1] == self.keys.shape[-1]
                and values.shape[-1] == self.values.shape[-1] and keys.dtype == self.keys.dtype
                and keys.device == self.keys.device)

    def allocate_queries(self, query: torch.Tensor, window: int) -> None:
        if self.queries is None:
            b, hq, _, d = query.shape
            self.queries = torch.zeros(self.n_layers, b, hq, window, d, dtype=query.dtype, device=query.device)
            _mark_static(self.queries)

    def allocate_scores(self, query: torch.Tensor, rank: bool = False) -> None:
        """float32 logits [L, B, H_q, C], lse [L, B, H_q], signal [L * B, H_kv, C] and (``rank``)
        the signal's ranking [L * B, H_kv, C] (see integrations/decode_scores.py), once; a forward
        of the prompt allocates them, outside any CUDA graph capture."""
        if self.logits is None:
            hq, device = query.shape[1], query.device
            self.logits = torch.zeros(self.n_layers, self.batch, hq, self.capacity, device=device)
            self.lse = torch.zeros(self.n_layers, self.batch, hq, device=device)
            self.signal = torch.zeros(self.n_layers * self.batch, self.heads, self.capacity, device=device)
            for t in (self.logits, self.lse, self.signal):
                _mark_static(t)
        if rank and self.rank is None:
            self.rank = torch.zeros_like(self.signal)
            _mark_static(self.rank)

    def scores(self, layers: Sequence[int]) -> List[Optional[torch.Tensor]]:
        """logits [len * B, H_q, C], lse [len * B, H_q], signal and rank [len * B, H_kv, C] (rank:
        None unless allocated) of ``layers`` (consecutive), as the rows of an eviction call over them."""
        lo, hi = layers[0], layers[-1] + 1
        b = self.batch
        return [self.logits[lo:hi].flatten(0, 1), self.lse[lo:hi].flatten(0, 1), self.signal[lo * b:hi * b],
                None if self.rank is None else self.rank[lo * b:hi * b]]

    # every layer's rows at once: the batch of an eviction call is (layer, row)
    def stacked(self, layers: Sequence[int]) -> List[torch.Tensor]:
        """keys, values, positions, queries of ``layers`` (consecutive) as [len * B, ...] views."""
        lo, hi = layers[0], layers[-1] + 1
        flat = [t[lo:hi].flatten(0, 1) for t in (self.keys, self.values, self.positions)]
        return flat + [None if self.queries is None else self.queries[lo:hi].flatten(0, 1)]


def _mark_static(t: torch.Tensor) -> None:
    """Tell torch.compile the tensor keeps its address (as transformers' StaticLayer does)."""
    try:
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(t)
    except Exception:  # pragma: no cover - dynamo unavailable
        pass
