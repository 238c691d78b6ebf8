"""Benchmark session setup: GPU only; records the machine, versions and commit in the JSON."""

import os
import subprocess

import pytest
import torch

import tritonkv

from .floor import copy_bandwidth


def pytest_configure(config):
    # every policy's torch.compile baseline compiles the same Python function (one per
    # baseline, guarded on the policy; the peer once per shape and budget too): past dynamo's
    # recompile limit (8) a function silently runs eager, so allow every case its own entry
    import torch._dynamo.config as dynamo_config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, 256)


def pytest_collection_modifyitems(config, items):
    # TKV_BENCH_TOY=1 runs the cases on the CPU (at the sizes TKV_BENCH_N etc. name): a check of
    # the benchmark's code that CI makes (tests/test_perf_scripts.py), not a measurement
    if not torch.cuda.is_available() and os.environ.get("TKV_BENCH_TOY") != "1":
        skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU (TKV_BENCH_TOY=1: toy sizes on the CPU)")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bandwidth():
    """Copy bandwidth (bytes read + written per second) measured once per run."""
    return copy_bandwidth()


def _commit() -> str:
    if os.environ.get("TKV_COMMIT"):
        return os.environ["TKV_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = props.name
        machine_info["gpu_multiprocessors"] = props.multi_processor_count
        machine_info["gpu_memory_bytes"] = props.total_memory
    import triton
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["triton"] = triton.__version__


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["tritonkv"] = {"version": tritonkv.__version__, "commit": _commit()}
