"""Every perf script runs to its end at toy size on the CPU, so one that would crash on the GPU fails
CI first. (perf/generation.py --toy is checked in test_hf_generate, the eval in test_evals.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, env=None, timeout=600):
    """The script in a subprocess: the compiled kernels on a GPU, the interpreter on the CPU."""
    import torch
    interpret = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    # a fresh process, not an xdist worker: pytest-benchmark turns itself off where PYTEST_XDIST_WORKER is set
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**inherited, "PYTHONPATH": str(ROOT), **interpret, **(env or {})})
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def build(args, timeout=600):
    """A script that compiles kernels for sm_90 without a GPU (Triton's AOT path), in a subprocess
    outside the interpreter, which cannot compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**env, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.skipif(sys.platform == "win32", reason="perf/run is a bash script")
def test_perf_suite_runs_at_toy_size(tmp_path):
    run(["bash", "perf/run"], env=dict(PYTHON=sys.executable, TKV_BENCH_TOY="1", TKV_BENCH_N="128", TKV_BENCH_B="1",
                                        TKV_BENCH_BUDGETS="0.5", TKV_BENCH_COMPILE="none", TKV_RESULTS=str(tmp_path),
                                        TKV_COMMIT="toy"))
    (result,) = tmp_path.glob("*.json")
    benchmarks = json.loads(result.read_text())["benchmarks"]
    assert benchmarks and all(b["stats"]["mean"] > 0 for b in benchmarks)
    # the four times of each case, the queued kernels among them
    assert all(b["extra_info"]["queued_ms"] > 0 and b["extra_info"]["x_floor_queued"] > 0 for b in benchmarks)


def test_host_overhead_measures_every_preset_at_toy_size(tmp_path):
    from tritonkv.policies import PRESETS
    out = tmp_path / "host.json"
    run([sys.executable, "perf/host_overhead.py", "--toy", "--json", str(out)])
    measured = {case["policy"] for case in json.loads(out.read_text())["cases"]}
    assert set(PRESETS) <= measured


def test_memory_writes_every_benchmarked_policy_into_its_folder(tmp_path):
    from perf.test_evict import POLICIES
    run([sys.executable, "perf/memory.py", "--toy", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert set(POLICIES) == {row["policy"] for row in rows}
    assert all(row["extra_bytes"] is None or row["extra_bytes"] >= 0 for row in rows)


def test_paged_benchmark_measures_both_paths_at_toy_size(tmp_path):
    out = tmp_path / "paged.json"
    run([sys.executable, "perf/paged.py", "--toy", "--policies", "knorm,snapkv", "--budgets", "0.5",
         "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [row["policy"] for row in rows] == ["knorm", "snapkv"]
    assert all(row["paged_gpu_ms"] > 0 and row["dense_gather_scatter_gpu_ms"] > 0 and row["floor_bytes"] > 0
               for row in rows)


def test_setting_ab_runs_at_toy_size(tmp_path):
    out = tmp_path / "ab.json"
    run([sys.executable, "perf/setting_ab.py", "TRITONKV_BLOCK_N", "32", "64", "--presets", "knorm",
         "--toy", "--json", str(out)])
    got = json.loads(out.read_text())
    assert got["setting"] == "TRITONKV_BLOCK_N" and [r["policy"] for r in got["rows"]] == ["knorm"]
    assert all(r["32 wall us"] > 0 and r["64 host us"] > 0 and r["peer wall us"] > 0 for r in got["rows"])


def test_setting_ab_values_set_switches_together():
    """A value of ``NAME=VALUE,...`` pairs sets those switches together; a plain value sets the
    A/B's setting; pairs must name TRITONKV_* switches."""
    from perf.setting_ab import assignments
    assert assignments("TRITONKV_BLOCK_N", "64") == {"TRITONKV_BLOCK_N": "64"}
    assert assignments("TRITONKV_BLOCK_N", "TRITONKV_BLOCK_N=32,TRITONKV_ANCHOR_FOLD=4") == {
        "TRITONKV_BLOCK_N": "32", "TRITONKV_ANCHOR_FOLD": "4"}
    with pytest.raises(ValueError, match="TRITONKV_"):
        assignments("TRITONKV_BLOCK_N", "BLOCK_N=32")


def test_drop_one_ab_runs_at_toy_size(tmp_path):
    out = tmp_path / "ab.json"
    run([sys.executable, "perf/drop_one_ab.py", "--toy", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["policy"][:3] for r in rows] == ["tov", "h2o"] and all(r["drop_one_us"] > 0 for r in rows)


def test_launches_runs_at_toy_size(tmp_path):
    out = tmp_path / "launches.json"
    run([sys.executable, "perf/launches.py", "--toy", "--policies", "tova,streaming_llm", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [[s["kernel"] for s in r["launches"]] for r in rows] == [
        # TOVA's head mean in its score kernel; its shared selection's rows copied by a gather launch
        ["stats_0", "merge_0", "score_heads", "select", "gather"], ["gather"]]
    assert all(r["total_us"] > 0 and r["floor_us"] > 0 and r["start_us"] > 0 for r in rows)


def test_ncu_lines_sums_stall_samples_per_source_line(tmp_path, capsys):
    """perf/ncu_lines.py on a source page as Nsight Compute writes it (a section per file; the SASS
    rows of a line summed into it), lines ordered by their stall samples."""
    sys.path.insert(0, str(ROOT))
    from perf import ncu_lines
    header = ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"]
    rows = [["File Path", "/x/select.py"], ["Function Name", "k"], header,
            ["10", "x = load()", "", "", "30", "5"], ["11", "h = histogram(x)", "", "", "60", "90"],
            ["File Path", "/y/standard.py"], header, ["10", "return a + b", "", "", "10", "5"]]
    path = tmp_path / "source.csv"
    path.write_text("\n".join(",".join(f'"{c}"' for c in row) for row in rows) + "\n")
    ncu_lines.main([str(path), "--top", "2"])
    out = capsys.readouterr().out.splitlines()
    assert "select.py 90.0%" in out[1] and "standard.py 10.0%" in out[1]
    assert "60.0%" in out[3] and "90.0%" in out[3] and "select.py:11" in out[3]
    assert "select.py:10" in out[4] and len(out) == 5


def test_ncu_probe_runs_at_toy_size():
    out = run([sys.executable, "perf/ncu_probe.py", "--toy", "--policy", "snapkv"])
    assert "snapkv N=256 B=1" in out.stdout


def test_graph_gap_probe_runs_at_toy_size():
    out = run([sys.executable, "perf/graph_gap_probe.py", "--cases", "keydiff:128:1:0.5,streaming_llm:100:1:0.1"])
    for step in ("fresh, tkv.evict", "after the baselines", "after a 5 s rest"):
        assert out.stdout.count(step) >= 2, out.stdout   # both cases ran every step
    assert out.stdout.count("queued") == 6


def test_host_noise_probe_runs_at_toy_size():
    out = run([sys.executable, "perf/host_noise_probe.py", "--toy", "--presets", "streaming_llm,keydiff"])
    assert "process on CPU" in out.stdout and out.stdout.count("thread CPU") == 2, out.stdout


def test_host_goal_times_every_case_each_round_at_toy_size(tmp_path):
    out = tmp_path / "goal.json"
    run([sys.executable, "perf/host_goal.py", "--toy", "--policies", "streaming_llm,keydiff", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["policy"] for r in result["cases"]] == ["streaming_llm", "keydiff"]
    assert all(len(r["rounds_us"]) == 2 and r["best_us"] <= r["median_us"] for r in result["cases"])
    assert len(result["reference_us"]) == 2


def test_placement_probe_runs_both_measurements_at_toy_size():
    out = run([sys.executable, "perf/placement_probe.py", "--toy", "--policies", "streaming_llm"])
    assert "2 calls, queued ms" in out.stdout and "copy of" in out.stdout, out.stdout
    out = run([sys.executable, "perf/placement_probe.py", "--toy", "--policies", "streaming_llm", "--churn", "0.01"])
    assert "after freeing + empty_cache" in out.stdout and "after 200 zeroings" in out.stdout, out.stdout


def test_summarize_gives_a_row_per_policy_and_the_cases():
    run_json = "perf/results/20261207T101214-NVIDIA_H100_80GB_HBM3-c50b8fa.json"
    out = run([sys.executable, "perf/summarize.py", run_json]).stdout
    summary = out[out.index("By policy"):out.index("| policy | N |")]
    assert summary.count("\n| ") == 1 + 13, summary   # the header and one row per benchmarked policy
    assert "| keydiff | 1.41-1.58 / 1.40-1.56 | 1.87-2.19 / 1.86-2.16 | 6.1-11.1 |" in summary
    assert out.count("| keydiff | ") == 1 + 8   # its summary row and its 8 cases


def test_l2_probe_runs_at_toy_size():
    out = run([sys.executable, "perf/l2_probe.py", "--toy"])
    assert "two launches" in out.stdout   # on the CPU the two launches alone
    assert "rows in turn close: True" in out.stdout   # and rows in turn, a launch pair per row


def test_pdl_probe_runs_at_toy_size():
    out = run([sys.executable, "perf/pdl_probe.py", "--toy"])
    assert "matches torch" in out.stdout   # the chain's scores, against torch's


def test_row_groups_probe_runs_at_toy_size():
    """perf/row_groups_probe.py: the call cut into groups of rows, on streams or one after another,
    keeps what the uncut call keeps (on the CPU the streams are program order)."""
    out = run([sys.executable, "perf/row_groups_probe.py", "--toy"])
    modes = [line for line in out.stdout.splitlines() if "x one " in line]
    assert len(modes) == 6 and all(line.endswith("agrees") for line in modes), out.stdout


def test_exp_probe_edits_the_current_kernel_source(tmp_path):
    """perf/exp_probe.sh times a copy of the tree with its exponentials removed, an edit of
    kernels/proxy.py by text: applied to this tree's source it finds its target and leaves no
    exponent in softmax_exp2 (the probe's first version matched code that later moved)."""
    script = (ROOT / "perf" / "exp_probe.sh").read_text()
    edit = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    (tmp_path / "tritonkv" / "kernels").mkdir(parents=True)
    source = tmp_path / "tritonkv" / "kernels" / "proxy.py"
    source.write_text((ROOT / "tritonkv" / "kernels" / "proxy.py").read_text())
    subprocess.run([sys.executable, "-c", edit], cwd=tmp_path, check=True, timeout=60)
    edited = source.read_text()
    body = edited.split("def softmax_exp2", 1)[1].split("@triton.jit", 1)[0]
    assert "tl.exp2(" not in body and "return z\n" in body
    assert edited.count("\n") == (ROOT / "tritonkv" / "kernels" / "proxy.py").read_text().count("\n")


def test_every_environment_switch_is_documented():
    """docs/performance.md's "Environment switches" table names every TRITONKV_* variable that
    tritonkv/ reads, and no other."""
    import re
    read = set()
    for path in (ROOT / "tritonkv").rglob("*.py"):
        read |= set(re.findall(r"TRITONKV_[A-Z0-9_]+", path.read_text()))
    docs = (ROOT / "docs" / "performance.md").read_text()
    section = docs.split("## Environment switches", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(TRITONKV_[A-Z0-9_]+)`", section, re.M))
    assert read == listed, (sorted(read - listed), sorted(listed - read))


def test_sass_ops_counts_snapkvs_hopper_instructions(tmp_path):
    """perf/sass_ops.py builds SnapKV's statistics and score kernels for sm_90 (no GPU) and counts
    their SASS: both passes multiply on the tensor cores (HGMMA, Hopper's warpgroup MMA) and take
    their exponents on the exponent unit (MUFU.EX2), in the whole listing and in the hottest loop."""
    report = tmp_path / "ops.json"
    build([sys.executable, "perf/sass_ops.py", "--policies", "snapkv", "--json", str(report)])
    counts = json.loads(report.read_text())["snapkv"]
    for kernel in ("stats_0", "score", "stats_0 loop"):
        assert counts[kernel]["HGMMA"] > 0 and counts[kernel]["MUFU.EX2"] > 0, (kernel, counts[kernel])


def test_waiting_patches_apply_to_this_tree():
    """patches/*.patch wait for a GPU run (perf/gpu_session pending patches applies each to a copy
    of the tree): each must still apply to the tree as it is now."""
    import shutil
    if shutil.which("git") is None:
        pytest.skip("needs git")
    for patch in sorted((ROOT / "patches").glob("*.patch")):
        done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (patch.name, done.stderr)


def test_proxy_ws_probe_runs_at_toy_size():
    """perf/proxy_ws_probe.py: its variants of the statistics loop give each query row's lse
    (m + log2 l) of the reference, within 1e-3."""
    out = run([sys.executable, "perf/proxy_ws_probe.py", "--toy"])
    assert {"ptr:", "rot:", "half:", "w16:"} <= {line.split()[0] for line in out.stdout.splitlines()}, out.stdout


def test_proxy_ws_probe_builds_its_gluon_kernel_for_sm90():
    """The probe's Gluon kernels (no interpreter runs Gluon) build for sm_90: the overlapped loop with its
    two asynchronous wgmma sites, each awaited once, and the ping-pong one with its partitions' register
    moves (setmaxnreg); their numbers come from a GPU run."""
    out = build([sys.executable, "perf/proxy_ws_probe.py", "--compile", "--variants", "gluon,gluon32,pingpong",
                 "--stages", "3"])
    lines = {line.split("/")[0]: line for line in out.stdout.splitlines() if "/s3:" in line}
    assert set(lines) == {"gluon", "gluon32", "pingpong"}, out.stdout + out.stderr
    assert all("32 wgmma" in line and "2 waits" in line for line in lines.values()), out.stdout
    assert " 0 setmaxnreg" not in lines["pingpong"] and "12 warps" in lines["pingpong"], out.stdout


def test_proxy_score_probe_checks_its_loop_and_builds_gluon():
    """perf/proxy_score_probe.py: its Triton loop gives the reference's per-key sums of probabilities at
    toy size, and its Gluon loop builds for sm_90 with the next tile's product awaited after this one's
    exponentials (two wgmma sites, a wait each)."""
    out = run([sys.executable, "perf/proxy_score_probe.py", "--toy"])
    assert "ptr: err" in out.stdout, out.stdout
    built = build([sys.executable, "perf/proxy_score_probe.py", "--compile"])
    gluon = [line for line in built.stdout.splitlines() if line.startswith("gluon:")]
    assert gluon and "16 wgmma" in gluon[0] and "2 waits" in gluon[0], built.stdout + built.stderr
