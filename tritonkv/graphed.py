"""One Evictor call over fixed tensors, captured once as a CUDA graph and replayed.

    ev = tkv.Evictor(tkv.policies.snapkv(), budget=0.1)
    graph = ev.graph(keys, values, queries=queries)   # plans, compiles, captures
    keys.copy_(new_keys); queries.copy_(new_queries)  # update the bound inputs in place
    out = graph()                                      # one graph launch: the eviction of the new contents

A planned call (runtime.py) costs the host about 16.5 us plus ~3.3 us per kernel launch (1-6 of
them; docs/performance.md, "Where a planned call's host time goes"), which is most of a 10%
eviction's wall time at short N. A caller that evicts the same buffers again and again (its
own fixed-capacity cache, updated in place) can pay one graph launch instead, whatever the
policy's kernels. The replay reads the bound tensors' current contents and writes the same
output tensors every time: ``graph()`` returns them (clone what must outlive the next replay).
The seed is the one captured. Where the inputs change shape or address, make a new graph.
"""

from __future__ import annotations

import torch

from typing import Union

from .results import Evicted, EvictedVarlen


class EvictionGraph:
    """``evictor(keys, values, **inputs)`` captured as a CUDA graph (see the module's doc)."""

    def __init__(self, evictor, keys, values, *, queries=None, seed: int = 0, signals=None, directions=None):
        for name, t in (("keys", keys), ("values", values), ("queries", queries)):
            if t is not None and (not isinstance(t, torch.Tensor) or not t.is_cuda):
                raise ValueError(f"{name}: a CUDA graph replays CUDA work; expected a CUDA tensor, got "
                                 f"{getattr(t, 'device', type(t).__name__)}")
        if evictor.backend == "reference":
            raise ValueError("backend: the reference backend runs PyTorch ops with host syncs; a graph needs "
                             "'triton' or 'auto'")
        self.evictor = evictor
        self.inputs = dict(queries=queries, seed=seed, signals=signals, directions=directions)
        self.keys, self.values = keys, values     # held: the graph reads their memory
        call = lambda: evictor(keys, values, **self.inputs)   # noqa: E731
        side = torch.cuda.Stream(device=keys.device)
        side.wait_stream(torch.cuda.current_stream(keys.device))
        with torch.cuda.stream(side):   # validate, plan, compile; then a call whose plan knows occupancy
            call()
            call()
        torch.cuda.current_stream(keys.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):   # AdaKV too: its packed output's size is known on the host
            self.out: Union[Evicted, EvictedVarlen] = call()

    def __call__(self) -> Union[Evicted, EvictedVarlen]:
        """Replay on the current stream: the eviction of the bound inputs' current contents, into
        the same output tensors as every replay."""
        self._graph.replay()
        return self.out

    def __repr__(self):
        return f"EvictionGraph({self.evictor!r}, keys={list(self.keys.shape)})"
