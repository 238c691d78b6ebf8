"""A/B of a cache-reading score kernel's own split (tritonkv/compiler.py score_tiling, for
patches/score-waves.patch): the statistics passes' programs per row (TRITONKV_SCORE_WAVES=0,
as before) against whole waves of the score kernel's own occupancy, for the presets whose
score pass reads K (KeyDiff's cosines, the proxy attention's second pass), wall / graph / host
beside the peer.

    python perf/score_waves_ab.py [--toy]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf import setting_ab  # noqa: E402

if __name__ == "__main__":
    setting_ab.main(["TRITONKV_SCORE_WAVES", "0", "1", "--presets", "keydiff,snapkv,h2o,knorm"] + sys.argv[1:])
