#!/usr/bin/env bash
# GPU check of the cluster path on the lent device machine (one H200, no network, no ray/deepspeed installed).
# Run from the repo root with the wheels of .whl/ carried (ray 2.60.0 stripped of jars/rllib/dashboard UI and
# symbol tables by bench/strip_wheel.py, deepspeed 0.19.8 built from its sdist, and the pure-Python deps the image
# lacks: pydantic, fastapi, starlette, uvicorn, jsonschema, hjson, colorful):
#
#   run(command="bash bench/gpu_check_cluster.sh", carry=[".whl"], timeout_s=480)
#
# Writes $OUT/gpu_check_cluster.json (each step recorded separately, rewritten after every step) and
# $OUT/gpu_check_cluster.log; LIMIT_S (default 420) stops the Python check before the call's own limit.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
SITE=${SITE:-/tmp/site}
mkdir -p "$OUT"
LOG="$OUT/gpu_check_cluster.log"
t0=$(date +%s)
{
  echo "== $(date -u +%FT%TZ) $(uname -m) $(python3 --version 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
  ls .whl/*.whl | wc -l | xargs echo "wheels:"
} 2>&1 | tee "$LOG"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl \
  >>"$LOG" 2>&1 || { echo "pip install of .whl failed" | tee -a "$LOG"; tail -20 "$LOG"; exit 3; }
echo "== wheels installed in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
export PYTHONPATH=$SITE:$PWD
export PATH=$SITE/bin:$PATH
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
  TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
# the whole output goes to the log; the terminal (the call's output tail) gets it without progress bars
timeout -k 10 "${LIMIT_S:-420}" python3 -m bench.gpu_check_cluster --out "$OUT" ${GPU_CHECK_ARGS:-} 2>&1 \
  | tee -a "$LOG" \
  | grep --line-buffered -v -E "^\s*$|it/s\]|s/it\]|Running Dataset|Running [0-9]+:|- (ReadPandas|MapBatches|Map\()"
rc=${PIPESTATUS[0]}
echo "== python exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
python3 - "$OUT/gpu_check_cluster.json" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("no result file:", e); sys.exit(0)
for k, v in d.items():
    if isinstance(v, dict) and "ok" in v:
        print(f"{k:32s} ok={v['ok']!s:5s} {v.get('wall_s', '')!s:>6s}s  {(v.get('error') or '')[:160]}")
print("summary:", d.get("summary", "(run did not finish)"))
EOF
exit $rc
