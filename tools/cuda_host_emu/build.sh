#!/usr/bin/env bash
# Builds the host emulation of the ISSM, norm, scan-strip and dense HSTU CUDA kernels (see README.md) into
# build/cuda_host_emu/hemu.so. ASAN=1: with AddressSanitizer (run the checks with
# LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0; run.sh does).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/tools/cuda_host_emu
out=${BUILD:-$repo/build/cuda_host_emu${ASAN:+_asan}}
mkdir -p "$out/inc/issm" "$out/inc/scan" "$out/inc/common" "$out/inc/hstu_bsa"
t() { python3 "$here/transform.py" "$@"; }  # rewrites its output only when the text changes
t "$repo/csrc/issm/issm_fwd.cu" "$out/issm_fwd.cpp" "$here/append_fwd.txt"
t "$repo/csrc/issm/issm_bwd.cu" "$out/issm_bwd.cpp" "$here/append_bwd.txt"
t "$repo/csrc/norm/norm_cuda.cu" "$out/norm_cuda.cpp" "$here/append_norm.txt"
t "$repo/csrc/scan/scan_strips.cu" "$out/scan_strips.cpp" "$here/append_scan.txt"
t "$repo/csrc/hstu_bsa/hstu_attn_fwd.cu" "$out/hstu_attn_fwd.cpp" "$here/append_hstu_fwd.txt"
t "$repo/csrc/hstu_bsa/hstu_attn_bwd.cu" "$out/hstu_attn_bwd.cpp" "$here/append_hstu.txt"
for f in issm/issm_cuda.cuh scan/scan_cuda.cuh common/mma.cuh hstu_bsa/hstu_tile.cuh; do  # shadow csrc's through $out/inc
  t "$repo/csrc/$f" "$out/inc/$f"
done
pre=()
if [ -n "${ASAN:-}" ]; then  # loading the built module needs the ASAN runtime first
  pre=(env LD_PRELOAD="$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0)
fi
REPO=$repo HERE=$here OUT=$out "${pre[@]}" python3 - <<'PY'
import os
import torch.utils.cpp_extension as ce
repo, here, out = os.environ["REPO"], os.environ["HERE"], os.environ["OUT"]
asan = bool(os.environ.get("ASAN"))
ce.load(name="hemu", sources=[f"{here}/emu_rt.cpp", f"{out}/issm_fwd.cpp", f"{out}/issm_bwd.cpp", f"{out}/norm_cuda.cpp",
                              f"{out}/scan_strips.cpp", f"{out}/hstu_attn_fwd.cpp", f"{out}/hstu_attn_bwd.cpp",
                              f"{repo}/csrc/issm/issm.cpp", f"{repo}/csrc/norm/norm.cpp", f"{repo}/csrc/scan/scan.cpp",
                              f"{repo}/csrc/hstu_bsa/hstu_bsa.cpp", f"{here}/bind.cpp"],
        extra_include_paths=[f"{out}/inc", f"{here}/inc", f"{repo}/csrc"],
        extra_cflags=["-std=c++20", "-O1", "-g0", "-DSSM_EXT_WITH_CUDA"] + (["-fsanitize=address"] if asan else []),
        extra_ldflags=["-fsanitize=address"] if asan else [], build_directory=out, verbose=False)
print(f"built {out}/hemu.so")
PY
