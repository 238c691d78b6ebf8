"""The perf dashboard: result loading, the regression rule, the CLI, and the page rendering
in headless Chromium without console errors."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tritonkv.dashboard.compare import compare, previous_run
from tritonkv.dashboard.build import build
from tritonkv.dashboard.results import by_commit, load_run, load_runs


def write_run(directory: Path, stamp: str, commit: str, gpu: str, cases):
    """A minimal pytest-benchmark JSON; cases: {(policy, N, B, budget): (median_s, min_s)}."""
    benchmarks = []
    for (policy, n, b, budget), (median, minimum) in cases.items():
        info = dict(policy=policy, N=n, B=b, budget=budget, time_ms=median * 1e3, gpu_ms=median * 900,
                    floor_ms=median * 500, x_floor=2.0, x_floor_gpu=1.8, eager_ms=median * 6e3,
                    compile_ms=median * 3e3 if n <= 131072 else None, speedup_vs_eager=6.0,
                    speedup_vs_compile=3.0 if n <= 131072 else None, extra_bytes_per_token_head=4.0)
        benchmarks.append(dict(name=f"test_evict[{policy}-{n}-{b}-{budget}]",
                               stats=dict(median=median, min=minimum), extra_info=info))
    path = directory / f"{stamp}-{gpu.replace(' ', '_')}-{commit}.json"
    path.write_text(json.dumps(dict(datetime=stamp, machine_info=dict(gpu=gpu), tritonkv=dict(commit=commit),
                                    benchmarks=benchmarks)))
    return path


BASE = {("knorm", n, b, budget): (1e-3 * n / 8192 * b, 0.9e-3 * n / 8192 * b)
        for n in (8192, 32768, 131072) for b in (1, 4) for budget in (0.1, 0.5)}
BASE.update({("snapkv", n, 1, 0.5): (2e-3 * n / 8192, 1.9e-3 * n / 8192) for n in (8192, 131072)})
REGRESSED = ("knorm", 32768, 1, 0.5)      # median and min 1.3x slower: a real regression
NOISY = ("knorm", 131072, 4, 0.1)         # median 1.4x, min 1.02x: noise, not flagged
IMPROVED = ("snapkv", 131072, 1, 0.5)


@pytest.fixture
def results(tmp_path):
    write_run(tmp_path, "2026-11-20T10:00:00", "aaaa111", "NVIDIA H100", BASE)
    write_run(tmp_path, "2026-11-21T10:00:00", "bbbb222", "NVIDIA H200", {k: (v[0] / 2, v[1] / 2) for k, v in BASE.items()})
    new = dict(BASE)
    new[REGRESSED] = (BASE[REGRESSED][0] * 1.3, BASE[REGRESSED][1] * 1.3)
    new[NOISY] = (BASE[NOISY][0] * 1.4, BASE[NOISY][1] * 1.02)
    new[IMPROVED] = (BASE[IMPROVED][0] * 0.7, BASE[IMPROVED][1] * 0.7)
    new_path = write_run(tmp_path, "2026-11-22T10:00:00", "cccc333", "NVIDIA H100", new)
    clean_path = write_run(tmp_path, "2026-11-23T10:00:00", "dddd444", "NVIDIA H100", new)
    return tmp_path, new_path, clean_path


def test_rule_flags_the_planted_regression_only(results):
    directory, new_path, _ = results
    new = load_run(new_path)
    baseline = previous_run(new, directory)
    assert baseline.commit == "aaaa111"           # the H200 run in between is not a baseline for H100
    changes = {c.case.key: c for c in compare(new, baseline)}
    assert [k for k, c in changes.items() if c.regressed] == [REGRESSED]
    assert not changes[NOISY].regressed and changes[NOISY].median_ratio > 1.3
    assert [k for k, c in changes.items() if c.improved] == [IMPROVED]


def test_compare_command_exit_codes(results):
    directory, new_path, clean_path = results
    run = lambda *a: subprocess.run([sys.executable, "-m", "tritonkv.dashboard", "compare", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True)
    flagged = run(new_path)
    assert flagged.returncode == 1, flagged.stdout + flagged.stderr
    assert "REGRESSION" in flagged.stdout and "knorm N=32768 B=1 budget=0.5" in flagged.stdout
    assert "1 regression(s)" in flagged.stdout
    assert run(clean_path).returncode == 0                          # vs the previous run: identical
    assert run(clean_path, directory / "2026-11-20T10:00:00-NVIDIA_H100-aaaa111.json").returncode == 1


def test_loads_jsonl_of_a_run_cut_short(tmp_path):
    row = dict(policy="knorm", N=8192, B=1, budget=0.5, time_ms=0.2, median_s=2e-4, min_s=1.9e-4)
    (tmp_path / "20261124T000000-NVIDIA_H100-abc1234.cases.jsonl").write_text(json.dumps(row) + "\n")
    runs = load_runs(tmp_path)
    assert len(runs) == 1 and runs[0].commit == "abc1234" and runs[0].gpu == "NVIDIA H100"
    assert runs[0].cases[("knorm", 8192, 1, 0.5)].median_s == 2e-4


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=15000"]


def test_page_renders_in_headless_chromium(results, tmp_path_factory):
    directory, _, clean_path = results
    clean_path.unlink()   # the latest run is then the one with the planted regression
    site = tmp_path_factory.mktemp("site")
    out = subprocess.run([sys.executable, "-m", "tritonkv.dashboard", "build", str(directory), "-o", str(site)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    page = (site / "index.html").read_text()
    assert "cdn" not in page.lower() and (site / "plotly.min.js").stat().st_size > 1_000_000   # offline
    assert page.count('class="regressed"') == 1
    figures = page.count('class="plotly-graph-div"')
    assert figures == 2 * 3   # two policies: time vs N, x floor vs N, history

    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    url = (site / "index.html").as_uri()
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, "console messages:\n" + "\n".join(console)
    rendered = len(re.findall(r'class="main-svg"', dom.stdout))
    assert rendered >= figures, f"only {rendered} plot surfaces rendered for {figures} figures"
    shot = site / "screenshot.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1800",
                    f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000


def test_runs_of_one_commit_merge(tmp_path):
    """A suite split over two calls at one commit is one run on the dashboard; later cases win."""
    first = {k: v for k, v in BASE.items() if k[0] == "knorm"}
    second = {k: v for k, v in BASE.items() if k[0] == "snapkv"}
    second[REGRESSED] = (1.0, 1.0)
    write_run(tmp_path, "2026-11-20T10:00:00", "aaaa111", "NVIDIA H100", BASE)
    write_run(tmp_path, "2026-11-22T10:00:00", "cccc333", "NVIDIA H100", first)
    write_run(tmp_path, "2026-11-22T11:00:00", "cccc333", "NVIDIA H100", second)
    merged = by_commit(load_runs(tmp_path))
    assert [r.commit for r in merged] == ["aaaa111", "cccc333"]
    assert set(merged[-1].cases) == set(BASE) and merged[-1].cases[REGRESSED].median_s == 1.0
    page = build(tmp_path, tmp_path / "site").read_text()
    assert "snapkv: time per evict()" in page and "2 commits on this GPU" in page
