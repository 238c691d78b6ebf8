"""The policy language: score expressions, selection clauses and policies.

Pure Python (no torch, no triton). Every node is a frozen dataclass, so two
policies built the same way compare equal and hash alike; the compiler caches
generated kernels on that structure. ``repr`` prints the expression that built
a node, so a policy reads back as the line of code that made it.

Scores produce one number per key per KV head (higher = more worth keeping).
Clauses say how tokens are kept within a budget; ``|`` joins them into a
:class:`Policy`. The meaning of every node is written down, as PyTorch code,
in :mod:`tritonkv.reference`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Callable, Iterator, Optional, Tuple, Union

__all__ = [
    "Score", "AnchorSimilarity", "ProxyAttention", "KeyNorm", "ValueNorm", "Random",
    "Position", "Signal", "KeyDot", "Const", "Neg", "BinaryOp", "Pool", "Normalize", "Softmax",
    "Clause", "Sink", "Recent", "Top", "Sample", "Policy",
    "anchor_similarity", "proxy_attention", "key_norm", "value_norm", "random",
    "position", "signal", "key_dot", "sink", "recent", "top", "sample", "as_policy", "walk",
    "order_free", "substitute",
]

REDUCTIONS = ("mean", "sum", "max")
POOL_MODES = ("avg", "max")
CHUNK_REDUCTIONS = ("sum", "mean", "max")
MAX_CHUNK = 4096   # a chunk is reduced inside one program (kernels/transform.py)
BINARY_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
# Random streams 0 .. MAX_RANDOM_STREAM-1 belong to random(); sample clauses draw their
# Gumbel noise from the streams above (see reference.gumbel_stream).
MAX_RANDOM_STREAM = 1 << 16

Count = Union[int, float]


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_count(name: str, n, *, allow_none: bool = False) -> Optional[Count]:
    """A token count (int >= 0) or a fraction of N (float in (0, 1])."""
    if n is None and allow_none:
        return None
    if isinstance(n, bool) or not _is_number(n):
        raise TypeError(f"{name}: expected an int token count or a float fraction of N, got {n!r}")
    if isinstance(n, numbers.Integral):
        if n < 0:
            raise ValueError(f"{name}: a token count must be >= 0, got {n}")
        return int(n)
    n = float(n)
    if not (0.0 < n <= 1.0):
        raise ValueError(f"{name}: a fraction of N must be in (0, 1], got {n}")
    return n


def _check_share(share) -> Optional[float]:
    if share is None:
        return None
    if isinstance(share, bool) or not _is_number(share) or not (0.0 < float(share) <= 1.0):
        raise ValueError(f"share: expected a number in (0, 1] or None, got {share!r}")
    return float(share)


def _check_positive(name: str, x) -> float:
    if isinstance(x, bool) or not _is_number(x) or not math.isfinite(float(x)) or float(x) <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {x!r}")
    return float(x)


def _as_score(x, op: str) -> "Score":
    if isinstance(x, Score):
        return x
    if _is_number(x):
        return Const(float(x))
    raise TypeError(f"cannot combine a score with {type(x).__name__} in '{op}'")


# --------------------------------------------------------------------------- scores


class Score:
    """Base of every score expression node."""

    def children(self) -> Tuple["Score", ...]:
        return ()

    # arithmetic ----------------------------------------------------------------
    def __add__(self, other):
        return BinaryOp("add", self, _as_score(other, "+"))

    def __radd__(self, other):
        return BinaryOp("add", _as_score(other, "+"), self)

    def __sub__(self, other):
        return BinaryOp("sub", self, _as_score(other, "-"))

    def __rsub__(self, other):
        return BinaryOp("sub", _as_score(other, "-"), self)

    def __mul__(self, other):
        return BinaryOp("mul", self, _as_score(other, "*"))

    def __rmul__(self, other):
        return BinaryOp("mul", _as_score(other, "*"), self)

    def __truediv__(self, other):
        return BinaryOp("div", self, _as_score(other, "/"))

    def __rtruediv__(self, other):
        return BinaryOp("div", _as_score(other, "/"), self)

    def __neg__(self):
        return Neg(self)

    def __bool__(self):
        raise TypeError("a score expression has no truth value; build clauses with top()/sample()")

    # transforms ----------------------------------------------------------------
    def pool(self, kernel: int, mode: str = "avg") -> "Pool":
        """1-D pooling over neighbouring tokens (odd ``kernel``, same length out)."""
        return Pool(self, kernel, mode)

    def normalize(self) -> "Normalize":
        """Per-head standardization over the tokens: (x - mean) / std."""
        return Normalize(self)

    def softmax(self, temperature: float = 1.0) -> "Softmax":
        """Softmax over the tokens of each head: exp(x / t) / sum exp(x / t)."""
        return Softmax(self, temperature)

    # properties of the tree ----------------------------------------------------
    @property
    def needs_queries(self) -> bool:
        return any(isinstance(n, ProxyAttention) for n in walk(self))

    @property
    def needs_keys(self) -> bool:
        return any(isinstance(n, (AnchorSimilarity, ProxyAttention, KeyNorm, KeyDot)) for n in walk(self))

    @property
    def needs_values(self) -> bool:
        return any(isinstance(n, ValueNorm) for n in walk(self))

    @property
    def signals(self) -> Tuple[str, ...]:
        """Names of the outside scores (``signal(name)``) in the tree, in first-use order."""
        return _names(self, Signal)

    @property
    def directions(self) -> Tuple[str, ...]:
        """Names of the per-head directions (``key_dot(name)``) in the tree, in first-use order."""
        return _names(self, KeyDot)


def _names(root: "Score", kind) -> Tuple[str, ...]:
    out: list = []
    for node in walk(root):
        if isinstance(node, kind) and node.name not in out:
            out.append(node.name)
    return tuple(out)


def _check_name(kind: str, name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"{kind} name: expected a non-empty str (the key of the tensor passed at call time), "
                        f"got {name!r}")
    return name


def walk(node: Score) -> Iterator[Score]:
    """Every node of an expression, children before parents (post-order)."""
    for child in node.children():
        yield from walk(child)
    yield node


@dataclass(frozen=True, repr=False)
class AnchorSimilarity(Score):
    """Cosine similarity of each key to its head's anchor (KeyDiff)."""

    def __repr__(self):
        return "anchor_similarity()"


@dataclass(frozen=True, repr=False)
class ProxyAttention(Score):
    """Attention paid to each key by the proxy queries (NACL, SnapKV, H2O, TOVA)."""

    window: Optional[Count] = None
    causal: bool = False
    reduce: str = "mean"
    pool_kernel: int = 1  # named so that the .pool() method of every score stays reachable
    pool_mode: str = "avg"
    group_reduce: str = "mean"
    exclude_window: bool = False

    def __post_init__(self):
        if self.window is not None:
            w = _check_count("window", self.window)
            if w == 0:
                raise ValueError("window: expected at least one proxy query, got 0")
            object.__setattr__(self, "window", w)
        for name in ("causal", "exclude_window"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("reduce", "group_reduce"):
            if getattr(self, name) not in REDUCTIONS:
                raise ValueError(f"{name}: expected one of {REDUCTIONS}, got {getattr(self, name)!r}")
        _check_pool(self.pool_kernel, self.pool_mode)

    def __repr__(self):
        defaults = ProxyAttention()
        fields = {"window": "window", "causal": "causal", "reduce": "reduce", "pool": "pool_kernel",
                  "pool_mode": "pool_mode", "group_reduce": "group_reduce",
                  "exclude_window": "exclude_window"}
        args = [f"{arg}={getattr(self, name)!r}" for arg, name in fields.items()
                if getattr(self, name) != getattr(defaults, name)]
        return f"proxy_attention({', '.join(args)})"


@dataclass(frozen=True, repr=False)
class KeyNorm(Score):
    """L2 norm of each key."""

    def __repr__(self):
        return "key_norm()"


@dataclass(frozen=True, repr=False)
class ValueNorm(Score):
    """L2 norm of each value."""

    def __repr__(self):
        return "value_norm()"


@dataclass(frozen=True, repr=False)
class Random(Score):
    """Uniform in [0, 1), from Philox keyed by (seed, batch, head, token, stream)."""

    stream: int = 0

    def __post_init__(self):
        if isinstance(self.stream, bool) or not isinstance(self.stream, numbers.Integral) \
                or not (0 <= self.stream < MAX_RANDOM_STREAM):
            raise ValueError(f"stream: expected an int in [0, {MAX_RANDOM_STREAM}), got {self.stream!r}")

    def __repr__(self):
        return "random()" if self.stream == 0 else f"random(stream={self.stream})"


@dataclass(frozen=True, repr=False)
class Position(Score):
    """Token position i / N (0 for the first token, (N-1)/N for the last)."""

    def __repr__(self):
        return "position()"


@dataclass(frozen=True, repr=False)
class _Named(Score):
    """A node that reads a tensor passed at call time under ``name``."""

    name: str
    constructor = ""   # the dsl function that builds the node (its repr and error messages)

    def __post_init__(self):
        _check_name(self.constructor, self.name)

    def __repr__(self):
        return f"{self.constructor}({self.name!r})"


class Signal(_Named):
    """A per-token score computed outside tritonkv, passed at call time by name:
    ``evict(..., signals={name: tensor [B, H_kv, N]})``."""

    constructor = "signal"


class KeyDot(_Named):
    """k . u for a per-head direction u passed at call time by name:
    ``evict(..., directions={name: tensor [H_kv, D] or [B, H_kv, D]})`` (Q-Filters)."""

    constructor = "key_dot"


@dataclass(frozen=True, repr=False)
class Const(Score):
    value: float

    def __post_init__(self):
        if not math.isfinite(self.value):
            raise ValueError(f"a constant in a score must be finite, got {self.value!r}")

    def __repr__(self):
        return repr(self.value)


@dataclass(frozen=True, repr=False)
class Neg(Score):
    operand: Score

    def children(self):
        return (self.operand,)

    def __repr__(self):
        return f"-{_wrap(self.operand)}"


@dataclass(frozen=True, repr=False)
class BinaryOp(Score):
    op: str
    left: Score
    right: Score

    def __post_init__(self):
        if self.op not in BINARY_SYMBOLS:
            raise ValueError(f"op: expected one of {tuple(BINARY_SYMBOLS)}, got {self.op!r}")

    def children(self):
        return (self.left, self.right)

    def __repr__(self):
        return f"({self.left!r} {BINARY_SYMBOLS[self.op]} {self.right!r})"


def _check_pool(kernel, mode):
    if isinstance(kernel, bool) or not isinstance(kernel, numbers.Integral) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool kernel: expected an odd int >= 1, got {kernel!r}")
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode: expected one of {POOL_MODES}, got {mode!r}")


@dataclass(frozen=True, repr=False)
class Pool(Score):
    operand: Score
    kernel: int
    mode: str = "avg"

    def __post_init__(self):
        _check_pool(self.kernel, self.mode)

    def children(self):
        return (self.operand,)

    def __repr__(self):
        return f"{_wrap(self.operand)}.pool({self.kernel}, {self.mode!r})"


@dataclass(frozen=True, repr=False)
class Normalize(Score):
    operand: Score

    def children(self):
        return (self.operand,)

    def __repr__(self):
        return f"{_wrap(self.operand)}.normalize()"


@dataclass(frozen=True, repr=False)
class Softmax(Score):
    operand: Score
    temperature: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "temperature", _check_positive("temperature", self.temperature))

    def children(self):
        return (self.operand,)

    def __repr__(self):
        t = "" if self.temperature == 1.0 else repr(self.temperature)
        return f"{_wrap(self.operand)}.softmax({t})"


def _wrap(node: Score) -> str:
    """Parenthesize a unary operand where the printed form would be ambiguous."""
    text = repr(node)
    if isinstance(node, (Neg, Const)) and not text.startswith("("):
        return f"({text})"
    return text


# --------------------------------------------------------------------------- clauses


class Clause:
    """One step of filling the budget. Join clauses with ``|``."""

    forced = False

    def __or__(self, other):
        return Policy((self,)) | other

    def __ror__(self, other):
        return as_policy(other) | self

    def adaptive(self, floor: float = 0.2) -> "Policy":
        """This clause as a policy with AdaKV head budgets (see Policy.adaptive)."""
        return Policy((self,)).adaptive(floor)

    def pyramid(self, beta: float = 20.0) -> "Policy":
        """This clause as a policy with PyramidKV layer budgets (see Policy.pyramid)."""
        return Policy((self,)).pyramid(beta)


@dataclass(frozen=True, repr=False)
class Sink(Clause):
    """Always keep the first ``n`` tokens (attention sinks)."""

    n: Count
    forced = True

    def __post_init__(self):
        object.__setattr__(self, "n", _check_count("sink n", self.n))

    def __repr__(self):
        return f"sink({self.n!r})"


@dataclass(frozen=True, repr=False)
class Recent(Clause):
    """Always keep the last ``n`` tokens; ``n=None`` keeps as many as the budget leaves."""

    n: Optional[Count] = None
    forced = True

    def __post_init__(self):
        object.__setattr__(self, "n", _check_count("recent n", self.n, allow_none=True))

    def __repr__(self):
        return "recent()" if self.n is None else f"recent({self.n!r})"


def _check_clause_score(score):
    if not isinstance(score, Score):
        raise TypeError(f"score: expected a score expression (e.g. -tkv.anchor_similarity()), got {score!r}")
    return score


@dataclass(frozen=True, repr=False)
class Top(Clause):
    """Keep the highest scores among tokens not yet kept (ties to the lower index).

    ``head_reduce`` ("mean", "sum", "max"): every KV head of a batch row ranks by the score
    combined over the row's KV heads, so all heads keep the same tokens (TOVA as published).
    ``chunk`` C > 1: tokens rank by the ``chunk_reduce`` of their chunk's scores (chunks of C
    consecutive positions from 0), so whole chunks are kept (ChunkKV). Both are defined in
    reference.clause_transform."""

    score: Score
    share: Optional[float] = None
    chunk: int = 1
    chunk_reduce: str = "sum"
    head_reduce: Optional[str] = None

    def __post_init__(self):
        _check_clause_score(self.score)
        object.__setattr__(self, "share", _check_share(self.share))
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, numbers.Integral) \
                or not 1 <= self.chunk <= MAX_CHUNK:
            raise ValueError(f"chunk: expected an int in [1, {MAX_CHUNK}] (tokens per chunk; 1 = no chunks), "
                             f"got {self.chunk!r}")
        object.__setattr__(self, "chunk", int(self.chunk))
        if self.chunk_reduce not in CHUNK_REDUCTIONS:
            raise ValueError(f"chunk_reduce: expected one of {CHUNK_REDUCTIONS}, got {self.chunk_reduce!r}")
        if self.head_reduce is not None and self.head_reduce not in REDUCTIONS:
            raise ValueError(f"head_reduce: expected None or one of {REDUCTIONS}, got {self.head_reduce!r}")

    @property
    def transformed(self) -> bool:
        """Whether the clause ranks by something other than its score token by token."""
        return self.chunk > 1 or self.head_reduce is not None

    def __repr__(self):
        extra = "" if self.share is None else f", share={self.share!r}"
        if self.chunk > 1:
            extra += f", chunk={self.chunk!r}" + ("" if self.chunk_reduce == "sum" else f", chunk_reduce={self.chunk_reduce!r}")
        if self.head_reduce is not None:
            extra += f", head_reduce={self.head_reduce!r}"
        return f"top({self.score!r}{extra})"


@dataclass(frozen=True, repr=False)
class Sample(Clause):
    """Draw tokens without replacement, P ∝ softmax(score / temperature), among tokens not yet kept."""

    score: Score
    share: Optional[float] = None
    temperature: float = 1.0

    def __post_init__(self):
        _check_clause_score(self.score)
        object.__setattr__(self, "share", _check_share(self.share))
        object.__setattr__(self, "temperature", _check_positive("temperature", self.temperature))

    def __repr__(self):
        extra = "" if self.share is None else f", share={self.share!r}"
        extra += "" if self.temperature == 1.0 else f", temperature={self.temperature!r}"
        return f"sample({self.score!r}{extra})"


HEAD_BUDGETS = ("uniform", "adaptive")
LAYER_BUDGETS = ("uniform", "pyramid")


@dataclass(frozen=True, repr=False)
class Policy:
    """Clauses filled in order within the budget, plus how the budget is spread.

    ``heads="adaptive"`` (AdaKV) spreads a layer's budget across its KV heads by score;
    ``layers="pyramid"`` (PyramidKV) gives lower layers more budget than upper ones.
    """

    clauses: Tuple[Clause, ...]
    heads: str = "uniform"
    head_floor: float = 0.2
    layers: str = "uniform"
    pyramid_beta: float = 20.0

    def __post_init__(self):
        if not self.clauses:
            raise ValueError("a policy needs at least one clause")
        for c in self.clauses:
            if not isinstance(c, Clause):
                raise TypeError(f"policy clauses: expected tkv clauses (sink/recent/top/sample), got {c!r}")
        explicit = [c.share for c in self.selective[:-1] if c.share is not None]
        if sum(explicit) > 1.0 + 1e-9:
            raise ValueError(f"share: the shares of the clauses before the last sum to {sum(explicit)} > 1")
        if self.heads not in HEAD_BUDGETS:
            raise ValueError(f"heads: expected one of {HEAD_BUDGETS}, got {self.heads!r}")
        if self.layers not in LAYER_BUDGETS:
            raise ValueError(f"layers: expected one of {LAYER_BUDGETS}, got {self.layers!r}")
        if self.heads == "adaptive":
            if len(self.selective) != 1 or not isinstance(self.selective[0], Top):
                raise ValueError("heads='adaptive' (AdaKV) needs exactly one top(...) clause "
                                 "to rank tokens across heads")
            if self.selective[0].transformed:
                raise ValueError("heads='adaptive' (AdaKV) ranks tokens across heads by their own scores; "
                                 "it does not combine with top(..., chunk=...) or head_reduce")
            if not (0.0 <= self.head_floor <= 1.0):
                raise ValueError(f"head_floor: expected a fraction in [0, 1], got {self.head_floor!r}")
        _check_positive("pyramid_beta", self.pyramid_beta)

    def __or__(self, other):
        if isinstance(other, Clause):
            return replace(self, clauses=self.clauses + (other,))
        if isinstance(other, Policy):
            return replace(self, clauses=self.clauses + other.clauses)
        return NotImplemented

    # cached: a policy is frozen, and a planned evict call reads its named inputs' names per call
    @cached_property
    def forced(self) -> Tuple[Clause, ...]:
        return tuple(c for c in self.clauses if c.forced)

    @cached_property
    def selective(self) -> Tuple[Clause, ...]:
        return tuple(c for c in self.clauses if not c.forced)

    @cached_property
    def scores(self) -> Tuple[Score, ...]:
        """The distinct score expressions of the selective clauses, in first-use order."""
        out = []
        for c in self.selective:
            if c.score not in out:
                out.append(c.score)
        return tuple(out)

    @property
    def needs_queries(self) -> bool:
        return any(s.needs_queries for s in self.scores)

    @property
    def needs_keys(self) -> bool:
        return any(s.needs_keys for s in self.scores)

    @property
    def needs_values(self) -> bool:
        return any(s.needs_values for s in self.scores)

    @cached_property
    def signals(self) -> Tuple[str, ...]:
        """Names of the outside scores the policy reads (``signals=`` of evict)."""
        return tuple(dict.fromkeys(name for s in self.scores for name in s.signals))

    @cached_property
    def directions(self) -> Tuple[str, ...]:
        """Names of the per-head directions the policy reads (``directions=`` of evict)."""
        return tuple(dict.fromkeys(name for s in self.scores for name in s.directions))

    def adaptive(self, floor: float = 0.2) -> "Policy":
        """AdaKV: spread the layer's budget across KV heads by score; each head keeps at
        least ``floor`` of its uniform share."""
        return replace(self, heads="adaptive", head_floor=float(floor))

    def pyramid(self, beta: float = 20.0) -> "Policy":
        """PyramidKV: per-layer budgets falling linearly from the first to the last layer,
        the last getting 1/beta of the average; their mean is the budget asked for."""
        return replace(self, layers="pyramid", pyramid_beta=float(beta))

    def __repr__(self):
        text = " | ".join(repr(c) for c in self.clauses)
        if self.heads == "adaptive":
            text = f"({text}).adaptive({self.head_floor!r})"
        if self.layers == "pyramid":
            text = f"({text}).pyramid({self.pyramid_beta!r})" if self.heads == "uniform" \
                else f"{text}.pyramid({self.pyramid_beta!r})"
        return text


def _order_free_score(node: Score) -> bool:
    if isinstance(node, (Position, Random, Pool)):
        return False
    if isinstance(node, ProxyAttention):
        return not (node.causal or node.exclude_window or node.pool_kernel > 1)
    return True


def order_free(policy) -> bool:
    """Whether the tokens ``policy`` keeps, beyond its sink / recent windows, depend only on
    each token's own scores and on statistics over all tokens, never on where a token sits
    among the others: then the rows of a cache may be held in any order, as long as the
    windows' tokens are where the windows look (the first / last rows).

    Not order-free: ``position()``, ``random()`` and ``sample`` (draws keyed by the row),
    ``.pool``, causal or window-excluding ``proxy_attention``, ``top(..., chunk=C)``, and
    ``recent()`` without a count (it keeps the last rows). Ties between equal scores go to
    the lower row, so in another order they may go to other tokens."""
    policy = as_policy(policy)
    for c in policy.clauses:
        if isinstance(c, Sample) or (isinstance(c, Recent) and c.n is None) \
                or (isinstance(c, Top) and c.chunk > 1):
            return False
    return all(_order_free_score(n) for score in policy.scores for n in walk(score))


def _substitute_score(node: Score, fn: Callable[[Score], Score]) -> Score:
    changes = {f.name: _substitute_score(getattr(node, f.name), fn) for f in fields(node)
               if isinstance(getattr(node, f.name), Score)}
    if any(changes[name] is not getattr(node, name) for name in changes):
        node = replace(node, **changes)
    return fn(node)


def substitute(policy, fn: Callable[[Score], Score]) -> Policy:
    """The policy with every score node x replaced by ``fn(x)``, children first (``fn`` gets
    a node whose children are already replaced; returning it unchanged keeps it). Clauses,
    shares and budget spreads stay as they are: e.g. a cache that has the last query's
    attention from its own attention kernel swaps ``proxy_attention(window=1)`` for a
    ``signal``."""
    policy = as_policy(policy)
    clauses = tuple(replace(c, score=_substitute_score(c.score, fn)) if isinstance(c, (Top, Sample)) else c
                    for c in policy.clauses)
    return replace(policy, clauses=clauses)


def as_policy(x) -> Policy:
    """A Policy from a Policy or a single clause; a clear TypeError otherwise."""
    if isinstance(x, Policy):
        return x
    if isinstance(x, Clause):
        return Policy((x,))
    if isinstance(x, Score):
        raise TypeError(f"policy: got a score ({x!r}); wrap it in a clause, e.g. tkv.top({x!r})")
    raise TypeError(f"policy: expected a tritonkv Policy or clause, got {type(x).__name__}")


# --------------------------------------------------------------------------- constructors


def anchor_similarity() -> AnchorSimilarity:
    """Cosine similarity of each key to the mean of its head's L2-normalized keys.
    KeyDiff keeps the least similar keys: ``top(-anchor_similarity())``."""
    return AnchorSimilarity()


def proxy_attention(window: Optional[Count] = None, causal: bool = False, reduce: str = "mean",
                    pool: int = 1, pool_mode: str = "avg", group_reduce: str = "mean",
                    exclude_window: bool = False) -> ProxyAttention:
    """Softmax attention of the proxy queries over all keys, reduced to one number per key.

    window: how many of the given proxy queries to use (the last ones); an int count, a float
        fraction of N, or None for all of them.
    causal: each proxy query (the last positions of the sequence) sees keys up to its own
        position only (SnapKV), or all keys (NACL).
    reduce: how the window's rows combine: "mean", "sum" or "max".
    pool, pool_mode: 1-D pooling over neighbouring keys per query head (odd kernel; 1 = none).
    group_reduce: how a GQA group's query heads combine into their KV head.
    exclude_window: SnapKV's boundary rule: the keys at the window's own positions (the last
        w) are cut off before pooling (pooling sees a sequence of N - w keys) and score 0;
        a policy keeps them with ``recent(w)``.
    """
    return ProxyAttention(window, causal, reduce, pool, pool_mode, group_reduce, exclude_window)


def key_norm() -> KeyNorm:
    """L2 norm of each key (KNorm keeps the lowest: ``top(-key_norm())``)."""
    return KeyNorm()


def value_norm() -> ValueNorm:
    """L2 norm of each value."""
    return ValueNorm()


def random(stream: int = 0) -> Random:
    """Uniform in [0, 1) per token; distinct ``stream`` values give independent draws."""
    return Random(stream)


def position() -> Position:
    """Relative token position i / N."""
    return Position()


def signal(name: str) -> Signal:
    """A per-token score from outside (a learned scorer's output, attention accumulated by an
    attention kernel, token-type priors), passed as ``evict(..., signals={name: tensor})``:
    [B, H_kv, N] (a dim of 1 broadcasts), any float dtype or int32 / int64 (read as float32:
    integers are exact up to 2^24), on the cache's device."""
    return Signal(name)


def key_dot(name: str) -> KeyDot:
    """k . u per key, for a per-head direction u passed as ``evict(..., directions={name: u})``:
    [H_kv, D] or [B, H_kv, D], any float dtype (Q-Filters: ``top(-key_dot("qfilter"))``)."""
    return KeyDot(name)


def sink(n: Count) -> Sink:
    """Always keep the first ``n`` tokens (an int count, or a float fraction of N)."""
    return Sink(n)


def recent(n: Optional[Count] = None) -> Recent:
    """Always keep the last ``n`` tokens (count, fraction of N, or None: what the budget leaves)."""
    return Recent(n)


def top(score: Score, share: Optional[float] = None, *, chunk: int = 1, chunk_reduce: str = "sum",
        head_reduce: Optional[str] = None) -> Top:
    """Keep the highest-scoring tokens not yet kept; ``share`` of what forced clauses leave.

    chunk: rank chunks of ``chunk`` consecutive tokens (aligned at position 0) by the
        ``chunk_reduce`` ("sum", "mean" or "max") of their scores and keep whole chunks, best
        first (ChunkKV); the last chunk taken is cut to the clause's count, earliest tokens first.
    head_reduce: None (each KV head ranks by its own score), or "mean" / "sum" / "max": every
        head of a batch row ranks by the score combined over the row's KV heads, so all heads
        keep the same tokens.
    """
    return Top(score, share, chunk, chunk_reduce, head_reduce)


def sample(score: Score, share: Optional[float] = None, temperature: float = 1.0) -> Sample:
    """Sample tokens not yet kept, without replacement, P ∝ softmax(score / temperature)."""
    return Sample(score, share, temperature)
