"""Reading benchmark result files: pytest-benchmark JSON (one per run) and the per-case
JSONL that a run writes as it goes (used when a run has no JSON, e.g. cut short)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

CASE_FIELDS = ("policy", "N", "B", "budget")


@dataclass
class Case:
    """One benchmark case of one run."""

    policy: str
    n: int
    batch: int
    budget: float
    median_s: float
    min_s: float
    info: Dict

    @property
    def key(self) -> Tuple:
        return (self.policy, self.n, self.batch, self.budget)

    @property
    def label(self) -> str:
        return f"{self.policy} N={self.n} B={self.batch} budget={self.budget:g}"

    def get(self, name: str) -> Optional[float]:
        return self.info.get(name)


@dataclass
class Run:
    """One benchmark run: its identity and its cases."""

    path: Path
    datetime: str
    commit: str
    gpu: str
    cases: Dict[Tuple, Case] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.datetime[:16]} {self.commit[:8]}"

    def by_policy(self) -> Dict[str, List[Case]]:
        """The run's cases grouped by policy, in the order first measured."""
        out: Dict[str, List[Case]] = {}
        for case in self.cases.values():
            out.setdefault(case.policy, []).append(case)
        return out


def fmt(x: Optional[float], digits: int = 3) -> str:
    """A number for tables, '-' where it was not measured."""
    return "-" if x is None else f"{x:.{digits}f}"


def _case(info: Dict, median_s: float, min_s: float) -> Case:
    return Case(info["policy"], int(info["N"]), int(info["B"]), float(info["budget"]), median_s, min_s, info)


def load_run(path: Path) -> Run:
    """A pytest-benchmark JSON file, or a .cases.jsonl file."""
    path = Path(path)
    if path.name.endswith(".jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        stem = path.name[: -len(".cases.jsonl")]
        parts = stem.split("-")
        run = Run(path, parts[0], parts[-1] if len(parts) > 2 else "unknown",
                  "-".join(parts[1:-1]).replace("_", " ") or "unknown")
        for row in rows:
            case = _case(row, row["median_s"], row["min_s"])
            run.cases[case.key] = case
        return run
    data = json.loads(path.read_text())
    machine = data.get("machine_info", {})
    run = Run(path, data.get("datetime", ""), data.get("tritonkv", {}).get("commit", "unknown"),
              machine.get("gpu", "unknown"))
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if not all(k in info for k in CASE_FIELDS):
            continue
        case = _case(info, bench["stats"]["median"], bench["stats"]["min"])
        run.cases[case.key] = case
    return run


def load_runs(directory: Path) -> List[Run]:
    """Every run under a directory, oldest first. A JSONL whose run also has a JSON is skipped."""
    directory = Path(directory)
    runs = [load_run(p) for p in sorted(directory.glob("*.json"))]
    seen = {r.path.stem for r in runs}
    for p in sorted(directory.glob("*.cases.jsonl")):
        if p.name[: -len(".cases.jsonl")] not in seen:
            runs.append(load_run(p))
    runs = [r for r in runs if r.cases]
    return sorted(runs, key=lambda r: (r.datetime, r.path.name))


def by_commit(runs: List[Run]) -> List[Run]:
    """Consecutive runs of one commit on one GPU merged into one (a suite split over several
    calls, or re-run in part): later runs' cases replace earlier ones. Oldest first."""
    merged: List[Run] = []
    for run in runs:
        last = merged[-1] if merged else None
        if last is not None and (last.commit, last.gpu) == (run.commit, run.gpu) and run.commit != "unknown":
            merged[-1] = Run(run.path, run.datetime, run.commit, run.gpu, {**last.cases, **run.cases})
        else:
            merged.append(Run(run.path, run.datetime, run.commit, run.gpu, dict(run.cases)))
    return merged
