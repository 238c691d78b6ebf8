#!/usr/bin/env bash
# What the proxy-attention passes' softmax exponentials cost: per-launch times (perf/launches.py)
# of this tree, then of a throwaway copy whose statistics and score passes take no exponent
# (2^x replaced by x: wrong priorities; the time the exponent unit adds, i.e. the most that any
# cheaper exponent could save). ptxas for sm_90 issues two MUFU.EX2.F16 per ex2.approx.f16x2, so
# half-precision exponents do not halve that unit's work (a2a491e); a polynomial on the FMA units for
# one exponent in 2 or 4 was 1.01-1.28x slower (H100, bd5575d; removed).
#   perf/exp_probe.sh OUT_DIR [presets] [batches]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?OUT_DIR}; presets=${2:-snapkv,h2o}; batches=${3:-1 4}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONPATH=.
$PY perf/launches.py --policies "$presets" --n 131072 --batch $batches --budget 0.1 \
    --json "$out/launches-exp.json" 2>&1 | tee "$out/launches-exp.log"
copy=$(mktemp -d)/tree
cp -r . "$copy"
(cd "$copy" && $PY - <<'PY'
from pathlib import Path
p = Path("tritonkv/kernels/proxy.py"); s = p.read_text()
exp = "    return tl.exp2(z)\n"   # softmax_exp2's body: both passes' one exponent per logit
assert s.count(exp) == 1, "kernels/proxy.py's softmax_exp2 changed: update this probe"
p.write_text(s.replace(exp, "    return z\n"))
PY
 $PY perf/launches.py --policies "$presets" --n 131072 --batch $batches --budget 0.1 \
     --json "$out/launches-no-exp.json") 2>&1 | tee "$out/launches-no-exp.log"
rm -rf "$copy"
