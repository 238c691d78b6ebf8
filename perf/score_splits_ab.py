"""A/B of the score kernel's own programs per row (tritonkv/geometry.py score_splits), for
patches/score-splits.patch: TOVA (its score pass reads only the kept logits) with the
statistics passes' programs (TRITONKV_SCORE_PROGRAMS_PER_SM=0, as before) and with 16 per
multiprocessor, wall / graph / host beside the peer.

    python perf/score_splits_ab.py [--toy]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf import setting_ab  # noqa: E402

if __name__ == "__main__":
    setting_ab.main(["TRITONKV_SCORE_PROGRAMS_PER_SM", "0", "16", "--presets", "tova"] + sys.argv[1:])
