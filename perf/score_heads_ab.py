"""A/B of TOVA's head mean folded into its score kernel (codegen ``score_heads``, for
patches/score-heads.patch): the score kernel and the transform pass (TRITONKV_SCORE_HEADS=0,
as before) against one kernel that reduces a batch row's heads itself, wall / graph / host
beside the peer.

    python perf/score_heads_ab.py [--toy]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf import setting_ab  # noqa: E402

if __name__ == "__main__":
    setting_ab.main(["TRITONKV_SCORE_HEADS", "0", "1", "--presets", "tova"] + sys.argv[1:])
