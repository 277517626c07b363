#!/usr/bin/env bash
# GPU truth in one call (DESIGN §9, issue 14): build against this machine's torch, the `cuda`
# tests, compute-sanitizer where it works, the GPU benchmark and a short GPU training run, in
# <= 8 minutes on the lent H200. Every step has its own `timeout`; a failed step is recorded in
# OUT_DIR/summary.md and the next one runs anyway.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine (python3 = its torch)
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # here and in CI: every step short of the GPU
#
# The dry run reuses an importable build (CI has just built it), runs the cost model, collects
# the cuda tests (they skip without a GPU), and runs tiny CPU versions of the benchmark and of the
# training run; it exits 1 if any of its steps fails. The real run exits 1 if any step failed.
#
# At most 8 files land in OUT_DIR: summary.md, build.log, tests.log, sanitizer.log, bench.log,
# bench_gpu.md (or bench_gpu_cpu.md), bench_gpu.csv (or bench_gpu_cpu.csv), train.log.
# The cost model's table goes into summary.md.
set -u -o pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: $0 [--dry-run] OUT_DIR" >&2; exit 2; fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
# The venv's python here (CI), the machine's python3 there (its torch 2.11, no venv).
PY=${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SUMMARY="$OUT/summary.md"
FAILED=0
START=$(date +%s)
# The whole check ends within TOTAL_S (8 minutes less a margin for the transfers): each step's
# limit is cut to what is left, and a step with under 10 s left is skipped, not started.
TOTAL_S=${TOTAL_S:-460}
DEADLINE=$(( START + TOTAL_S ))

{
  echo "# gpu_check $( [ $DRY = 1 ] && echo '(dry run, no GPU)' ) $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Repo: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'); python: $PY; MAX_JOBS=$MAX_JOBS;"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; CUDA_HOME=$CUDA_HOME; load: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo
  echo '| step | status | seconds | log |'
  echo '|---|---|---:|---|'
} > "$SUMMARY"

# step NAME LIMIT_S LOG COMMAND...: run it under `timeout`, record status and seconds.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s) rc status
  local left=$(( DEADLINE - t0 ))
  if [ "$left" -lt 10 ]; then
    echo "| $name | SKIPPED: under 10 s of the ${TOTAL_S} s total left | 0 | $log |" >> "$SUMMARY"; FAILED=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== [$name] (limit ${limit}s) $*" | tee -a "$OUT/$log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT after ${limit}s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  echo "| $name | $status | $(( $(date +%s) - t0 )) | $log |" >> "$SUMMARY"
  echo "== [$name] $status" | tee -a "$OUT/$log"
}

note() { echo "| $1 | $2 | 0 | $3 |" >> "$SUMMARY"; }

# 1. Build (no build isolation, no deps: against the torch already installed, no downloads).
if [ $DRY = 1 ] && "$PY" -c "import vse_cuda" 2>/dev/null; then
  note build "reused (importable: $("$PY" -c 'import vse_cuda; print(*vse_cuda.backends())'))" -
else
  if [ $DRY = 1 ]; then export VSE_CUDA=0; else export VSE_CUDA=1 VSE_SIMT=0; fi
  step build 240 build.log "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -e .
fi
"$PY" -c "import vse_cuda, torch; print('backends', vse_cuda.backends(), 'torch', torch.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" >> "$OUT/build.log" 2>&1

# 2. The cuda-backend tests (they skip without a GPU: the dry run only collects them).
if [ $DRY = 1 ]; then
  step tests-collect 120 tests.log "$PY" -m pytest python_tests/test_triplet.py python_tests/test_unified.py \
      python_tests/test_siglip.py python_tests/test_topk.py -q -p no:cacheprovider -k cuda --collect-only
else
  step tests-cuda 90 tests.log "$PY" -m pytest python_tests -q -p no:cacheprovider -k cuda -m "not slow" \
      -o faulthandler_timeout=60
fi

# 3. compute-sanitizer memcheck and racecheck on one small call of every loss (refused on gVisor);
#    unified and SigLIP also with learnable (requires-grad 0-dim) scale and bias.
SAN_PROBE='import torch, vse_cuda as v
x = [torch.nn.functional.normalize(torch.randn(96, 32, device="cuda"), dim=1).requires_grad_() for _ in range(6)]
for f, n in ((v.triplet_loss, 2), (v.unified_loss, 2), (v.goal_loss, 2), (v.quintuplet_loss, 6)):
    f(*x[:n]).backward()
s, b = (torch.tensor(t, device="cuda", requires_grad=True) for t in (10.0, -10.0))
v.unified_loss(*x[:2], scale=s).backward(); v.siglip_loss(*x[:2], s, b).backward()
v.topk_similar(x[0].detach(), x[1].detach(), 5); torch.cuda.synchronize(); print("probe ok")'
if [ $DRY = 1 ]; then
  note sanitizer "skipped: dry run ($(command -v compute-sanitizer >/dev/null && echo present || echo 'not here'))" -
elif ! command -v compute-sanitizer >/dev/null; then
  note sanitizer "skipped: compute-sanitizer not on PATH" sanitizer.log
else
  for tool in memcheck racecheck; do
    step "sanitizer-$tool" 40 sanitizer.log compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" -c "$SAN_PROBE"
  done
  if grep -qE "Device not supported|error 999|unsupported" "$OUT/sanitizer.log"; then
    note sanitizer-refused "compute-sanitizer refused the device (gVisor runtime?): see the log" sanitizer.log
  fi
fi

# 4. The benchmark (GPU: the sweep, budgeted; dry run: tiny CPU shapes).
if [ $DRY = 1 ]; then
  step bench-cpu-tiny 150 bench.log "$PY" benchmarks/bench_gpu.py --device cpu --quick --out-dir "$OUT"
else
  step bench-gpu 150 bench.log "$PY" benchmarks/bench_gpu.py --device cuda --budget-s 110 --out-dir "$OUT"
fi

# 5. A short training run (GPU: 2 epochs at batch 1024; dry run: 1 tiny CPU epoch).
RUN_DIR=$(mktemp -d)
if [ $DRY = 1 ]; then
  step train-cpu-tiny 120 train.log "$PY" -m vse_cuda.train --device cpu --run-dir "$RUN_DIR" --overwrite \
      --no-progress --threads 1 --epochs 1 --synthetic-train 200 --synthetic-dev 100 --synthetic-test 100 \
      --embed-dim 32 --batch-size 50
else
  step train-gpu 60 train.log "$PY" -m vse_cuda.train --device cuda --run-dir "$RUN_DIR" --overwrite \
      --no-progress --epochs 2 --batch-size 1024 --lr 1e-3
fi
[ -f "$RUN_DIR/log.csv" ] && { echo "== log.csv"; cat "$RUN_DIR/log.csv"; } >> "$OUT/train.log"
rm -rf "$RUN_DIR"

# 6. The cost model's predictions (pure Python), into the summary.
{
  echo
  echo "Total: $(( $(date +%s) - START )) s. Steps failed: $( [ $FAILED = 1 ] && echo yes || echo none )."
  echo
  "$PY" benchmarks/cost_model_report.py predict --n 65536 --dim 768 --dtype bfloat16 --out /dev/null \
      | sed -n '/^| call/,$p'
} >> "$SUMMARY" 2>&1 || FAILED=1

cat "$SUMMARY"
ls "$OUT"
exit $FAILED
