#!/usr/bin/env bash
# Build the host emulation and run its checks (QUICK=1: skip the slow multi-chunk cases;
# ASAN=1: under AddressSanitizer).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/tools/cuda_host_emu
bash "$here/build.sh"
so=${BUILD:-$repo/build/cuda_host_emu${ASAN:+_asan}}/hemu.so
if [ -n "${ASAN:-}" ]; then
  export LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0
fi
HEMU_SO=$so python3 "$here/check_issm.py"
HEMU_SO=$so python3 "$here/check_norm.py"
HEMU_SO=$so python3 "$here/check_scan.py"
HEMU_SO=$so python3 "$here/check_hstu.py"
