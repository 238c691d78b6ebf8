"""Regression detection between two runs.

Rule (noise-aware): a case regressed when BOTH its median time and its minimum time grew
by more than the threshold (default 10%) against the baseline run on the same GPU. A noisy
run inflates the median but rarely the minimum; a real slowdown moves both. Improvements
are reported the same way, with the ratios below 1 / (1 + threshold). Each line also shows
the ratio of the CUDA-graph replay times (gpu_ms) where both runs have them: a wall-time
change with an unchanged GPU ratio is on the host (Python, launches), not in the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .results import Case, Run, load_run, load_runs

DEFAULT_THRESHOLD = 0.10


@dataclass
class Change:
    case: Case
    baseline: Case
    median_ratio: float
    min_ratio: float
    threshold: float

    @property
    def regressed(self) -> bool:
        return self.median_ratio > 1 + self.threshold and self.min_ratio > 1 + self.threshold

    @property
    def gpu_ratio(self) -> Optional[float]:
        new, base = self.case.get("gpu_ms"), self.baseline.get("gpu_ms")
        return new / base if new and base else None

    @property
    def improved(self) -> bool:
        limit = 1 / (1 + self.threshold)
        return self.median_ratio < limit and self.min_ratio < limit


def compare(new: Run, baseline: Run, threshold: float = DEFAULT_THRESHOLD) -> List[Change]:
    changes = []
    for key, case in new.cases.items():
        base = baseline.cases.get(key)
        if base is None or base.median_s <= 0 or base.min_s <= 0:
            continue
        changes.append(Change(case, base, case.median_s / base.median_s, case.min_s / base.min_s, threshold))
    return changes


def previous_run(new: Run, directory: Path) -> Optional[Run]:
    """The latest run before ``new`` on the same GPU, from the directory holding results."""
    candidates = [r for r in load_runs(directory)
                  if r.gpu == new.gpu and r.path.resolve() != new.path.resolve()
                  and (r.datetime, r.path.name) < (new.datetime, new.path.name)]
    return candidates[-1] if candidates else None


def main(new_path: str, baseline_path: Optional[str], threshold: float) -> int:
    new = load_run(Path(new_path))
    baseline = load_run(Path(baseline_path)) if baseline_path else previous_run(new, Path(new_path).parent)
    if baseline is None:
        print(f"no baseline: no earlier run on {new.gpu} beside {new_path}")
        return 0
    changes = compare(new, baseline, threshold)
    print(f"{new.label} vs {baseline.label} on {new.gpu}: {len(changes)} common cases, "
          f"regression = median and min both > {1 + threshold:.2f}x")
    regressions = [c for c in changes if c.regressed]
    for c in sorted(changes, key=lambda c: -c.median_ratio):
        if c.regressed or c.improved:
            tag = "REGRESSION" if c.regressed else "improved"
            gpu = "" if c.gpu_ratio is None else f"  (GPU replay {c.gpu_ratio:5.2f}x)"
            print(f"  {tag:<10} {c.case.label:<48} median {c.median_ratio:5.2f}x  min {c.min_ratio:5.2f}x{gpu}")
    print(f"{len(regressions)} regression(s)")
    return 1 if regressions else 0
