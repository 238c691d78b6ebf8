"""The static HTML dashboard (plotly, no CDN: plotly.js is written beside the page)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import List, Set, Tuple

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from .compare import DEFAULT_HOST_THRESHOLD, DEFAULT_THRESHOLD, compare, latest_comparable
from .generation import load_generation_runs, section
from .results import Run, by_commit, fmt, load_runs

# (name, extra_info field, colour): tritonkv's wall time beside each baseline's
PROVIDERS = (("tritonkv", "time_ms", "#1f77b4"), ("eager", "eager_ms", "#d62728"),
             ("torch.compile", "compile_ms", "#2ca02c"), ("peer", "peer_ms", "#9467bd"),
             ("peer compiled", "peer_compile_ms", "#ff7f0e"))
DASHES = {0.1: "dot", 0.5: "solid"}
SYMBOLS = {1: "circle", 4: "square"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { margin-bottom: 4px; } .meta { color: #555; margin-bottom: 16px; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
table { border-collapse: collapse; font-size: 13px; } th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f3f3f3; position: sticky; top: 0; } td:first-child, th:first-child { text-align: left; }
tr.regressed td { background: #fdd; } tr.improved td { background: #dfd; }
.flag { font-weight: bold; color: #b00; }
"""


def scaling_figures(policy: str, cases) -> Tuple[go.Figure, go.Figure]:
    """Time vs N and multiple-of-floor vs N, tritonkv beside eager and torch.compile."""
    time_fig, floor_fig = go.Figure(), go.Figure()
    groups = sorted({(c.batch, c.budget) for c in cases})
    for provider, field, color in PROVIDERS:
        for batch, budget in groups:
            pts = sorted((c for c in cases if (c.batch, c.budget) == (batch, budget) and c.get(field)),
                         key=lambda c: c.n)
            if not pts:
                continue
            common = dict(mode="lines+markers", legendgroup=provider,
                          line=dict(color=color, dash=DASHES.get(budget, "dash")),
                          marker=dict(symbol=SYMBOLS.get(batch, "diamond"), size=7))
            name = f"{provider} B={batch} budget={budget:g}"
            time_fig.add_trace(go.Scatter(x=[c.n for c in pts], y=[c.get(field) for c in pts], name=name, **common))
            floor_fig.add_trace(go.Scatter(x=[c.n for c in pts], y=[c.get(field) / c.get("floor_ms") for c in pts],
                                           name=name, showlegend=False, **common))
    for fig, title, ylabel in ((time_fig, f"{policy}: time per evict()", "ms (log)"),
                               (floor_fig, f"{policy}: time / HBM floor", "x floor (log)")):
        fig.update_layout(title=title, height=380, margin=dict(l=50, r=10, t=40, b=40),
                          legend=dict(font=dict(size=10)))
        fig.update_xaxes(type="log", title="N (tokens per head)")
        fig.update_yaxes(type="log", title=ylabel)
    floor_fig.add_hline(y=1.0, line=dict(color="#888", dash="dash"))
    return time_fig, floor_fig


def history_figure(policy: str, runs: List[Run], flagged: Set[Tuple]) -> go.Figure:
    """Kernel time (CUDA-graph replay; the wall median for runs without it) of every case of
    a policy across runs (same GPU), cases that regressed in the latest run marked."""
    fig = go.Figure()
    keys = sorted({k for r in runs for k in r.cases if k[0] == policy})
    for key in keys:
        xs, ys = [], []
        for r in runs:
            if key in r.cases:
                xs.append(r.label)
                ys.append(r.cases[key].get("gpu_ms") or r.cases[key].median_s * 1e3)
        name = f"N={key[1]} B={key[2]} budget={key[3]:g}"
        width = 4 if key in flagged else 1.5
        fig.add_trace(go.Scatter(x=xs, y=ys, name=name + (" (regressed)" if key in flagged else ""),
                                 mode="lines+markers", line=dict(width=width)))
    fig.update_layout(title=f"{policy}: history (GPU replay ms per run)", height=360,
                      margin=dict(l=50, r=10, t=40, b=60), legend=dict(font=dict(size=9)))
    fig.update_yaxes(type="log", title="ms (log)")
    fig.update_xaxes(type="category", title="run (date, commit)")
    return fig


def table(run: Run, changes) -> str:
    by_key = {c.case.key: c for c in changes}
    head = ("policy", "N", "B", "budget", "ms", "GPU ms", "host µs", "floor ms", "x floor", "x floor (GPU)",
            "vs eager", "vs compile", "vs peer", "vs peer compiled", "extra B/token/head",
            "GPU replay vs previous", "host vs previous", "wall vs previous", "verdict")
    rows = []
    for case in sorted(run.cases.values(), key=lambda c: c.key):
        change = by_key.get(case.key)
        cls, verdict = "", ""
        if change is not None and change.regressed:
            cls, verdict = "regressed", " + ".join(change.regressed_sides()) + " REGRESSED"
        elif change is not None and change.improved:
            cls, verdict = "improved", " + ".join(change.improved_sides()) + " improved"
        ratio = lambda get: fmt(get(change), 2) if change is not None else "-"  # noqa: E731
        cells = [case.policy, case.n, case.batch, f"{case.budget:g}", fmt(case.get("time_ms")),
                 fmt(case.get("gpu_ms")), fmt(case.get("host_us"), 1), fmt(case.get("floor_ms")),
                 fmt(case.get("x_floor"), 2), fmt(case.get("x_floor_gpu"), 2),
                 fmt(case.get("speedup_vs_eager"), 1), fmt(case.get("speedup_vs_compile"), 1),
                 fmt(case.get("speedup_vs_peer"), 1), fmt(case.get("speedup_vs_peer_compile"), 1),
                 fmt(case.get("extra_bytes_per_token_head"), 1), ratio(lambda c: c.gpu_ratio),
                 ratio(lambda c: c.host_ratio), ratio(lambda c: c.median_ratio), verdict]
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def build(results_dir: Path, out_dir: Path, threshold: float = DEFAULT_THRESHOLD,
          host_threshold: float = DEFAULT_HOST_THRESHOLD) -> Path:
    runs = load_runs(results_dir)
    if not runs:
        raise SystemExit(f"no result files in {results_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plotly.min.js").write_text(get_plotlyjs())
    # one entry per commit: a suite measured over several calls shows as one run
    same_gpu = by_commit([r for r in runs if r.gpu == runs[-1].gpu])
    latest = same_gpu[-1]
    previous = latest_comparable(latest, same_gpu[:-1])
    changes = compare(latest, previous, threshold, host_threshold) if previous is not None else []
    flagged = {c.case.key for c in changes if c.regressed}
    per_side = {side: sum(side in c.regressed_sides() for c in changes) for side in ("kernel", "host", "wall")}
    parts, fig_id = [], 0

    def add(fig):
        nonlocal fig_id
        fig_id += 1
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig{fig_id}"))

    for policy, cases in sorted(latest.by_policy().items()):
        parts.append(f'<h2 id="{html.escape(policy)}">{html.escape(policy)}</h2><div class="grid">')
        for fig in scaling_figures(policy, cases):
            add(fig)
        parts.append("</div>")
        add(history_figure(policy, same_gpu, flagged))
    generation = load_generation_runs(results_dir)
    for part in section(generation) if generation else []:
        if isinstance(part, str):
            parts.append(part)
        else:
            add(part)
    baseline = (f" vs previous run {previous.label} ({len(changes)} cases in common)" if previous is not None
                else " (no previous run on this GPU with cases in common)")
    meta = (f"latest run {html.escape(latest.label)} on {html.escape(latest.gpu)}: {len(latest.cases)} cases; "
            f"{len(runs)} result files ({len(same_gpu)} commits on this GPU) in {html.escape(str(results_dir))}; "
            f'<span class="flag">{len(flagged)} regression(s)</span>{html.escape(baseline)}: '
            f"{per_side['kernel']} on the kernel side (CUDA-graph replay), {per_side['host']} on the host side "
            f"(host time per call)"
            + (f", {per_side['wall']} by wall time (no replay times)" if per_side["wall"] else "")
            + f"; typical and best time both above {1 + threshold:.2f}x (kernel), {1 + host_threshold:.2f}x (host)")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tritonkv perf</title>"
            f"<script src='plotly.min.js'></script><style>{STYLE}</style></head><body>"
            f"<h1>tritonkv performance</h1><div class='meta'>{meta}</div>"
            + "".join(parts) + "<h2>Latest run (evict)</h2>" + table(latest, changes) + "</body></html>")
    index = out_dir / "index.html"
    index.write_text(page)
    return index
