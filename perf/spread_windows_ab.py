"""A/B of how a gathering select copies the forced windows' rows (tritonkv/kernels/select.py,
landed in 9df257c; H100 results in perf/results/gpu-checks/): by the programs whose chunks hold them
(TRITONKV_SPREAD_WINDOWS=0, as before) against equal shares over a row's programs, for the
presets with a large window (H2O's recency half, NACL's sinks and recent window) and two
with a small one (SnapKV's 64, TOVA's 1), wall / graph / host beside the peer.

    python perf/spread_windows_ab.py [--toy]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf import setting_ab  # noqa: E402

if __name__ == "__main__":
    setting_ab.main(["TRITONKV_SPREAD_WINDOWS", "0", "1", "--presets", "h2o,nacl,snapkv,tova"] + sys.argv[1:])
