#!/usr/bin/env bash
# Installs what gridwatch needs to build and run on a fresh Debian/Ubuntu machine:
#   - the C toolchain and headers librdkafka is built with (gcc, make, pkg-config, OpenSSL, zlib),
#   - the ONNX Runtime shared library, from the PyPI `onnxruntime` wheel, into .venv
#     (see scripts/setup-python.sh; nothing is downloaded from anywhere but the package registries).
# Idempotent: it installs only what is missing. Rust (cargo) must already be installed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need=()
for pkg in gcc g++ make pkg-config libssl-dev zlib1g-dev perl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup.sh: missing ${need[*]} and no apt-get; install them with your package manager" >&2
    exit 1
  fi
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup.sh: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Python 3 with venv, for the ONNX Runtime wheel (skipped when a working python3 is present).
if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup.sh: installing python3 and python3-venv" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3 python3-venv >/dev/null
  else
    echo "setup.sh: python3 with the venv module is required" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup.sh: cargo not found; install Rust 1.88 or newer (https://rustup.rs)" >&2
  exit 1
fi

lib="$("$root/scripts/setup-python.sh" | tail -n 1)"
echo "setup.sh: ONNX Runtime library at $lib" >&2
