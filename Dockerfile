# gridwatch container image (CPU inference).
#
#   docker build -t gridwatch:local .
#   docker run --rm gridwatch:local --help
#   docker run --rm gridwatch:local run --print-config
#
# compose/compose.yaml builds this file for its `simulator` and `gridwatch` services. Needs
# BuildKit (the default builder of Docker Engine 23+ and of Docker Compose v2) for the cache
# mounts below. A CUDA variant is compose/Dockerfile.cuda; see the note at the end of this file.
#
# The build stage runs scripts/setup.sh, the same set-up script a developer runs on a fresh
# Debian/Ubuntu machine: it apt-installs the C toolchain librdkafka is built with (gcc, g++,
# make, pkg-config, libssl-dev, zlib1g-dev, perl) where missing and creates .venv with the PyPI
# `onnxruntime` wheel, whose libonnxruntime.so the binary loads at run time (ort `load-dynamic`).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ── build ────────────────────────────────────────────────────────────────────────────────────
FROM ${RUST_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# scripts/setup-python.sh creates .venv with `python3 -m venv`, so python3 and its venv module
# must be there first (setup.sh itself installs only the C build dependencies).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# The set-up layer depends only on the two set-up scripts, so other edits do not re-run it.
COPY scripts/setup.sh scripts/setup-python.sh scripts/
RUN scripts/setup.sh

# Collect the ONNX Runtime shared library from the wheel (setup-python.sh prints its path as
# its last line; re-running it is a no-op). libonnxruntime.so is a version-free name for it.
RUN lib="$(scripts/setup-python.sh | tail -n 1)" \
 && test -f "$lib" \
 && mkdir -p /opt/onnxruntime/lib \
 && cp -L "$(dirname "$lib")"/libonnxruntime*.so* /opt/onnxruntime/lib/ \
 && ln -sf "$(basename "$lib")" /opt/onnxruntime/lib/libonnxruntime.so \
 && ls -l /opt/onnxruntime/lib

# .dockerignore keeps target/, .venv/ and .git/ out, so this does not replace the .venv above.
COPY . .
RUN --mount=type=cache,id=gridwatch-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=gridwatch-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=gridwatch-target,target=/src/target \
    cargo build --release --locked \
 && install -m 0755 target/release/gridwatch /usr/local/bin/gridwatch

# ── runtime ──────────────────────────────────────────────────────────────────────────────────
FROM ${RUNTIME_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# libssl3 + zlib1g: librdkafka (built with ssl, linked dynamically); libstdc++6: ONNX Runtime.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates libssl3 zlib1g libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gridwatch \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin gridwatch

COPY --from=build /opt/onnxruntime/ /opt/onnxruntime/
COPY --from=build /usr/local/bin/gridwatch /usr/local/bin/gridwatch

# The default model contract path is relative: models/plant-attention-v1.json under WORKDIR.
WORKDIR /app
COPY models/ models/
COPY schemas/ schemas/

ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so
# Numeric, so that runtimes that check runAsNonRoot can verify it: the gridwatch user above.
USER 10001:10001
# Admin HTTP server ([admin] listen = "0.0.0.0:9464"): /metrics, /healthz, /readyz.
EXPOSE 9464
ENTRYPOINT ["gridwatch"]
CMD ["--help"]

# ── CUDA variant ─────────────────────────────────────────────────────────────────────────────
# compose/Dockerfile.cuda (build it from the repository root:
#   docker build -f compose/Dockerfile.cuda -t gridwatch:cuda .) differs from this file in:
#   - the build runs `cargo build --release --locked --features cuda` (registers ORT's CUDA
#     execution provider; still no link-time dependency on ONNX Runtime or CUDA);
#   - ONNX Runtime comes from the PyPI `onnxruntime-gpu` wheel of the same version (1.31.1;
#     1.27 and later are built against CUDA 13 and cuDNN 9) instead of `onnxruntime`:
#     libonnxruntime.so.*, libonnxruntime_providers_shared.so, libonnxruntime_providers_cuda.so;
#   - the runtime base is nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 (CUDA runtime, cuBLAS,
#     cuRAND, cuFFT and cuDNN 9 that the CUDA provider loads);
#   - GRIDWATCH__MODEL__EXECUTION_PROVIDER=cuda (falls back to CPU with a warning without a GPU).
# Run it with the NVIDIA Container Toolkit: `docker run --gpus all …`, or in Compose with
#   docker compose -f compose/compose.yaml -f compose/compose.cuda.yaml up --build
