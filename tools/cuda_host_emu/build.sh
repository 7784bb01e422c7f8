#!/usr/bin/env bash
# Builds the host emulation of the ISSM and norm CUDA kernels (see README.md) into
# build/cuda_host_emu/hemu.so. ASAN=1: with AddressSanitizer (run the checks with
# LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0; run.sh does).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/tools/cuda_host_emu
out=${BUILD:-$repo/build/cuda_host_emu${ASAN:+_asan}}
mkdir -p "$out/inc/issm"
for f in issm/issm_fwd issm/issm_bwd norm/norm_cuda; do
  python3 "$here/transform.py" "$repo/csrc/$f.cu" "$out/$(basename $f).cpp"
done
python3 "$here/transform.py" "$repo/csrc/issm/issm_cuda.cuh" "$out/inc/issm/issm_cuda.cuh"
cat "$here/append_fwd.txt" >> "$out/issm_fwd.cpp"
cat "$here/append_bwd.txt" >> "$out/issm_bwd.cpp"
cat "$here/append_norm.txt" >> "$out/norm_cuda.cpp"
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
                              f"{repo}/csrc/issm/issm.cpp", f"{repo}/csrc/norm/norm.cpp", f"{here}/bind.cpp"],
        extra_include_paths=[f"{out}/inc", f"{here}/inc", f"{repo}/csrc"],
        extra_cflags=["-std=c++20", "-O1", "-g0", "-DSSM_EXT_WITH_CUDA"] + (["-fsanitize=address"] if asan else []),
        extra_ldflags=["-fsanitize=address"] if asan else [], build_directory=out, verbose=False)
print(f"built {out}/hemu.so")
PY
