"""Checks of evict()'s arguments, run before any kernel: each error names the argument
and says what was expected."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch

from . import dsl
from .budget import resolve_budget
from .reference import proxy_window

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "reference")
_DTYPE_NAMES = "float16, bfloat16 or float32"


def _check_tensor(name: str, x, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected 4 dims {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported; expected {_DTYPE_NAMES}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name}: head dim (dim 3) must be >= 1, got shape {tuple(x.shape)}")


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (0 <= seed < 2 ** 64):
        raise ValueError(f"seed: expected an int in [0, 2**64), got {seed!r}")
    return int(seed)


NAMED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SIGNAL_DTYPES = NAMED_DTYPES + (torch.int32, torch.int64)   # integers: positions, token types


def _check_named(argument: str, kind: str, tensors, used, keys, check_shape, dtypes=NAMED_DTYPES) -> None:
    """``tensors``: None or a dict name -> tensor holding exactly the names in ``used`` (read by
    the policy's ``kind(name)`` nodes), each a tensor of one of ``dtypes`` on the keys' device
    whose shape ``check_shape(label, x)`` accepts."""
    if tensors is None:
        tensors = {}
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{argument}: expected a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    for name in used:
        if name not in tensors:
            raise ValueError(f"{argument}: the policy uses {kind}({name!r}); pass {argument}={{{name!r}: tensor}} "
                             f"(given: {sorted(tensors)})")
    for name, x in tensors.items():
        if name not in used:
            raise ValueError(f"{argument}: {name!r} is not used by the policy (it reads {list(used)})")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{argument}[{name!r}]: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in dtypes:
            names = ", ".join(str(t).split(".")[-1] for t in dtypes)
            expected = f"a float dtype ({names})" if dtypes is NAMED_DTYPES else f"one of {names}"
            raise TypeError(f"{argument}[{name!r}]: dtype {x.dtype} is not supported; expected {expected}")
        label = f"{argument}[{name!r}]"
        check_shape(label, x)
        if x.device != keys.device:
            raise ValueError(f"{label}: on {x.device}, keys on {keys.device}; expected one device")


def check_signals(signals, policy: dsl.Policy, keys) -> None:
    """Each signal [B, H_kv, N] (a dim of 1 broadcasts), float or int32 / int64, on the keys' device."""
    b, h, n, _ = keys.shape

    def shape(label, x):
        if x.ndim != 3 or any(s not in (1, want) for s, want in zip(x.shape, (b, h, n))):
            raise ValueError(f"{label}: expected shape [B, H_kv, N] = {[b, h, n]} (a dim may be 1 to broadcast), "
                             f"got {list(x.shape)}")
    _check_named("signals", "signal", signals, policy.signals, keys, shape, SIGNAL_DTYPES)


def check_directions(directions, policy: dsl.Policy, keys) -> None:
    """Each direction [H_kv, D] or [B, H_kv, D] (B may be 1), float, on the keys' device."""
    b, h, _, d = keys.shape

    def shape(label, x):
        lead_ok = x.ndim == 2 or (x.ndim == 3 and x.shape[0] in (1, b))
        if not lead_ok or x.shape[-2:] != (h, d):
            raise ValueError(f"{label}: expected shape [H_kv, D] = {[h, d]} or [B, H_kv, D] = {[b, h, d]}, "
                             f"got {list(x.shape)}")
    _check_named("directions", "key_dot", directions, policy.directions, keys, shape)


def named_inputs(policy: dsl.Policy, signals, directions) -> tuple:
    """The tensors of the policy's signals, then of its directions, in the policy's order
    (the order in which the generated kernels take them)."""
    return tuple([signals[n] for n in policy.signals] + [directions[n] for n in policy.directions])


def split_named(policy: dsl.Policy, named: tuple):
    """(signals, directions) dicts back from ``named_inputs``' tuple."""
    cut = len(policy.signals)
    return dict(zip(policy.signals, named[:cut])), dict(zip(policy.directions, named[cut:]))


def check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, leading: str) -> None:
    """``x`` (the second tensor of a pair, e.g. values beside keys) has ``ref``'s first three
    dims (``leading`` names them), dtype and device."""
    if x.shape[:3] != ref.shape[:3]:
        raise ValueError(f"{name}: expected {leading} = {list(ref.shape[:3])} like {ref_name}, "
                         f"got {list(x.shape[:3])}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} differs from {ref_name}' {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name}: on {x.device}, {ref_name} on {ref.device}; expected one device")


def check_evict_args(keys, values, policy, budget, queries, seed, backend, signals=None, directions=None):
    """Validate everything; return (policy, kept tokens per head, seed)."""
    policy = dsl.as_policy(policy)
    _check_tensor("keys", keys, "[B, H_kv, N, D]")
    _check_tensor("values", values, "[B, H_kv, N, D_v]")
    b, h, n, d = keys.shape
    check_like("values", values, "keys", keys, "[B, H_kv, N]")
    if b < 1 or h < 1:
        raise ValueError(f"keys: batch and head dims must be >= 1, got shape {tuple(keys.shape)}")
    if n < 1:
        raise ValueError(f"keys: the cache is empty (N = 0, shape {tuple(keys.shape)}); nothing to evict")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    seed = check_seed(seed)
    if queries is not None:
        _check_tensor("queries", queries, "[B, H_q, W, D]")
        if queries.shape[0] != b:
            raise ValueError(f"queries: batch {queries.shape[0]} differs from keys' {b}")
        if queries.shape[1] % h != 0:
            raise ValueError(f"queries: H_q = {queries.shape[1]} must be a multiple of H_kv = {h} (GQA)")
        if queries.shape[3] != d:
            raise ValueError(f"queries: head dim {queries.shape[3]} differs from keys' {d}")
        if queries.shape[2] < 1:
            raise ValueError("queries: expected at least one proxy query (W >= 1)")
        if queries.dtype != keys.dtype:
            raise TypeError(f"queries: dtype {queries.dtype} differs from keys' {keys.dtype}")
        if queries.device != keys.device:
            raise ValueError(f"queries: on {queries.device}, keys on {keys.device}; expected one device")
    for score in policy.scores:
        for node in dsl.walk(score):
            if not isinstance(node, dsl.ProxyAttention):
                continue
            if queries is None:
                raise ValueError(f"queries: the policy uses {node!r}, which needs proxy queries "
                                 f"[B, H_q, W, D]; none were given")
            w = proxy_window(node, n, queries.shape[2])
            if node.causal and w > n:
                raise ValueError(f"queries: a causal {node!r} places its {w} proxy queries at the "
                                 f"last positions of the sequence, but N = {n} < {w}")
    check_signals(signals, policy, keys)
    check_directions(directions, policy, keys)
    k = resolve_budget(budget, n)
    return policy, k, seed
