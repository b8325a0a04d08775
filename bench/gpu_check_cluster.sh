#!/usr/bin/env bash
# GPU check of the cluster path on the lent device machine (one H200, python 3.12, torch 2.11, no network, no ray
# or deepspeed installed). Run from the repo root with the wheels of .whl/ carried:
#
#   run(command="bash bench/gpu_check_cluster.sh", carry=[".whl"], timeout_s=480)
#
# Writes $OUT/gpu_check_cluster.json (each step recorded separately, rewritten after every step) and
# $OUT/gpu_check_cluster.log; LIMIT_S (default 420) stops the Python check before the call's own limit.
#
# .whl/ (about 43 MiB; `echo /.whl/ >> .git/info/exclude`), built here for cp312 manylinux x86_64:
#   D="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
#      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"
#   python3 -m pip download $D -d /tmp/w ray==2.60.0
#   python3 bench/strip_wheel.py /tmp/w/ray-2.60.0-*.whl .whl --drop ray/jars/ ray/rllib/ ray/dashboard/client/ \
#       --drop-suffix .js.map --strip-symbols ray/_raylet.so ray/core/src/ray/gcs/gcs_server \
#       ray/core/src/ray/raylet/raylet                                      # 75.6 -> 36.3 MiB
#   DS_BUILD_OPS=0 python3.12 -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8  # sdist only
#   python3 -m pip download $D -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#       typing-inspection==0.4.5 typing-extensions==4.16.0 fastapi==0.136.3 starlette==1.10.0 uvicorn==0.54.0 \
#       grpcio-reflection==1.62.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
#       rpds-py==2026.9.1 hjson==3.1.0 colorful==0.5.8
# The image lacks all of these. typing-extensions is carried because pydantic-core 2.50 imports Sentinel (4.16+);
# grpcio-reflection 1.62.3 (protobuf 4.25 gencode, no runtime check) imports under protobuf 5, 6 and 7 alike.
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
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
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
