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

# fla (flash-linear-attention): only the packages chunk_gla's import chain needs (ops/gla, ops/common,
# ops/utils, ops/backends, ops/attn and ops/cp for common's backends, and fla/utils). Its package
# __init__ files for fla and fla.ops import every op and model (transformers, ...): they are emptied
# (fla's keeps its __version__ line),
# so `import fla.ops.gla.chunk` loads the GLA kernels alone.
extract fla-org+flash-linear-attention fla LICENSE fla/__init__.py fla/utils fla/ops/__init__.py \
  fla/ops/backends fla/ops/common fla/ops/gla fla/ops/utils fla/ops/attn fla/ops/cp
grep '^__version__' "$repo/.peers/fla/fla/__init__.py" > "$repo/.peers/fla/fla/__init__.tmp"  # fla.utils imports it
mv "$repo/.peers/fla/fla/__init__.tmp" "$repo/.peers/fla/fla/__init__.py"
: > "$repo/.peers/fla/fla/ops/__init__.py"
# DEST3D: the issm_triton package (imported as issm_triton.issm_combined; needs einops).
extract OpenSpaceAI+DEST3D DEST3D issm_triton

# einops (pure Python) is imported by DEST3D's issm_combined and fla's ops/attn: the GPU machine has
# no network, so its wheel is unpacked beside both peers when pip can fetch it here.
if python3 -m pip download -q einops --no-deps -d "$repo/.peers/.wheels" 2>/dev/null; then
  for d in fla DEST3D; do python3 -m zipfile -e "$repo"/.peers/.wheels/einops-*.whl "$repo/.peers/$d"; done
  echo "einops $(ls "$repo"/.peers/.wheels) -> .peers/{fla,DEST3D}"
else
  echo "einops not fetched: the DEST3D column needs einops installed on the GPU machine"
fi

# .peers/ must stay out of git: the checkout's .gitignore has it; also the common exclude file
# (a worktree's .git is a file, so ask git where the common directory is).
exclude="$(git -C "$repo" rev-parse --git-common-dir)/info/exclude"
case "$exclude" in /*) ;; *) exclude="$repo/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.peers/' "$exclude" 2>/dev/null || echo '/.peers/' >> "$exclude"
du -sh "$repo/.peers"
