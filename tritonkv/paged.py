"""Eviction on a paged KV cache, the layout of serving engines (vLLM, SGLang, FlashInfer).

    out = tkv.paged.evict(k_pages, v_pages, block_table, seq_lens, tkv.policies.snapkv(), 0.25,
                          queries=queries)
    seq_lens = out.seq_lens                      # tokens now held per sequence
    free_list.extend(out.freed_pages.tolist())   # pages no sequence needs any more

A pool of pages ``[num_pages, page_size, H_kv, D]`` (``layout="NHD"``; ``"HND"`` for
``[num_pages, H_kv, page_size, D]``) holds every sequence's tokens; row b of the int32 block
table names sequence b's pages in order, ``seq_lens[b]`` its tokens. Each sequence keeps, per
KV head, the tokens ``tkv.evict`` keeps on its dense copy ``[1, H_kv, seq_lens[b], D]`` (same
policy, budget, seed; ``queries[b:b + 1]``), compacted in order, in place, into its first
pages: slot i of head h holds head h's i-th kept token. A sequence is evicted as if alone, so
what it keeps never depends on the batch it was scheduled in.

The compiled path (tritonkv/paged_plan.py) scores every sequence through its block table (the
generated kernels read pages, no dense copy of K or V is made) and selects, one launch per stage
for the whole batch, then compacts the pages in place (kernels/pages.py), one launch per pool.
Pages outside the named ones, and slots past a sequence's new length, are never written. ``seq_lens`` lives on the host (engines keep it there, e.g. vLLM's
``seq_lens_cpu``): budgets and launch shapes come from it without a device synchronization, so
for fixed lengths a call is capturable in a CUDA graph (pass ``check=False`` there: checking the
block table's entries reads it back).
"""

from __future__ import annotations

from typing import List, Mapping, NamedTuple, Optional, Sequence

import torch

from . import dsl
from .validate import BACKENDS, SUPPORTED_DTYPES, check_evict_args, check_like, check_seed, named_inputs

LAYOUTS = ("NHD", "HND")


class PagedEvicted(NamedTuple):
    """What ``paged.evict`` did. ``seq_lens``: int32 [B] on the host, tokens each sequence now
    holds (per KV head); ``positions``: int64 [B, H_kv, max kept] on the pages' device, the
    original positions of the held tokens, ascending, padded with -1 (for RoPE positions and
    masks); ``freed_pages``: int32 [F] on the block table's device, the pages the sequences no
    longer use, sequence by sequence; ``freed_counts``: int32 [B] on the host, how many of them
    each sequence gave back (its block table row's entries from ``ceil(new len / page_size)``)."""

    seq_lens: torch.Tensor
    positions: torch.Tensor
    freed_pages: torch.Tensor
    freed_counts: torch.Tensor


class _Pool(NamedTuple):
    """A page pool as the kernels address it: tokens per page, heads, head dim, and the strides
    of (page, head, slot, dim)."""

    pages: torch.Tensor
    layout: str
    page_size: int
    heads: int
    dim: int
    strides: tuple

    @staticmethod
    def of(pages: torch.Tensor, layout: str) -> "_Pool":
        s = pages.stride()
        if layout == "NHD":   # [num_pages, page_size, H, D]
            return _Pool(pages, layout, pages.shape[1], pages.shape[2], pages.shape[3], (s[0], s[2], s[1], s[3]))
        return _Pool(pages, layout, pages.shape[2], pages.shape[1], pages.shape[3], (s[0], s[1], s[2], s[3]))

    def tokens(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        """The first n tokens on pages ``rows`` as a dense [1, H, n, D] tensor (a copy)."""
        x = self.pages[rows.long()]
        if self.layout == "NHD":   # [pages, slots, H, D] -> [H, tokens, D]
            x = x.reshape(-1, self.heads, self.dim).transpose(0, 1)
        else:                      # [pages, H, slots, D]
            x = x.transpose(0, 1).reshape(self.heads, -1, self.dim)
        return x[:, :n].unsqueeze(0)

    def write(self, rows: torch.Tensor, kept: torch.Tensor) -> None:
        """Store [H, k, D] rows into slots 0 .. k-1 of the pages ``rows`` (the reference path)."""
        slot = torch.arange(kept.shape[1], device=rows.device)
        page, within = rows.long()[slot // self.page_size], slot % self.page_size
        if self.layout == "NHD":
            self.pages[page, within] = kept.transpose(0, 1)
        else:
            self.pages[page, :, within] = kept.transpose(0, 1)

    def dense_view(self, n: int) -> torch.Tensor:
        """A [1, H, n, D] tensor on the pool's storage with zero strides: shapes, dtype and device
        for validation, no memory."""
        return self.pages.as_strided((1, self.heads, n, self.dim), (0, 0, 0, 0))


def _lengths(seq_lens, batch: int) -> List[int]:
    if isinstance(seq_lens, torch.Tensor):
        if seq_lens.is_cuda:
            raise ValueError("seq_lens: expected the host copy (a CPU tensor or a list of ints, as engines keep "
                             "it, e.g. vLLM's seq_lens_cpu); reading a GPU tensor would synchronize the device")
        if seq_lens.dtype not in (torch.int32, torch.int64) or seq_lens.ndim != 1:
            raise TypeError(f"seq_lens: expected int32 [B], got {seq_lens.dtype} {list(seq_lens.shape)}")
        lengths = seq_lens.tolist()
    elif isinstance(seq_lens, Sequence) and all(isinstance(x, int) and not isinstance(x, bool) for x in seq_lens):
        lengths = list(seq_lens)
    else:
        raise TypeError(f"seq_lens: expected int32 [B] on the host or a list of ints, got {type(seq_lens).__name__}")
    if len(lengths) != batch:
        raise ValueError(f"seq_lens: {len(lengths)} lengths for a block table of {batch} sequences")
    for b, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"seq_lens[{b}] = {n}: every sequence must hold at least one token")
    return lengths


def _check_pools(k_pages, v_pages, layout: str):
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    shape = "[num_pages, page_size, H_kv, D]" if layout == "NHD" else "[num_pages, H_kv, page_size, D]"
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor {shape}, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name}: expected 4 dims {shape} (layout={layout!r}), got shape {list(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype {x.dtype} is not supported; expected float16, bfloat16 or float32")
    check_like("v_pages", v_pages, "k_pages", k_pages, shape[:-4] + "]")
    if k_pages.data_ptr() == v_pages.data_ptr() and k_pages.numel():
        raise ValueError("v_pages: shares k_pages' memory; compaction in place needs two pools")
    return _Pool.of(k_pages, layout), _Pool.of(v_pages, layout)


def _check_table_type(block_table) -> None:
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.ndim != 2:
        got = f"{block_table.dtype} {list(block_table.shape)}" if isinstance(block_table, torch.Tensor) \
            else type(block_table).__name__
        raise TypeError(f"block_table: expected an int32 tensor [B, max_pages], got {got}")


def _check_block_table(block_table, lengths: List[int], pool: _Pool, check: bool) -> None:
    """The table's device, its size for ``lengths``, and with ``check`` its entries."""
    if block_table.device != pool.pages.device:
        raise ValueError(f"block_table: on {block_table.device}, the pages on {pool.pages.device}; expected one device")
    for b, n in enumerate(lengths):
        need = -(-n // pool.page_size)
        if need > block_table.shape[1]:
            raise ValueError(f"seq_lens[{b}] = {n}: needs {need} pages of {pool.page_size} tokens, but the block "
                             f"table has {block_table.shape[1]} per sequence")
    if not check:
        return
    if block_table.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("block_table: checking its entries reads it back to the host, which a CUDA graph "
                           "capture forbids; pass check=False inside the capture")
    table = block_table.cpu()
    owner = {}
    for b, n in enumerate(lengths):
        for j, page in enumerate(table[b, : -(-n // pool.page_size)].tolist()):
            if not 0 <= page < pool.pages.shape[0]:
                raise ValueError(f"block_table[{b}, {j}] = {page}: outside the pool's {pool.pages.shape[0]} pages")
            if page in owner:
                raise ValueError(f"block_table[{b}, {j}] = {page}: page already used by block_table"
                                 f"[{owner[page][0]}, {owner[page][1]}]; a page belongs to one place")
            owner[page] = (b, j)


def _row(x: Optional[torch.Tensor], b: int, n: Optional[int] = None) -> Optional[torch.Tensor]:
    """Sequence b's slice of a batch-leading tensor (a batch dim of 1 broadcasts)."""
    if x is None:
        return None
    x = x[b:b + 1] if x.shape[0] > 1 else x
    return x if n is None else x[..., :n]


def _named_rows(named: Optional[Mapping], b: int, n: Optional[int], batched) -> Optional[dict]:
    if named is None or not isinstance(named, Mapping):
        return named
    return {name: (_row(x, b, n) if isinstance(x, torch.Tensor) and batched(x) else x) for name, x in named.items()}


def evict(k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor, seq_lens, policy, budget, *,
          queries: Optional[torch.Tensor] = None, seed: int = 0, signals: Optional[Mapping] = None,
          directions: Optional[Mapping] = None, backend: str = "auto", layout: str = "NHD",
          check: bool = True) -> PagedEvicted:
    """Evict every sequence of a paged cache back to ``budget`` tokens per KV head, in place.

    Args:
        k_pages, v_pages: the page pools, ``[num_pages, page_size, H_kv, D]`` (``layout="NHD"``)
            or ``[num_pages, H_kv, page_size, D]`` (``"HND"``); D of values may differ. Only the
            pages named by the block table's first ``ceil(seq_lens[b] / page_size)`` entries
            of each row are read, and only their first new-length slots are written.
        block_table: int32 ``[B, max_pages]`` on the pools' device, sequence b's pages in order.
        seq_lens: tokens per sequence, int32 ``[B]`` on the host (or a list of ints).
        policy, budget, seed, backend: as for :func:`tritonkv.evict`; a fractional budget is of
            each sequence's own length.
        queries: ``[B, H_q, W, D]`` proxy queries, row b for sequence b.
        signals: by name, ``[B, H_kv, L]`` with L >= max(seq_lens) (sequence b reads its first
            seq_lens[b] positions); directions: ``[H_kv, D]`` or ``[B, H_kv, D]``.
        check: check the block table's entries (in the pool, no page used twice), which reads it
            back to the host; pass False inside a CUDA graph capture or a hot loop.

    Returns:
        :class:`PagedEvicted`: new lengths, kept positions, freed pages.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    policy = dsl.as_policy(policy)
    if policy.heads == "adaptive":
        raise ValueError("policy: per-head budgets (heads='adaptive', AdaKV) are not supported on a paged cache "
                         "yet: every head of a sequence keeps the same count here")
    k_pool, v_pool = _check_pools(k_pages, v_pages, layout)
    _check_table_type(block_table)
    lengths = _lengths(seq_lens, block_table.shape[0])
    _check_block_table(block_table, lengths, k_pool, check)
    if isinstance(queries, torch.Tensor) and queries.ndim == 4 and queries.shape[0] != len(lengths):
        raise ValueError(f"queries: batch {queries.shape[0]} differs from the block table's {len(lengths)} sequences")
    if signals is not None and isinstance(signals, Mapping):
        for name, x in signals.items():
            if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[-1] < max(lengths):
                raise ValueError(f"signals[{name!r}]: {x.shape[-1]} positions, the longest sequence holds "
                                 f"{max(lengths)}; expected [B, H_kv, L] with L >= max(seq_lens)")
    use_triton = backend == "triton" or (backend == "auto" and k_pages.is_cuda)
    named_all = None
    if use_triton:
        from . import paged_plan
        from .compiler import check_backend
        check_backend(k_pages)
        table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
        named_all = named_inputs(policy, signals or {}, directions or {}) if _named_ok(policy, signals, directions) \
            else None
        plannable = named_all is not None and (queries is None or isinstance(queries, torch.Tensor))
        key = None if not plannable else paged_plan.signature(policy, budget, k_pool, v_pool, table, lengths,
                                                                  queries, named_all)
        batch = None if key is None else paged_plan.cached_plan(key)
        if batch is not None:   # validated when it was planned: only the seed can differ
            check_seed(seed)
            return _run_compiled(batch, k_pool, v_pool, table, block_table, queries, seed, named_all)
    jobs = _checked_jobs(k_pool, v_pool, lengths, policy, budget, queries, seed, backend, signals, directions)
    if not use_triton:
        return _evict_reference(k_pool, v_pool, block_table, lengths, jobs)
    batch = paged_plan.plan(jobs[0][5], k_pool, v_pool, table, lengths, [job[2] for job in jobs], queries)
    if key is not None:
        paged_plan.remember(key, batch)
    return _run_compiled(batch, k_pool, v_pool, table, block_table, queries, jobs[0][6], named_all)


def _named_ok(policy, signals, directions) -> bool:
    """The named inputs are dicts of tensors holding the policy's names (else validation explains)."""
    for named, used in ((signals, policy.signals), (directions, policy.directions)):
        named = {} if named is None else named
        if not isinstance(named, Mapping) or set(named) != set(used) or \
                not all(isinstance(x, torch.Tensor) for x in named.values()):
            return False
    return True


def _checked_jobs(k_pool: _Pool, v_pool: _Pool, lengths, policy, budget, queries, seed, backend, signals,
                  directions) -> list:
    """Every sequence checked as tkv.evict checks its dense copy, before any kernel runs: per
    sequence (b, n, kept, queries, named inputs, policy, seed)."""
    jobs = []
    for b, n in enumerate(lengths):
        sig = _named_rows(signals, b, n, lambda x: x.ndim == 3)
        dirs = _named_rows(directions, b, None, lambda x: x.ndim == 3)
        q = _row(queries, b) if isinstance(queries, torch.Tensor) and queries.ndim == 4 else queries
        p, k, s = check_evict_args(k_pool.dense_view(n), v_pool.dense_view(n), policy, budget, q, seed, backend,
                                   sig, dirs)
        jobs.append((b, n, min(k, n), q, named_inputs(p, sig, dirs), p, s))
    return jobs


def _run_compiled(batch, k_pool: _Pool, v_pool: _Pool, table, block_table, queries, seed: int,
                  named) -> PagedEvicted:
    from .kernels.pages import compact
    from .paged_plan import run_plan
    positions = run_plan(batch, k_pool, v_pool, queries, seed, named)
    if batch.evicts:   # every sequence compacted by one launch per pool
        # (a sequence that keeps everything holds positions j at slots j: the kernel moves nothing there)
        compact(positions, k_pool.pages, table, k_pool.page_size, k_pool.strides)
        compact(positions, v_pool.pages, table, v_pool.page_size, v_pool.strides)
    rows, cols = batch.freed
    return PagedEvicted(torch.tensor(batch.kept, dtype=torch.int32), positions, block_table[rows, cols],
                        torch.tensor(batch.freed_counts, dtype=torch.int32))


def _evict_reference(k_pool: _Pool, v_pool: _Pool, block_table, lengths, jobs) -> PagedEvicted:
    """The reference path, sequence by sequence: gather to dense, tkv.evict's reference, write back."""
    from .eager import evict_reference
    device = k_pool.pages.device
    positions = torch.full((len(lengths), k_pool.heads, max(job[2] for job in jobs)), -1, dtype=torch.int64,
                           device=device)
    freed = []
    for b, n, k, q, named, p, s in jobs:
        rows = block_table[b, : -(-n // k_pool.page_size)]
        out = evict_reference(k_pool.tokens(rows, n), v_pool.tokens(rows, n), q, p, k, s, named)
        k_pool.write(rows, out.keys[0])
        v_pool.write(rows, out.values[0])
        positions[b, :, :k] = out.indices[0]
        freed.append(block_table[b, -(-k // k_pool.page_size): -(-n // k_pool.page_size)])
    return PagedEvicted(torch.tensor([job[2] for job in jobs], dtype=torch.int32), positions, torch.cat(freed),
                        torch.tensor([f.numel() for f in freed], dtype=torch.int32))


__all__ = ["evict", "PagedEvicted", "LAYOUTS"]
