"""Launch geometry that only a GPU uses, checked as plain arithmetic: how the statistics passes
split a row over programs."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tritonkv.geometry import balanced_splits
from tritonkv.kernels.common import cdiv


def _running(rows: int, n_tiles: int, splits: int):
    """(programs over all rows, tiles per program) of the launch these splits give."""
    tiles = cdiv(n_tiles, splits)
    return rows * cdiv(n_tiles, tiles), tiles


def _waves_times_tiles(rows: int, n_tiles: int, splits: int, wave: int) -> int:
    programs, tiles = _running(rows, n_tiles, splits)
    return cdiv(programs, wave) * tiles


@given(rows=st.integers(1, 2048), n_tiles=st.integers(1, 1 << 15), wave=st.sampled_from([3, 132 * 4, 78 * 4, 1000]))
def test_balanced_splits_are_never_worse_than_the_ceiling(rows, n_tiles, wave):
    splits = balanced_splits(rows, n_tiles, wave)
    assert 1 <= splits <= n_tiles
    ceiling = max(1, min(n_tiles, cdiv(wave, rows)))
    assert _waves_times_tiles(rows, n_tiles, splits, wave) <= _waves_times_tiles(rows, n_tiles, ceiling, wave)


def test_balanced_splits_fill_whole_waves_on_an_h100():
    wave = 4 * 132   # 4 programs per multiprocessor, 132 multiprocessors
    # B = 4, H_kv = 8, 2048 tiles (128K tokens of 64): the ceiling's 17 programs per row (544)
    # overshoot a wave by 16 programs; 33 per row are two whole waves of 63 tiles each
    assert _running(32, 2048, balanced_splits(32, 2048, wave)) == (32 * 33, 63)
    # B = 1: 64 programs per row of 32 tiles are one wave already; more would begin a second
    assert _running(8, 2048, balanced_splits(8, 2048, wave)) == (8 * 64, 32)
    # more rows than a wave: one program per row
    assert balanced_splits(4096, 512, wave) == 1


def test_loop_stages_pipeline_only_the_loops_triton_leaves_alone(monkeypatch):
    """geometry.loop_stages: None (Triton's default: the generated kernels compile exactly as a
    plain ``range`` loop) unless the program has a key-anchor similarity (2: KeyDiff's small
    tiles) or ``TRITONKV_LOOP_STAGES`` asks for more; a proxy attention's loops keep Triton's own
    pipelining; at most 64 KB of tiles in flight."""
    from tritonkv.geometry import loop_stages
    assert loop_stages(False, 16384) is None and loop_stages(True, 16384) is None
    assert loop_stages(False, 16384, anchor=True) == 2 and loop_stages(False, 131072, anchor=True) is None
    monkeypatch.setenv("TRITONKV_LOOP_STAGES", "3")
    assert loop_stages(True, 16384) is None
    assert loop_stages(False, 16384) == 3          # KeyDiff's [64, 128] bf16 tiles: two in flight
    assert loop_stages(False, 65536) == 2          # KNorm's [256, 128] bf16 tiles: one
    assert loop_stages(False, 131072) is None      # float32 [128, 256]: none fits
    monkeypatch.setenv("TRITONKV_LOOP_STAGES", "1")
    assert loop_stages(False, 16384) is None and loop_stages(False, 16384, anchor=True) is None


def test_a_cache_reading_score_pass_fills_whole_waves_of_its_own():
    from tritonkv.geometry import score_waves
    # KeyDiff's cosine pass at B = 4, 128K (2048 tiles of 64) on an H100: 6 programs per SM fit
    # (a wave is 792), so 49 programs per row of 42 tiles are two waves (1568 programs), where
    # the anchor pass's 33 per row of 63 tiles would be 1.33 of them
    assert score_waves(32, 2048, 6, 132) == (49, 42)
    # at B = 1 (8 rows) the same rule gives 98 programs per row of 21 tiles, one wave
    assert score_waves(8, 2048, 6, 132) == (98, 21)


def test_the_score_launch_takes_its_waves_once_its_occupancy_is_learnt(monkeypatch):
    """compiler.score_tiling's wiring, with the GPU's answers faked: the learnt occupancy of
    KeyDiff's score kernel gives its own tiling; none learnt, the switch off or a paged
    layout's fixed splits keep the statistics passes' (None)."""
    import torch

    from tritonkv import compiler, policies
    from tritonkv.budget import allocate
    from tritonkv.geometry import score_waves
    from tritonkv.lowering import lower

    policy = policies.keydiff()
    lowered, _ = lower(policy, allocate(policy, 4096, 1024))
    compiled = compiler.compile_policy(lowered)
    keys = torch.zeros(4, 8, 4096, 128, dtype=torch.bfloat16)
    geo = compiler._geometry_of(compiled, keys, compiler.Layout.dense(keys, keys), None)
    assert geo.n_tiles == 4096 // 64 and geo.score_tiling is None
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(compiler, "interpreting", lambda: False)
    monkeypatch.setattr(compiler, "multiprocessor_count", lambda device: 132)
    monkeypatch.setattr(compiler, "learnt_occupancy", lambda *args: None)
    assert compiler.score_tiling(compiled, geo, cuda) is None          # before the first launch
    monkeypatch.setattr(compiler, "learnt_occupancy", lambda *args: 6)
    assert compiler.score_tiling(compiled, geo, cuda) == score_waves(32, 64, 6, 132)
    monkeypatch.setattr(compiler, "learnt_occupancy", lambda *args: 1)   # a proxy pass's 224 registers
    assert compiler.score_tiling(compiled, geo, cuda) is None          # no more per SM than the waves count
    monkeypatch.setattr(compiler, "learnt_occupancy", lambda *args: 6)
    assert compiler.score_tiling(compiled, geo, torch.device("cpu")) is None
    monkeypatch.setenv("TRITONKV_SCORE_WAVES", "0")
    assert compiler.score_tiling(compiled, geo, cuda) is None


def test_the_score_launch_carries_its_register_cap(monkeypatch):
    """``TRITONKV_SCORE_MAXNREG`` reaches the score launch (and only it) as Triton's ``maxnreg``;
    unset or 0, no launch has a cap (the interpreter takes none: what a cap does to the build is
    the GPU's to show)."""
    import torch

    from tritonkv import compiler, geometry, policies
    from tritonkv.budget import allocate
    from tritonkv.kernels.launch import launch_options
    from tritonkv.lowering import lower

    policy = policies.h2o()
    lowered, alloc = lower(policy, allocate(policy, 300, 90))
    compiled = compiler.compile_policy(lowered)
    keys, queries = torch.randn(1, 2, 300, 64), torch.randn(1, 8, 4, 64)
    for cap, expected in ((None, None), ("0", None), ("128", 128)):
        if cap is None:
            monkeypatch.delenv("TRITONKV_SCORE_MAXNREG", raising=False)
        else:
            monkeypatch.setenv("TRITONKV_SCORE_MAXNREG", cap)
        geometry.clear_geometry()
        call = compiler.prepare(compiled, alloc, keys, keys, queries, 0)
        caps = {getattr(step.fn, "__name__", "") or step.fn.fn.__name__: step.maxnreg for step in call.launches}
        assert caps.pop("score") == expected and set(caps.values()) == {None}
    geometry.clear_geometry()
    assert launch_options(8, None, 128) == {"num_warps": 8, "maxnreg": 128}
    assert launch_options(4, 3, None) == {"num_warps": 4, "num_stages": 3}


def test_anchor_fold_is_a_power_of_two_at_most_the_tile(monkeypatch):
    from tritonkv.geometry import anchor_fold
    assert anchor_fold(64) == 1   # the default: an accumulator the tile's size
    monkeypatch.setenv("TRITONKV_ANCHOR_FOLD", "4")
    assert anchor_fold(64) == 4 and anchor_fold(2) == 2
    for bad in ("0", "3", "-2"):
        monkeypatch.setenv("TRITONKV_ANCHOR_FOLD", bad)
        with pytest.raises(ValueError, match="TRITONKV_ANCHOR_FOLD"):
            anchor_fold(64)
