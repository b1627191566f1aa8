#!/usr/bin/env bash
# The GPU checks of a session that has a CUDA machine: build kedit's CUDA ops, run the CUDA tests and
# the GPU benchmarks. Each stage is named on the command line and appends to $OUT/session.log:
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh build tests stats eval editors-smoke
#   OUT=/tmp/gpu bash bench/gpu_session.sh build tests stats-op overhead       # the speed issue's op checks
#   OUT=/tmp/gpu GPU_REQUESTS=1000 REFERENCE_SAMPLE=5 bash bench/gpu_session.sh editors   # (build first)
#
# Nothing is installed from a registry: kedit is installed editable without dependencies into the
# machine's Python, whose torch must be a CUDA build (the ops are built for the GPU it finds).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
# Build with the system compiler when there is one. On the lent H200 image, CC/CXX point at a g++
# wrapper (/opt/gcc) whose builds crash (SIGSEGV) whenever an op throws (every TORCH_CHECK on bad
# input); the same GCC 13.3 from /usr/bin builds ops that raise RuntimeError as they should.
if [ -x /usr/bin/g++ ] && [ -z "${KEDIT_KEEP_CXX:-}" ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi

stage() { echo; echo "::: $1 ($(date -u +%H:%M:%S))"; }

run_stage() {
  case "$1" in
    build)
      stage "build kedit_core._C (CUDA arch $TORCH_CUDA_ARCH_LIST)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
      if ! $PY -m pip install -v --no-index --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
        grep -n -i -B2 -A8 "error" "$OUT/build.log" | head -150; tail -40 "$OUT/build.log"; return 1
      fi
      tail -2 "$OUT/build.log"
      $PY -c "import torch, kedit_core; from kedit_core import _ext, ops
print('ext:', _ext.status())
for op in ('cov_accumulate_', 'gather_segment_sum', 'spd_factor', 'spd_solve', 'spd_woodbury_solve'):
    print(op, ops.implementation(op, 'cuda').implementation)" ;;
    tests)
      stage "CUDA tests"
      $PY -m pytest -q -rs -p no:cacheprovider tests/ops tests/stats ;;
    stats)
      stage "bench_stats (bf16, op and pass)"
      $PY bench/bench_stats.py --device cuda --dtype bfloat16 --out "$OUT/stats-cuda.json" ;;
    stats-op)
      stage "bench_stats --op-only: cov_accumulate_ implementations vs torch.mm (bf16 inputs)"
      $PY bench/bench_stats.py --device cuda --op-only --op-dtypes bfloat16 --out "$OUT/stats-op-cuda.json" ;;
    overhead)
      stage "bench_stats --overhead: C0 pass vs the truncated forward alone, GPT-J-shaped bf16, layers 3-8"
      $PY bench/bench_stats.py --device cuda --dtype bfloat16 --overhead --layers 3,4,5,6,7,8 --tokens 300000 \
        --overhead-impls blocked,compiled --out "$OUT/stats-overhead-cuda.json" 2>&1 | grep -v "tok/s\]" ;;
    eval)
      stage "bench_eval (300 records, fp32 and bf16)"
      $PY bench/bench_eval.py --device cuda --records 300 --batch-tokens 2048,8192,32768
      $PY bench/bench_eval.py --device cuda --dtype bfloat16 --records 300 --batch-tokens 8192,32768 ;;
    editors-smoke)
      stage "bench_editors --gpu, 100 requests (path check and rough speed)"
      $PY bench/bench_editors.py --gpu --gpu-requests 100 --reference-sample 5 --out "$OUT/smoke" ;;
    editors)
      stage "bench_editors --gpu, ${GPU_REQUESTS:-1000} requests"
      # WORK_DIR=/path keeps finished value batches: a run cut off by a command's time limit is finished by
      # running the same stage again (on the same machine while it is warm).
      $PY bench/bench_editors.py --gpu --gpu-requests "${GPU_REQUESTS:-1000}" --reference-sample "${REFERENCE_SAMPLE:-10}" \
        --early-stop "${EARLY_STOP:-off,on}" --out "$OUT" ${WORK_DIR:+--work-dir "$WORK_DIR"} 2>&1 | grep -v "\[A" ;;
    *) echo "unknown stage $1" >&2; return 2 ;;
  esac
}

status=0
for name in "$@"; do
  run_stage "$name" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "::: $name exit $rc" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=$rc
  if [ "$name" = build ] && [ "$rc" -ne 0 ]; then exit "$rc"; fi
done
exit $status
