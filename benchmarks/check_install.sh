#!/usr/bin/env bash
# Install vse_cuda the way a pip user does, in a fresh venv, and smoke-test the installed copy
# (benchmarks/install_smoke.py, run from outside the source tree). `make check-install` calls it.
#
#   bash benchmarks/check_install.sh isolated   # pip install .  (build isolation on: pip puts the
#                                               # newest torch of the range in the build env)
#   bash benchmarks/check_install.sh 2.13.0     # pip install torch==2.13.0, then
#                                               # pip install --no-build-isolation .
#
# The source is a copy of the working tree's files that git tracks or would track (what a fresh
# clone holds, plus uncommitted changes), so no build folder or compiled library of the checkout
# takes part. VSE_CUDA and VSE_SIMT default to 0 here (a CPU build of _C only, a few minutes;
# a CUDA build takes ~15 min on 2 cores). Nothing is downloaded where pip finds the wheels on disk.
# The venv and the copy are deleted at the end; pip's output is kept in build/check-install/.
set -euo pipefail

if [ $# -ne 1 ] || ! [[ $1 == isolated || $1 =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "usage: $0 isolated|X.Y.Z   (X.Y.Z: the torch version to build against without isolation)" >&2
  exit 2
fi
MODE=$1
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
export VSE_CUDA=${VSE_CUDA:-0} VSE_SIMT=${VSE_SIMT:-0}
LOG_DIR="$REPO/build/check-install"
LOG="$LOG_DIR/$MODE.log"
mkdir -p "$LOG_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vse_check_install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

mkdir "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
   | tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"
"$PYTHON" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/python" -m pip --disable-pip-version-check)

fail() {
  tail -40 "$LOG" >&2
  echo "check-install $MODE: FAILED $1 (VSE_CUDA=$VSE_CUDA VSE_SIMT=$VSE_SIMT); full log: $LOG" >&2
  exit 1
}

: > "$LOG"
START=$SECONDS
cd "$WORK/src"
if [ "$MODE" = isolated ]; then
  echo "\$ pip install ." >> "$LOG"
  "${PIP[@]}" install . >> "$LOG" 2>&1 || fail "at pip install ."
else
  echo "\$ pip install torch==$MODE" >> "$LOG"
  "${PIP[@]}" install "torch==$MODE" >> "$LOG" 2>&1 || fail "at pip install torch==$MODE"
  TORCH_S=$((SECONDS - START))
  echo "\$ pip install --no-build-isolation ." >> "$LOG"
  "${PIP[@]}" install --no-build-isolation . >> "$LOG" 2>&1 || fail "at pip install --no-build-isolation ."
fi
INSTALL_S=$((SECONDS - START))

cd "$WORK"
SMOKE=$("$WORK/venv/bin/python" "$REPO/benchmarks/install_smoke.py" 2>&1) || { echo "$SMOKE" >> "$LOG"; fail "at the smoke test"; }
echo "$SMOKE" >> "$LOG"
if [ "$MODE" = isolated ]; then
  TIMES="pip install . ${INSTALL_S} s"
else
  TIMES="pip install torch ${TORCH_S} s, pip install --no-build-isolation . $((INSTALL_S - TORCH_S)) s"
fi
echo "check-install $MODE: ok (VSE_CUDA=$VSE_CUDA VSE_SIMT=$VSE_SIMT; $TIMES) | $SMOKE"
