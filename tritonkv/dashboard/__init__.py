"""Perf dashboard: static HTML from perf/results, and regression checks between runs.

    python -m tritonkv.dashboard build perf/results -o site/
    python -m tritonkv.dashboard compare NEW.json [BASELINE.json]
"""
