#!/usr/bin/env bash
# Extract the peer sources needed to build and import them into .peers/ (git-ignored through
# .git/info/exclude); images, tests and examples stay out, since .peers travels to the GPU machine.
# Usage: benchmarks/prepare_peers.sh [MIRROR_ROOT]   (default /work/.mirror, bare repos from the fetch tool)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
mirror=${1:-/work/.mirror}

extract() {  # extract MIRROR_NAME FOLDER PATH...
  local src=$mirror/$1/repo dst=$repo/.peers/$2
  rm -rf "$dst" && mkdir -p "$dst"
  git -C "$src" archive HEAD "${@:3}" | tar -x -C "$dst"
  echo "$2 $(git -C "$src" rev-parse HEAD) -> $dst"
}
extract Dao-AILab+causal-conv1d causal-conv1d setup.py pyproject.toml csrc causal_conv1d LICENSE README.md MANIFEST.in
# quick_ssm's package __init__ imports only its scan interface and layer: the package imports as is.
extract samblouir+quick_ssm quick_ssm pyproject.toml README.md \
  quick_ssm/{__init__,scan_interface,layers,naive_baseline,triton_forwards,triton_backwards}.py
# accelerated_scan.warp builds its CUDA kernel with load_inline at import (build_peers.sh prebuilds it).
extract proger+accelerated-scan accelerated-scan LICENSE README.md pyproject.toml \
  accelerated_scan/{__init__,scalar,warp}.py accelerated_scan/warp.cuh

mkdir -p "$repo/.git/info"
grep -qxF '/.peers/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.peers/' >> "$repo/.git/info/exclude"
du -sh "$repo/.peers"
