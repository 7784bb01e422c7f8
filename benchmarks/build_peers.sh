#!/usr/bin/env bash
# Build the peers in place on the GPU machine (no network needed), for SSM_EXT_PEERS=$PWD/.peers.
# causal-conv1d: causal_conv1d_cuda*.so lands next to setup.py, so its folder on sys.path imports it.
# accelerated-scan: `accelerated_scan.warp` compiles its kernel with torch's load_inline at import, into
# torch's extension cache; importing it once here, beside the causal-conv1d build, leaves the
# benchmark's import only to load it (same TORCH_CUDA_ARCH_LIST, so the same build flags).
set -euo pipefail
peers=${SSM_EXT_PEERS:?set SSM_EXT_PEERS to the .peers folder}
export TORCH_CUDA_ARCH_LIST=9.0
if [ -d "$peers/accelerated-scan" ]; then
  (cd "$peers/accelerated-scan" && python -c "import accelerated_scan.warp" > build.log 2>&1) &
  warp_pid=$!
fi
cd "$peers/causal-conv1d"
# FORCE_BUILD only matters to its bdist_wheel (the command that would download a prebuilt wheel);
# build_ext never downloads. TORCH_CUDA_ARCH_LIST is ignored by torch because setup.py passes its own
# -gencode list (sm_75 ... sm_121), so the wrapper below swaps that list for sm_90 alone.
export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16}
python - > build.log 2>&1 <<'PY' || { tail -n 40 build.log; exit 1; }
import runpy, sys, types
import setuptools

try:
    import wheel.bdist_wheel  # noqa: F401  setup.py imports it at the top
except ImportError:  # newer setups have no `wheel`; setuptools ships the same command
    import setuptools.command.bdist_wheel as bdist_wheel
    sys.modules["wheel"] = types.ModuleType("wheel")
    sys.modules["wheel.bdist_wheel"] = bdist_wheel

real_setup = setuptools.setup


def setup(**kw):
    for ext in kw.get("ext_modules", []):
        nvcc = ext.extra_compile_args["nvcc"]
        keep = [f for i, f in enumerate(nvcc) if f != "-gencode" and (i == 0 or nvcc[i - 1] != "-gencode")]
        ext.extra_compile_args["nvcc"] = keep + ["-gencode", "arch=compute_90,code=sm_90"]
        print("nvcc flags:", ext.extra_compile_args["nvcc"])
    return real_setup(**kw)


setuptools.setup = setup
sys.argv = ["setup.py", "build_ext", "--inplace"]
runpy.run_path("setup.py", run_name="__main__")
PY
grep -m1 "nvcc flags" build.log
ls causal_conv1d_cuda*.so
if [ -n "${warp_pid:-}" ]; then
  wait "$warp_pid" || { tail -n 40 "$peers/accelerated-scan/build.log"; exit 1; }
  echo "accelerated_scan.warp built"
fi
