#!/usr/bin/env bash
# Download into .whl/ (repository root, git-ignored) exactly the wheels the lent H100/H200's image lacks, for
# its python 3.12 on manylinux x86_64; benchmarks/gpu_report.py installs them there with pip --target.
#
#   bash benchmarks/fetch_gpu_wheels.sh        # then: device run with carry [".whl"]
#
# The image has torch 2.11 (CUDA 13), triton 3.6, transformers, timm, nvidia-cudnn-cu13; it lacks:
#   torchao 0.18.0              the release built against torch 2.11 (3.4 MB)
#   nvidia-cudnn-frontend 1.32  the cuDNN graph API for Python (11.6 MB); its declared dependencies
#                               (nvidia-cutlass-dsl, apache-tvm-ffi) serve only its DSL kernels, which
#                               `import cudnn` loads lazily: not carried (the sdpa graphs do not use them)
# Not carried: xformers. No wheel on PyPI loads with torch 2.11 + CUDA 13: 0.0.35 (torch >= 2.10) has one
# _C.so linked against libcudart.so.12, which the CUDA 13 image does not have; 0.0.34 pins torch==2.10.0.
# Everything carried counts towards the 64 MiB a device call may take along.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-python3}
mkdir -p "$DEST"
# ignored by git (a worktree's exclude file lives in the common git dir)
EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$EXCLUDE" ]; then grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >> "$EXCLUDE"; fi
WHEELS=(torchao==0.18.0 nvidia-cudnn-frontend==1.32.0)
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}
  if ls "$DEST"/"${name//-/_}"-*.whl >/dev/null 2>&1; then
    echo "have $(ls "$DEST"/"${name//-/_}"-*.whl)"
    continue
  fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "$spec"
done
# one version of each, or the install on the device stops
for name in torchao nvidia_cudnn_frontend; do
  n=$(ls "$DEST"/${name}-*.whl 2>/dev/null | wc -l)
  [ "$n" -eq 1 ] || { echo "error: $n wheels of $name in $DEST (want exactly 1)" >&2; exit 1; }
done
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
