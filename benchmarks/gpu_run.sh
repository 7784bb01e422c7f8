#!/usr/bin/env bash
# One call on the GPU machine: build ssm_ext, build the peers in the background, run the CUDA
# tests and compute-sanitizer while they build, then the benchmarks. Logs go to $OUT.
# Stages: STAGES="build test sanitize bench" (any subset); TESTS narrows the test files (default tests),
# TEST_K the CUDA tests (a pytest -k expression).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build test sanitize bench"}
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export SSM_EXT_PEERS=${SSM_EXT_PEERS:-$PWD/.peers}
TESTS=${TESTS:-tests}
has() { [[ " $STAGES " == *" $1 "* ]]; }
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
if has build; then
  if [ -d "$SSM_EXT_PEERS/causal-conv1d" ] && has bench; then
    (bash benchmarks/build_peers.sh > "$OUT/peer_build.log" 2>&1; echo "peer build rc=$?" >> "$OUT/peer_build.log") &
    peer_pid=$!
  fi
  stamp "building ssm_ext"
  MAX_JOBS=8 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  stamp "ssm_ext built"
fi
if has test; then
  # bad-input tests in their own process, so that a crash there cannot hide other results
  python3 -m pytest $TESTS -m cuda -q -p no:cacheprovider -k "not bad${TEST_K:+ and ($TEST_K)}" ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/test_cuda.log" | grep -v DEBUG | tail -8
  python3 -m pytest $TESTS -m cuda -q -p no:cacheprovider -k "bad" 2>&1 | tee "$OUT/test_cuda_bad.log" | grep -v DEBUG | tail -4
  stamp "cuda tests done"
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest $TESTS -m cuda -q -x -p no:cacheprovider \
      -k "${SANITIZE_K:-not compile and not opcheck and not gradcheck and not very_long}" > "$OUT/sanitize_$tool.log" 2>&1
    echo "compute-sanitizer $tool rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -3
    stamp "sanitizer $tool done"
  done
fi
if has bench; then
  [ -n "${peer_pid:-}" ] && { wait $peer_pid; tail -2 "$OUT/peer_build.log"; stamp "peers built"; }
  python3 -m benchmarks.run --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -12
  stamp "benchmarks done"
fi
