"""Regression detection between two runs, judged on two sides separately.

- kernel side: the CUDA-graph replay time (``gpu_ms``, and ``gpu_min_ms`` where recorded),
  which a slower or busier host machine does not move;
- host side: the host time per call of back-to-back calls (``host_us``, and ``host_min_us``
  where recorded), which kernel changes do not move while the host is the bottleneck.

Rule (noise-aware), per side: a case regressed when both its typical time (replay median;
host mean) and its best time (replay min; best block of host calls) grew by more than the
side's threshold against the baseline run on the same GPU; a noisy run inflates the typical
time but rarely the best. Thresholds: 10% for kernels (replay times of one commit agree
within a few %), 25% for the host. The host side is advisory across machines: the H100
machines' CPUs run the same calls 1.5-2.6x slower in spells of seconds (thread CPU time moves
with the wall clock, no steal: perf/host_noise_probe.py), so two runs of one commit differed
by 0.40-1.74x per case (b26ea67 / 822a50a); compare host time within one process instead
(perf/setting_ab.py). Where a run recorded no best time, the typical time alone
decides. A side is not judged where either run lacks its fields (older runs have no
``host_us``). Only where neither run has replay times does the wall time (``median_s`` /
``min_s``, host launch included) stand in for the kernel side, reported as the "wall" side.
Improvements are reported the same way, with ratios below 1 / (1 + threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .results import Case, Run, load_run, load_runs

DEFAULT_THRESHOLD = 0.10
DEFAULT_HOST_THRESHOLD = 0.25
SIDES = ("kernel", "host")
# per side: the typical time and the best time, as extra_info fields
FIELDS = {"kernel": ("gpu_ms", "gpu_min_ms"), "host": ("host_us", "host_min_us")}


@dataclass
class Change:
    """One case of a new run beside the same case of the baseline run."""

    case: Case
    baseline: Case
    threshold: float = DEFAULT_THRESHOLD            # kernel (and wall) side
    host_threshold: float = DEFAULT_HOST_THRESHOLD

    def _ratio(self, name: str) -> Optional[float]:
        new, base = self.case.get(name), self.baseline.get(name)
        return new / base if new and base else None

    @property
    def median_ratio(self) -> float:
        """Wall time (one call, host launch included), median: new / baseline."""
        return self.case.median_s / self.baseline.median_s

    @property
    def min_ratio(self) -> float:
        return self.case.min_s / self.baseline.min_s

    @property
    def gpu_ratio(self) -> Optional[float]:
        """CUDA-graph replay time, median: new / baseline (None where either lacks it)."""
        return self._ratio("gpu_ms")

    @property
    def host_ratio(self) -> Optional[float]:
        """Host time per call, mean: new / baseline (None where either lacks it)."""
        return self._ratio("host_us")

    def ratios(self, side: str) -> Optional[Tuple[float, Optional[float]]]:
        """(typical, best) ratio of a side, best None where not recorded; None where the side
        cannot be judged. The kernel side falls back to wall time only where neither run has
        replay times."""
        if side == "wall":
            return self.median_ratio, self.min_ratio
        typical, best = FIELDS[side]
        if self._ratio(typical) is None:
            return None
        return self._ratio(typical), self._ratio(best)

    @property
    def kernel_side(self) -> str:
        """'kernel', or 'wall' where neither run has replay times to judge kernels by."""
        no_replay = self.case.get("gpu_ms") is None and self.baseline.get("gpu_ms") is None
        return "wall" if no_replay else "kernel"

    def _moved(self, side: str, slower: bool) -> bool:
        ratios = self.ratios(side)
        if ratios is None:
            return False
        limit = 1 + (self.host_threshold if side == "host" else self.threshold)
        return all((r > limit) if slower else (r < 1 / limit) for r in ratios if r is not None)

    def regressed_sides(self, judge=SIDES) -> List[str]:
        """The sides ('kernel' / 'wall', 'host') on which this case regressed."""
        return [s for s in self._sides(judge) if self._moved(s, slower=True)]

    def improved_sides(self, judge=SIDES) -> List[str]:
        return [s for s in self._sides(judge) if self._moved(s, slower=False)]

    def _sides(self, judge) -> List[str]:
        return [self.kernel_side if s == "kernel" else s for s in SIDES if s in judge]

    @property
    def kernel_regressed(self) -> bool:
        return self.kernel_side == "kernel" and self._moved("kernel", slower=True)

    @property
    def host_regressed(self) -> bool:
        return self._moved("host", slower=True)

    @property
    def regressed(self) -> bool:
        return bool(self.regressed_sides())

    @property
    def improved(self) -> bool:
        return not self.regressed and bool(self.improved_sides())


def compare(new: Run, baseline: Run, threshold: float = DEFAULT_THRESHOLD,
            host_threshold: float = DEFAULT_HOST_THRESHOLD) -> List[Change]:
    changes = []
    for key, case in new.cases.items():
        base = baseline.cases.get(key)
        if base is None or base.median_s <= 0 or base.min_s <= 0:
            continue
        changes.append(Change(case, base, threshold, host_threshold))
    return changes


def latest_comparable(new: Run, earlier: List[Run]) -> Optional[Run]:
    """The latest of ``earlier`` (oldest first) that shares a case with ``new``: a run of other
    shapes (the compile suite's 32K beside the kernels suite's 128K / 512K) has nothing to
    compare, and taking it would report no regression for want of cases."""
    return next((run for run in reversed(earlier) if run.cases.keys() & new.cases.keys()), None)


def previous_run(new: Run, directory: Path) -> Optional[Run]:
    """The latest run before ``new`` on the same GPU that shares cases with it, from the
    directory holding results."""
    candidates = [r for r in load_runs(directory)
                  if r.gpu == new.gpu and r.path.resolve() != new.path.resolve()
                  and (r.datetime, r.path.name) < (new.datetime, new.path.name)]
    return latest_comparable(new, candidates)


def _ratio_text(name: str, ratios: Optional[Tuple[float, Optional[float]]]) -> str:
    if ratios is None:
        return f"{name} -"
    typical, best = ratios
    return f"{name} {typical:5.2f}x" + ("" if best is None else f" (best {best:4.2f}x)")


def describe(change: Change, judge=SIDES) -> str:
    """One line: what moved, on which side, with every ratio (new / baseline)."""
    regressed, improved = change.regressed_sides(judge), change.improved_sides(judge)
    tag = "REGRESSION" if regressed else "improved"
    sides = "+".join(regressed or improved)
    return (f"  {tag:<10} {sides:<11} {change.case.label:<44} "
            f"{_ratio_text('GPU replay', change.ratios('kernel'))}  {_ratio_text('host', change.ratios('host'))}  "
            f"{_ratio_text('wall', change.ratios('wall'))}")


def main(new_path: str, baseline_path: Optional[str], threshold: float, judge=SIDES,
         host_threshold: float = DEFAULT_HOST_THRESHOLD) -> int:
    new = load_run(Path(new_path))
    baseline = load_run(Path(baseline_path)) if baseline_path else previous_run(new, Path(new_path).parent)
    if baseline is None:
        print(f"no baseline: no earlier run on {new.gpu} with cases in common beside {new_path}")
        return 0
    changes = compare(new, baseline, threshold, host_threshold)
    print(f"{new.label} vs {baseline.label} on {new.gpu}: {len(changes)} common cases, judging "
          f"{' and '.join(judge)}: regression = typical and best time both > {1 + threshold:.2f}x "
          f"for kernels (CUDA-graph replay), > {1 + host_threshold:.2f}x for the host (host time per call)")
    regressions = [c for c in changes if c.regressed_sides(judge)]
    moved = [c for c in changes if c.regressed_sides(judge) or c.improved_sides(judge)]
    for c in sorted(moved, key=lambda c: (not c.regressed_sides(judge), c.case.key)):
        print(describe(c, judge))
    by_side = {s: sum(s in c.regressed_sides(judge) for c in changes) for s in ("kernel", "wall", "host")}
    print(f"{len(regressions)} regression(s): " + ", ".join(f"{s} {k}" for s, k in by_side.items() if k or s != "wall"))
    return 1 if regressions else 0
