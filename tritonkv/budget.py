"""How a budget turns into token counts: per head, per clause, per layer.

Pure Python, shared by the reference and the compiled path so both keep the same
number of tokens by construction.

Rounding rule, used everywhere a fraction becomes a count: round half up,
``floor(f * N + 0.5)``. A budget fraction keeps at least one token.

Fill rule: every head keeps exactly ``min(budget, N)`` tokens. A policy whose clauses
cannot use the whole budget (only forced windows, e.g. ``sink(4)`` at budget 10) gives
what they leave to the most recent tokens not kept yet, as if it ended with ``recent()``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Tuple

from .dsl import Policy, Recent, Sink


def fraction_to_count(fraction: float, n: int) -> int:
    return int(math.floor(fraction * n + 0.5))


def resolve_count(count, n: int) -> int:
    """A clause's count (int tokens or float fraction of ``n``) as tokens, at most ``n``."""
    if isinstance(count, float):
        return min(n, fraction_to_count(count, n))
    return min(n, int(count))


def resolve_budget(budget, n: int) -> int:
    """Tokens kept per head: an int (>= 1) or a float fraction of ``n`` in (0, 1].

    ``budget >= n`` keeps everything. Raises with the argument's name on bad input.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget: expected an int token count or a float fraction in (0, 1], "
                        f"got {type(budget).__name__} {budget!r}")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget: expected at least 1 token, got {budget}")
        return min(n, int(budget))
    budget = float(budget)
    if not math.isfinite(budget) or not (0.0 < budget <= 1.0):
        raise ValueError(f"budget: a fraction must be in (0, 1], got {budget!r}; "
                         f"pass an int for a token count")
    return min(n, max(1, fraction_to_count(budget, n)))


@dataclass(frozen=True)
class Allocation:
    """Counts for one head: the forced windows and each selective clause's share."""

    n_sink: int          # tokens [0, n_sink) are kept
    n_recent: int        # tokens [N - n_recent, N) are kept; never overlaps the sinks
    clause_counts: Tuple[int, ...]  # one per selective clause, in order

    @property
    def total(self) -> int:
        return self.n_sink + self.n_recent + sum(self.clause_counts)


def allocate(policy: Policy, n: int, k: int) -> Allocation:
    """Fill ``k`` of ``n`` tokens with the policy's clauses.

    Forced clauses (sink, recent) come first, in the order written, each capped by what
    the budget still allows; ``recent()`` without a count takes all the budget left.
    The remainder R is split among the selective clauses: an explicit share s takes
    round(s * R), clauses without a share split the unassigned share equally, and the
    last clause takes whatever is left, so counts always add up to R.

    A policy without selective clauses fills R with the most recent tokens (the module's
    fill rule): the recent window grows by R, so ``sink(4)`` at k = 10 keeps tokens 0-3
    and the last 6. Either way the counts add up to ``k``.
    """
    n_sink = n_recent = 0
    cap = k
    for clause in policy.forced:
        free = n - n_sink - n_recent        # tokens in neither window yet
        if isinstance(clause, Sink):
            want = resolve_count(clause.n, n)
            add = max(0, min(want - n_sink, cap, free))
            n_sink += add
        elif isinstance(clause, Recent):
            want = cap + n_recent if clause.n is None else resolve_count(clause.n, n)
            add = max(0, min(want - n_recent, cap, free))
            n_recent += add
        else:  # pragma: no cover - forced clauses are sink and recent only
            raise TypeError(clause)
        cap -= add
    selective = policy.selective
    if not selective:   # the fill rule: what the windows leave goes to the latest tokens
        return Allocation(n_sink, n_recent + min(cap, n - n_sink - n_recent), ())
    remainder = cap
    explicit = sum(c.share for c in selective if c.share is not None)
    open_clauses = sum(1 for c in selective if c.share is None)
    default_share = max(0.0, 1.0 - explicit) / open_clauses if open_clauses else 0.0
    counts: List[int] = []
    left = remainder
    for clause in selective[:-1]:
        share = clause.share if clause.share is not None else default_share
        c = min(left, fraction_to_count(share, remainder))
        counts.append(c)
        left -= c
    counts.append(left)
    return Allocation(n_sink, n_recent, tuple(counts))


def pyramid_budgets(budget: int, n_layers: int, beta: float = 20.0) -> List[int]:
    """PyramidKV per-layer token budgets (arXiv 2406.02069): linear from the first layer
    down to ``budget / beta`` at the last, with mean ``budget`` (up to rounding, the total
    is exactly ``budget * n_layers``)."""
    if n_layers < 1:
        raise ValueError(f"n_layers: expected >= 1, got {n_layers}")
    if n_layers == 1:
        return [budget]
    last = budget / beta
    first = 2 * budget - last
    raw = [first - (first - last) * i / (n_layers - 1) for i in range(n_layers)]
    out = [max(1, int(math.floor(x))) for x in raw]
    # hand out what flooring dropped, largest fractional parts first, to keep the total
    short = budget * n_layers - sum(out)
    order = sorted(range(n_layers), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    for i in order[:max(0, short)]:
        out[i] += 1
    return out
