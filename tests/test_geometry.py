"""Launch geometry that only a GPU uses, checked as plain arithmetic: how the statistics passes
split a row over programs."""

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
    plain ``range`` loop) unless ``TRITONKV_LOOP_STAGES`` asks for more; a proxy attention's
    loops keep Triton's own pipelining; at most 64 KB of tiles in flight."""
    from tritonkv.geometry import loop_stages
    assert loop_stages(False, 16384) is None and loop_stages(True, 16384) is None
    monkeypatch.setenv("TRITONKV_LOOP_STAGES", "3")
    assert loop_stages(True, 16384) is None
    assert loop_stages(False, 16384) == 3          # KeyDiff's [64, 128] bf16 tiles: two in flight
    assert loop_stages(False, 65536) == 2          # KNorm's [256, 128] bf16 tiles: one
    assert loop_stages(False, 131072) is None      # float32 [128, 256]: none fits
    monkeypatch.setenv("TRITONKV_LOOP_STAGES", "1")
    assert loop_stages(False, 16384) is None
