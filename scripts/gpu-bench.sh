#!/usr/bin/env bash
# Inference throughput of the default model on an NVIDIA GPU through ONNX Runtime's CUDA
# execution provider, per batch size (1, 8, 64, 256, 1024 windows of 8 nodes), as node-windows/s.
# Run it on a machine with a CUDA 13 capable driver; it prints criterion's table, which goes into
# docs/performance.md.
#
#   scripts/gpu-bench.sh            # installs onnxruntime-gpu into .venv-gpu, builds with
#                                   # --features cuda, runs benches/inference.rs on the GPU
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
ORT_VERSION="$(sed -n 's/^ORT_VERSION="\(.*\)"/\1/p' scripts/setup-python.sh)"
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
fi
# The GPU wheel of the same ONNX Runtime version, with the CUDA 13 and cuDNN runtime wheels.
.venv-gpu/bin/python -m pip install --quiet --disable-pip-version-check "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
site="$(.venv-gpu/bin/python -c 'import site; print(site.getsitepackages()[0])')"
export ORT_DYLIB_PATH="$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* | head -n 1)"
# The CUDA libraries the wheels ship, for the provider library to find.
LD_LIBRARY_PATH="$site/onnxruntime/capi${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for lib in "$site"/nvidia/*/lib; do
  [ -d "$lib" ] && LD_LIBRARY_PATH="$lib:$LD_LIBRARY_PATH"
done
export LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
GRIDWATCH_EXECUTION_PROVIDER=cuda cargo bench --locked --features cuda --bench inference -- \
  --warm-up-time 2 --measurement-time 5
# For comparison on the same machine's CPU:
cargo bench --locked --bench inference -- --warm-up-time 2 --measurement-time 5
