"""Generation in the dashboard: decode tokens/s of every cache mode (perf/generation.py's JSON
files under ``<results>/generation/``), the latest run per model and each mode's history.

A file is one run: ``device``, ``commit``, ``time`` and ``rows`` (model, prompt, mode,
baseline, tokens_per_s, ms_per_step, evict_share, sdpa_backend, ...). History compares runs
of the latest run's GPU only; a run that measured a few modes adds points to those modes.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

import plotly.graph_objects as go

from .results import fmt


@dataclass
class GenerationRun:
    path: Path
    device: str
    commit: str
    time: str
    rows: List[Dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.time[:16]} {self.commit[:8]}"

    def models(self) -> List[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))


def load_generation_runs(results_dir: Path) -> List[GenerationRun]:
    """Every generation result file under ``results_dir/generation``, oldest first; files
    without measured rows (a run that failed) are left out."""
    runs = []
    for path in sorted((Path(results_dir) / "generation").glob("*.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        rows = [r for r in data.get("rows", []) if r.get("tokens_per_s")]
        if rows:
            runs.append(GenerationRun(path, data.get("device", "unknown"), str(data.get("commit", "unknown")),
                                      data.get("time", ""), rows))
    return sorted(runs, key=lambda r: (r.time, r.path.name))


def latest_figure(run: GenerationRun, model: str) -> go.Figure:
    """Tokens/s of every mode of ``model`` in ``run``, one bar per prompt length."""
    fig = go.Figure()
    rows = [r for r in run.rows if r["model"] == model]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for prompt in sorted({r["prompt"] for r in rows}):
        got = {r["mode"]: r for r in rows if r["prompt"] == prompt}
        fig.add_trace(go.Bar(x=modes, y=[got[m]["tokens_per_s"] if m in got else None for m in modes],
                             name=f"prompt {prompt // 1024}K",
                             customdata=[fmt(got[m].get("evict_share") and 100 * got[m]["evict_share"], 2)
                                         if m in got else "-" for m in modes],
                             hovertemplate="%{x}: %{y:.1f} tok/s, eviction %{customdata}%<extra></extra>"))
    fig.update_layout(title=f"{model} model: decode tokens/s, latest run", barmode="group",
                      height=460, margin=dict(l=50, r=10, t=40, b=200), legend=dict(font=dict(size=10)))
    fig.update_yaxes(type="log", title="tokens/s (log)")
    fig.update_xaxes(tickangle=35, tickfont=dict(size=10))
    return fig


def history_figure(runs: List[GenerationRun], model: str, prompt: int) -> go.Figure:
    """Tokens/s of each mode of ``model`` at ``prompt`` across ``runs`` (one GPU)."""
    fig = go.Figure()
    modes = list(dict.fromkeys(r["mode"] for run in runs for r in run.rows
                               if r["model"] == model and r["prompt"] == prompt))
    for mode in modes:
        xs, ys = [], []
        for run in runs:
            got = [r for r in run.rows if (r["model"], r["prompt"], r["mode"]) == (model, prompt, mode)]
            if got:
                xs.append(run.label)
                ys.append(got[0]["tokens_per_s"])
        fig.add_trace(go.Scatter(x=xs, y=ys, name=mode, mode="lines+markers"))
    fig.update_layout(title=f"{model} model, prompt {prompt // 1024}K: history", height=420,
                      margin=dict(l=50, r=10, t=40, b=60), legend=dict(font=dict(size=9)))
    fig.update_yaxes(type="log", title="tokens/s (log)")
    fig.update_xaxes(type="category", title="run (date, commit)")
    return fig


def table(run: GenerationRun) -> str:
    head = ("model", "prompt", "mode", "tokens/s", "ms/step", "eviction share", "SDPA backend", "baseline")
    rows = []
    for r in run.rows:
        share = r.get("evict_share")
        cells = [r["model"], r["prompt"], r["mode"], fmt(r["tokens_per_s"], 1), fmt(r.get("ms_per_step"), 3),
                 "-" if share is None else f"{100 * share:.2f}%", r.get("sdpa_backend", "-"),
                 "yes" if r.get("baseline") else ""]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def section(runs: List[GenerationRun]) -> List[Union[str, go.Figure]]:
    """The dashboard's generation section, HTML strings and figures in page order."""
    latest = runs[-1]
    same_gpu = [r for r in runs if r.device == latest.device]
    parts: List[Union[str, go.Figure]] = [
        f"<h2 id='generation'>Generation</h2><div class='meta'>perf/generation.py: latest run "
        f"{html.escape(latest.label)} on {html.escape(latest.device)} ({html.escape(latest.path.name)}); "
        f"{len(same_gpu)} of {len(runs)} generation runs on this GPU in the history</div>"]
    for model in latest.models():
        longest = max(r["prompt"] for r in latest.rows if r["model"] == model)
        parts += ["<div class='grid'>", latest_figure(latest, model), history_figure(same_gpu, model, longest),
                  "</div>"]
    return parts + [table(latest)]
