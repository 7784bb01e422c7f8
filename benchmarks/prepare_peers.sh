#!/usr/bin/env bash
# Extract the peer sources needed to build them into .peers/ (git-ignored through .git/info/exclude).
# Usage: benchmarks/prepare_peers.sh [MIRROR_ROOT]   (default /work/.mirror, bare repos from the fetch tool)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
mirror=${1:-/work/.mirror}

src=$mirror/Dao-AILab+causal-conv1d/repo
dst=$repo/.peers/causal-conv1d
rm -rf "$dst" && mkdir -p "$dst"
git -C "$src" archive HEAD setup.py pyproject.toml csrc causal_conv1d LICENSE README.md MANIFEST.in | tar -x -C "$dst"
echo "causal-conv1d $(git -C "$src" rev-parse HEAD) -> $dst"

mkdir -p "$repo/.git/info"
grep -qxF '/.peers/' "$repo/.git/info/exclude" 2>/dev/null || echo '/.peers/' >> "$repo/.git/info/exclude"
du -sh "$repo/.peers"
