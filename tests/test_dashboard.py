"""The perf dashboard: result loading, the regression rule (kernel side by CUDA-graph replay
time, host side by host time per call, judged separately), the CLI, and the page rendering
in headless Chromium without console errors."""

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tritonkv.dashboard.compare import compare, previous_run
from tritonkv.dashboard.__main__ import main as dashboard_main
from tritonkv.dashboard.results import by_commit, load_run, load_runs


def write_run(directory: Path, stamp: str, commit: str, gpu: str, cases):
    """A minimal pytest-benchmark JSON; cases: {(policy, N, B, budget): (median_s, min_s)} or
    (median_s, min_s, {field: value}). Unless overridden, the replay and host times scale
    with the wall times (a field set to None is left out, as in older runs)."""
    benchmarks = []
    for (policy, n, b, budget), (median, minimum, *fields) in cases.items():
        info = dict(policy=policy, N=n, B=b, budget=budget, time_ms=median * 1e3, gpu_ms=median * 900,
                    gpu_min_ms=minimum * 900, host_us=median * 3e4, host_min_us=minimum * 3e4,
                    floor_ms=median * 500, x_floor=2.0, x_floor_gpu=1.8, eager_ms=median * 6e3,
                    compile_ms=median * 3e3 if n <= 131072 else None, speedup_vs_eager=6.0,
                    speedup_vs_compile=3.0 if n <= 131072 else None, peer_ms=median * 4e3, speedup_vs_peer=4.0,
                    peer_compile_ms=median * 2.5e3, speedup_vs_peer_compile=2.5, extra_bytes_per_token_head=4.0)
        info.update(fields[0] if fields else {})
        info = {k: v for k, v in info.items() if v is not None}
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


def test_baseline_shares_cases_with_the_new_run(results, tmp_path_factory):
    """A later run of other shapes (the compile suite's 32K beside the kernels suite's 128K /
    512K) is no baseline: compare and the dashboard take the latest run with cases in common,
    so a regression is not lost for want of cases to compare."""
    directory, new_path, clean_path = results
    clean_path.unlink()
    other = {("knorm", 524288, 1, 0.5): (9e-3, 8e-3)}   # no case of the runs around it
    write_run(directory, "2026-11-21T12:00:00", "eeee555", "NVIDIA H100", other)
    new = load_run(new_path)
    assert previous_run(new, directory).commit == "aaaa111"
    out = subprocess.run([sys.executable, "-m", "tritonkv.dashboard", "compare", str(new_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "aaaa111" in out.stdout and "1 regression(s)" in out.stdout, out.stdout
    lonely = write_run(tmp_path_factory.mktemp("lonely"), "2026-11-22T10:00:00", "ffff666", "NVIDIA H100", other)
    assert previous_run(load_run(lonely), lonely.parent) is None
    page = build_page(directory, tmp_path_factory.mktemp("site")).read_text()
    assert f"vs previous run 2026-11-20T10:00 aaaa111 ({len(BASE)} cases in common)" in page


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


def build_page(*args, **kwargs):
    """The dashboard page (tritonkv.dashboard.build needs plotly: a machine without it, such as
    the GPU machine, skips the tests that render, and runs the rest)."""
    pytest.importorskip("plotly", reason="the dashboard renders with plotly")
    from tritonkv.dashboard.build import build
    return build(*args, **kwargs)


def test_page_renders_in_headless_chromium(results, tmp_path_factory):
    pytest.importorskip("plotly", reason="the dashboard renders with plotly")
    directory, _, clean_path = results
    clean_path.unlink()   # the latest run is then the one with the planted regression
    site = tmp_path_factory.mktemp("site")
    out = subprocess.run([sys.executable, "-m", "tritonkv.dashboard", "build", str(directory), "-o", str(site)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    page = (site / "index.html").read_text()
    assert "cdn" not in page.lower() and (site / "plotly.min.js").stat().st_size > 1_000_000   # offline
    assert page.count('class="regressed"') == 1 and "kernel + host REGRESSED" in page
    for column in ("host µs", "vs peer", "vs peer compiled", "GPU replay vs previous", "host vs previous"):
        assert f"<th>{column}</th>" in page
    assert "1 on the kernel side (CUDA-graph replay), 1 on the host side" in page
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
    page = build_page(tmp_path, tmp_path / "site").read_text()
    assert "snapkv: time per evict()" in page and "2 commits on this GPU" in page


def scaled(cases, wall=1.0, gpu=1.0, host=1.0, keep=("gpu", "host")):
    """The cases with wall, replay and host times scaled separately (median and min alike);
    ``keep`` drops the replay / host fields of the sides not named, as older runs lack them."""
    out = {}
    for key, (median, minimum) in cases.items():
        fields = dict(gpu_ms=median * 900 * gpu, gpu_min_ms=minimum * 900 * gpu,
                      host_us=median * 3e4 * host, host_min_us=minimum * 3e4 * host)
        for side in ("gpu", "host"):
            if side not in keep:
                fields.update({f"{side}_{suffix}": None for suffix in (("ms", "min_ms") if side == "gpu"
                                                                       else ("us", "min_us"))})
        out[key] = (median * wall, minimum * wall, fields)
    return out


def compare_cli(*args):
    """`python -m tritonkv.dashboard compare ARGS` in this process (test_compare_command_exit_codes
    runs the real command): its exit code and stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = dashboard_main(["compare", *map(str, args)])
    return subprocess.CompletedProcess(args, code, out.getvalue(), "")


def test_slower_host_machine_flags_no_kernel_regression(tmp_path):
    """Every wall time 1.5x (a slower host machine), replay unchanged: only host regressions."""
    base = write_run(tmp_path, "2026-11-20T10:00:00", "aaaa111", "NVIDIA H100", scaled(BASE))
    new = write_run(tmp_path, "2026-11-21T10:00:00", "bbbb222", "NVIDIA H100", scaled(BASE, wall=1.5, host=1.5))
    changes = compare(load_run(new), load_run(base))
    assert len(changes) == len(BASE) and all(c.median_ratio > 1.4 for c in changes)
    assert not any(c.kernel_regressed for c in changes)
    assert all(c.regressed_sides() == ["host"] for c in changes)
    flagged = compare_cli(new, base, "--judge", "both")
    assert flagged.returncode == 1 and f"{len(BASE)} regression(s): kernel 0, host {len(BASE)}" in flagged.stdout
    kernels_only = compare_cli(new, base)   # the default judges kernels alone
    assert kernels_only.returncode == 0 and "0 regression(s)" in kernels_only.stdout, kernels_only.stdout


def test_two_runs_of_the_same_kernels_pass_the_default_gate():
    """perf/results holds two H100 runs of the same kernels (b26ea67, and 822a50a, which changed only
    perf scripts): kernel time agrees within the threshold, so the default gate passes, while their
    host times per call differ by 0.40-1.74x per case (spells of slow CPU on those machines), which
    the host side, judged only when asked, calls regressions."""
    results = Path(__file__).resolve().parents[1] / "perf" / "results"
    new = results / "20261207T090104-NVIDIA_H100_80GB_HBM3-822a50a.json"
    base = results / "20261207T084908-NVIDIA_H100_80GB_HBM3-b26ea67.json"
    gate = compare_cli(new, base)
    assert gate.returncode == 0 and "0 regression(s)" in gate.stdout, gate.stdout
    both = compare_cli(new, base, "--judge", "both")
    assert both.returncode == 1 and "kernel 0, host" in both.stdout, both.stdout


def test_host_noise_within_its_threshold(tmp_path):
    """Host time 1.2x everywhere: within the host threshold (25%, host time is noisier than
    replay time), flagged with --host-threshold 0.1."""
    base = write_run(tmp_path, "2026-11-20T10:00:00", "aaaa111", "NVIDIA H100", scaled(BASE))
    new = write_run(tmp_path, "2026-11-21T10:00:00", "bbbb222", "NVIDIA H100", scaled(BASE, wall=1.2, host=1.2))
    assert not any(c.regressed for c in compare(load_run(new), load_run(base)))
    assert compare_cli(new, base).returncode == 0
    strict = compare_cli(new, base, "--host-threshold", "0.1", "--judge", "both")
    assert strict.returncode == 1 and f"kernel 0, host {len(BASE)}" in strict.stdout


def test_kernel_regression_is_judged_by_replay_time(tmp_path):
    base = write_run(tmp_path, "2026-11-20T10:00:00", "aaaa111", "NVIDIA H100", scaled(BASE))
    new_cases = scaled(BASE)
    new_cases.update(scaled({REGRESSED: BASE[REGRESSED]}, wall=1.05, gpu=1.3))   # hidden in wall by host time
    new_cases.update(scaled({NOISY: BASE[NOISY]}, gpu=1.0))
    new_cases[NOISY][2].update(gpu_ms=new_cases[NOISY][2]["gpu_ms"] * 1.4)        # replay median only: noise
    new_cases.update(scaled({IMPROVED: BASE[IMPROVED]}, wall=0.95, gpu=0.7))
    new = write_run(tmp_path, "2026-11-21T10:00:00", "bbbb222", "NVIDIA H100", new_cases)
    changes = {c.case.key: c for c in compare(load_run(new), load_run(base))}
    assert [k for k, c in changes.items() if c.regressed] == [REGRESSED]
    assert changes[REGRESSED].regressed_sides() == ["kernel"] and changes[REGRESSED].median_ratio < 1.1
    assert changes[NOISY].gpu_ratio > 1.3 and not changes[NOISY].regressed
    assert [k for k, c in changes.items() if c.improved] == [IMPROVED]
    assert changes[IMPROVED].improved_sides() == ["kernel"]
    out = compare_cli(new, base)
    assert out.returncode == 1 and "1 regression(s): kernel 1, host 0" in out.stdout
    assert "REGRESSION kernel" in out.stdout and "knorm N=32768 B=1 budget=0.5" in out.stdout


def test_missing_fields(tmp_path):
    """An older baseline without host times (and without replay minima): the host side is not
    judged, the kernel side by the replay median alone; runs without replay times at all fall
    back to wall time, reported as such."""
    old = scaled(BASE, keep=("gpu",))
    for _, _, fields in old.values():
        fields["gpu_min_ms"] = None
    base = write_run(tmp_path, "2026-11-20T10:00:00", "aaaa111", "NVIDIA H100", old)
    new_cases = scaled(BASE, wall=2.0, host=2.0)
    new_cases.update(scaled({REGRESSED: BASE[REGRESSED]}, gpu=1.3))
    new = write_run(tmp_path, "2026-11-21T10:00:00", "bbbb222", "NVIDIA H100", new_cases)
    changes = {c.case.key: c for c in compare(load_run(new), load_run(base))}
    assert all(c.ratios("host") is None and c.host_ratio is None for c in changes.values())
    assert changes[REGRESSED].ratios("kernel") == (pytest.approx(1.3), None)
    assert [k for k, c in changes.items() if c.regressed] == [REGRESSED]

    walls = tmp_path / "walls"
    walls.mkdir()
    base = write_run(walls, "2026-11-20T10:00:00", "aaaa111", "NVIDIA H100", scaled(BASE, keep=()))
    new_cases = scaled(BASE, keep=())
    new_cases[REGRESSED] = (BASE[REGRESSED][0] * 1.3, BASE[REGRESSED][1] * 1.3, new_cases[REGRESSED][2])
    new = write_run(walls, "2026-11-21T10:00:00", "bbbb222", "NVIDIA H100", new_cases)
    changes = {c.case.key: c for c in compare(load_run(new), load_run(base))}
    assert [k for k, c in changes.items() if c.regressed] == [REGRESSED]
    assert changes[REGRESSED].regressed_sides() == ["wall"] and not changes[REGRESSED].kernel_regressed
    out = compare_cli(new, base)
    assert out.returncode == 1 and "1 regression(s): kernel 0, wall 1, host 0" in out.stdout


RESULTS = Path(__file__).resolve().parents[1] / "perf" / "results"
A568D6B = RESULTS / "20261124T105039-NVIDIA_H100_80GB_HBM3-a568d6b.json"
A2A1879 = RESULTS / "20261124T082737-NVIDIA_H100_80GB_HBM3-a2a1879.json"


@pytest.mark.skipif(not (A568D6B.exists() and A2A1879.exists()), reason="the committed H100 runs are not here")
def test_real_runs_a568d6b_vs_a2a1879():
    """The two committed H100 runs: 23 cases at N <= 32k were slower in wall time (median and
    min > 1.10x) with replay ratios of 0.94-1.03x: host time, not kernels. None is a kernel
    regression; the old runs have no host times, so the host side is not judged."""
    changes = compare(load_run(A568D6B), load_run(A2A1879))
    wall_slower = [c for c in changes if c.median_ratio > 1.1 and c.min_ratio > 1.1]
    assert len(wall_slower) == 23 and all(c.case.n <= 32768 for c in wall_slower)
    assert all(0.9 < c.gpu_ratio < 1.1 for c in wall_slower)
    assert not any(c.regressed for c in changes)
    assert all(c.ratios("host") is None for c in changes)
    out = compare_cli(A568D6B, A2A1879)
    assert out.returncode == 0 and "0 regression(s)" in out.stdout, out.stdout
    # the dashboard's view of these commits: a568d6b's two runs merged, against a2a1879
    merged = by_commit([r for r in load_runs(RESULTS) if r.commit[:7] in ("a568d6b", "a2a1879")])
    assert [r.commit[:7] for r in merged] == ["a2a1879", "a568d6b"]
    assert not any(c.regressed for c in compare(merged[-1], merged[-2]))


def write_generation(directory: Path, name: str, time: str, commit: str, device: str, scale: float):
    rows = [dict(model=model, prompt=prompt, mode=mode, baseline=mode == "DynamicCache", sdpa_backend="flash,efficient",
                 tokens_per_s=scale * speed * (65536 / prompt), ms_per_step=1e3 / (scale * speed),
                 evict_share=None if mode == "DynamicCache" else 0.01)
            for model in ("tiny", "wide") for prompt in (16384, 65536)
            for mode, speed in (("DynamicCache", 100.0), ("static snapkv 10%, every 64, graphs", 700.0))]
    folder = directory / "generation"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(dict(device=device, commit=commit, time=time, rows=rows, targets=[])))


def test_generation_runs_get_their_section(results, tmp_path_factory):
    """perf/results/generation/*.json: per model the latest run's tokens/s per mode and the
    history of the longest prompt on the latest run's GPU; a file without measured rows is
    left out."""
    pytest.importorskip("plotly", reason="the dashboard renders with plotly")
    from tritonkv.dashboard.generation import load_generation_runs
    directory, _, _ = results
    write_generation(directory, "generation-a.json", "2026-12-01T10:00:00", "aaaa111", "NVIDIA H100", 1.0)
    write_generation(directory, "generation-b.json", "2026-12-02T10:00:00", "bbbb222", "NVIDIA H200", 1.5)
    write_generation(directory, "generation.json", "2026-12-03T10:00:00", "cccc333", "NVIDIA H100", 1.2)
    (directory / "generation" / "failed.json").write_text(json.dumps(dict(device="x", rows=[dict(model="tiny")])))
    runs = load_generation_runs(directory)
    assert [r.commit for r in runs] == ["aaaa111", "bbbb222", "cccc333"]
    site = tmp_path_factory.mktemp("site")
    assert dashboard_main(["build", str(directory), "-o", str(site)]) == 0
    page = (site / "index.html").read_text()
    assert "<h2 id='generation'>Generation</h2>" in page and "2 of 3 generation runs on this GPU" in page
    assert page.count('class="plotly-graph-div"') == 2 * 3 + 2 * 2   # 2 policies x 3, 2 models x (latest, history)
    assert page.count("<td>static snapkv 10%, every 64, graphs</td>") == 4   # the latest run's table
    assert "<td>840.0</td>" in page   # 1.2 x 700 at 64K
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", (site / "index.html").as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert len(re.findall(r'class="main-svg"', dom.stdout)) >= 10
