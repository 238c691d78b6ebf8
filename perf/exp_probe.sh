#!/usr/bin/env bash
# Whether the proxy-attention passes are bound by their softmax exponentials (MUFU.EX2): per
# launch (perf/launches.py) with float32 exponents, with packed half-precision ones
# (TRITONKV_PROXY_EXP=f16), and, on a throwaway copy of the tree, with no exponent at all (2^x
# replaced by x: wrong priorities, the time without the exponentials' cost: a bound on what any
# cheaper exponent could save); then the f32 / f16 A/B of whole calls beside the peer.
#   perf/exp_probe.sh OUT_DIR [presets] [batches]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?OUT_DIR}; presets=${2:-snapkv,h2o}; batches=${3:-1 4}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONPATH=.
for mode in f32 f16; do
    TRITONKV_PROXY_EXP=$mode $PY perf/launches.py --policies "$presets" --n 131072 --batch $batches --budget 0.1 \
        --json "$out/launches-exp-$mode.json" 2>&1 | tee "$out/launches-exp-$mode.log"
done
copy=$(mktemp -d)/tree
cp -r . "$copy"
(cd "$copy" && $PY - <<'PY'
from pathlib import Path
p = Path("tritonkv/kernels/proxy.py"); s = p.read_text()
t = s.replace("    elif EXP == 2:\n", "    elif EXP == 3:\n        return x\n    elif EXP == 2:\n", 1)
assert t != s, "proxy.py's _exp2 changed: update this probe"
p.write_text(t)
p = Path("tritonkv/geometry.py"); s = p.read_text()
t = s.replace("return EXP_F16_EMULATED if interpreting() else EXP_F16X2", "return 3", 1)
assert t != s, "geometry.exp_mode changed: update this probe"
p.write_text(t)
PY
 TRITONKV_PROXY_EXP=f16 $PY perf/launches.py --policies "$presets" --n 131072 --batch $batches --budget 0.1 \
     --json "$out/launches-exp-none.json") 2>&1 | tee "$out/launches-exp-none.log"
rm -rf "$copy"
$PY perf/setting_ab.py TRITONKV_PROXY_EXP f32 f16 --presets "$presets,nacl" --b "${batches// /,}" --n 131072 \
    --budgets 0.1,0.5 --repeats 2 --json "$out/exp-ab.json" 2>&1 | tee "$out/exp-ab.log"
