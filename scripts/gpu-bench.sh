#!/usr/bin/env bash
# Inference throughput of the default model on an NVIDIA GPU through ONNX Runtime's CUDA
# execution provider, per batch size (1 to 16384 windows of 8 nodes; GPU_BATCHES overrides), as
# node-windows/s, through gridwatch's own model call and through I/O binding (pinned host
# buffers, GPU-resident data, CUDA graphs); then gridwatch's model call on the machine's CPU
# (1 to 1024 windows) for comparison; then `gridwatch bench` end to end with inference on the
# GPU (max_batch 1024, --repeat 3). The tables go into docs/performance.md. Needs a CUDA 13
# capable driver.
#
#   scripts/gpu-bench.sh            on a GPU machine with network and Rust: installs
#                                   onnxruntime-gpu into .venv-gpu, builds with --features cuda,
#                                   runs benches/inference.rs and gridwatch bench on the GPU
#   scripts/gpu-bench.sh pack       on a machine with network and Rust, for a GPU machine with
#                                   neither: writes .gpu-pack/ (the built bench and gridwatch,
#                                   ONNX Runtime's GPU libraries, the CUDA provider in parts of
#                                   56 MiB) and prints what to copy over, part by part; leaves
#                                   a --features cuda build in target/release
#   scripts/gpu-bench.sh run        on the GPU machine, in a copy of this tree holding
#                                   .gpu-pack/: joins the parts and runs the packed benches; the
#                                   CUDA 13 runtime, cuBLAS and cuDNN come from python3's nvidia-*
#                                   packages there (or from LD_LIBRARY_PATH)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ORT_VERSION="$(sed -n 's/^ORT_VERSION="\(.*\)"/\1/p' scripts/setup-python.sh)"
pack="$root/.gpu-pack"
part_size="56m"
criterion_args=(--warm-up-time 2 --measurement-time 5)
gpu_batches="${GPU_BATCHES:-1,8,64,256,1024,4096,16384}"

# Puts the lib folders of python3's nvidia-* packages (CUDA runtime, cuBLAS, cuDNN, ...) on
# LD_LIBRARY_PATH, for ONNX Runtime's CUDA provider to find.
cuda_libraries_from() {
  local site="$1" lib
  for lib in "$site"/nvidia/*/lib; do
    [ -d "$lib" ] && LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  export LD_LIBRARY_PATH
}

# Stops unless an NVIDIA GPU answers; prints which.
require_gpu() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv \
    || { echo "gpu-bench.sh: no NVIDIA GPU answers (nvidia-smi failed)" >&2; exit 1; }
}

# Runs the inference bench command "$@" on the GPU, then on the same machine's CPU.
gpu_then_cpu() {
  GRIDWATCH_EXECUTION_PROVIDER=cuda GRIDWATCH_BENCH_BATCHES="$gpu_batches" "$@"
  "$@"
}

# Runs `gridwatch bench` (the binary "$1", run from the tree's root for models/) with inference
# on the GPU, at the batch size from which the GPU passes 1 M node-windows/s.
end_to_end() {
  GRIDWATCH__MODEL__EXECUTION_PROVIDER=cuda GRIDWATCH__INFER__MAX_BATCH=1024 \
    "$1" bench --readings 400000 --repeat 3
}

case "${1:-}" in
  "")
    require_gpu
    scripts/setup.sh
    if [ ! -x .venv-gpu/bin/python ]; then
      python3 -m venv .venv-gpu
    fi
    # The GPU wheel of the same ONNX Runtime version, with the CUDA 13 and cuDNN runtime wheels.
    .venv-gpu/bin/python -m pip install --quiet --disable-pip-version-check "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
    site="$(.venv-gpu/bin/python -c 'import site; print(site.getsitepackages()[0])')"
    export ORT_DYLIB_PATH="$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* | head -n 1)"
    LD_LIBRARY_PATH="$site/onnxruntime/capi${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    cuda_libraries_from "$site"
    gpu_then_cpu cargo bench --locked --features cuda --bench inference -- "${criterion_args[@]}"
    cargo build --release --locked --features cuda
    end_to_end target/release/gridwatch
    ;;
  pack)
    rm -rf "$pack"
    mkdir -p "$pack/base" "$pack/wheel"
    bench="$(cargo bench --locked --features cuda --bench inference --no-run --message-format=json 2>/dev/null \
      | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target") or {}
    if m.get("executable") and "bench" in t.get("kind", []) and t.get("name") == "inference":
        print(m["executable"])')"
    [ -x "$bench" ] || { echo "gpu-bench.sh: the inference bench did not build" >&2; exit 1; }
    cp "$bench" "$pack/base/inference"
    cargo build --release --locked --features cuda
    cp target/release/gridwatch "$pack/base/gridwatch"
    # The wheel for the GPU machine's Python does not matter: only its shared libraries are used.
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      -d "$pack/wheel" "onnxruntime-gpu==$ORT_VERSION"
    wheel="$(ls "$pack"/wheel/onnxruntime_gpu-*.whl)"
    (cd "$pack/wheel" && python3 -m zipfile -e "$wheel" unpacked)
    capi="$pack/wheel/unpacked/onnxruntime/capi"
    cp "$capi/libonnxruntime.so.$ORT_VERSION" "$capi/libonnxruntime_providers_shared.so" "$pack/base/"
    (cd "$pack" && split -b "$part_size" -d "$capi/libonnxruntime_providers_cuda.so" cuda-provider.part)
    (cd "$capi" && sha256sum libonnxruntime_providers_cuda.so) > "$pack/base/cuda-provider.sha256"
    rm -rf "$pack/wheel"
    echo "gpu-bench.sh: packed into $pack; copy each of these to the GPU machine's copy of the tree"
    echo "(each under 64 MiB), then run 'scripts/gpu-bench.sh run' there:"
    (cd "$root" && du -sh .gpu-pack/base .gpu-pack/cuda-provider.part*)
    ;;
  run)
    [ -d "$pack/base" ] || { echo "gpu-bench.sh: no $pack/base; run 'scripts/gpu-bench.sh pack' first" >&2; exit 1; }
    require_gpu
    provider="$pack/base/libonnxruntime_providers_cuda.so"
    if [ ! -f "$provider" ] || ! (cd "$pack/base" && sha256sum --quiet -c cuda-provider.sha256); then
      cat "$pack"/cuda-provider.part* > "$provider"
      (cd "$pack/base" && sha256sum --quiet -c cuda-provider.sha256) \
        || { echo "gpu-bench.sh: the CUDA provider's parts are incomplete" >&2; exit 1; }
    fi
    export ORT_DYLIB_PATH="$pack/base/libonnxruntime.so.$ORT_VERSION"
    LD_LIBRARY_PATH="$pack/base${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    site="$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null || true)"
    [ -n "$site" ] && cuda_libraries_from "$site"
    export GRIDWATCH_BENCH_ROOT="$root"
    gpu_then_cpu "$pack/base/inference" --bench "${criterion_args[@]}"
    end_to_end "$pack/base/gridwatch"
    ;;
  -h|--help)
    sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    ;;
  *)
    echo "gpu-bench.sh: unknown argument: $1 (see --help)" >&2
    exit 2
    ;;
esac
