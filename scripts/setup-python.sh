#!/usr/bin/env bash
# Create the project's Python virtual environment at <repo>/.venv.
#
#   scripts/setup-python.sh           runtime only: onnxruntime + numpy
#                                     (the ONNX Runtime shared library that the
#                                     Rust binary loads lives inside this wheel)
#   scripts/setup-python.sh --train   also the training/export stack from
#                                     scripts/requirements-train.txt (JAX CPU,
#                                     optax, onnx)
#
# Idempotent: re-running only installs what is missing. Prints the path of
# libonnxruntime.so as the last line of output (suitable for ORT_DYLIB_PATH).
set -euo pipefail

ORT_VERSION="1.31.1"
NUMPY_VERSION="2.4.6"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$root/.venv"

train=0
for arg in "$@"; do
  case "$arg" in
    --train) train=1 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup-python.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

py="${PYTHON:-python3}"
if ! command -v "$py" >/dev/null 2>&1; then
  echo "setup-python.sh: $py not found" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 ships venv/ensurepip separately.
    rm -rf "$venv"
    if command -v apt-get >/dev/null 2>&1; then
      echo "setup-python.sh: venv module missing; installing python3-venv" >&2
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      "$py" -m venv "$venv"
    else
      echo "setup-python.sh: '$py -m venv' failed and apt-get is unavailable" >&2
      exit 1
    fi
  fi
fi

vpy="$venv/bin/python"
pipq=("$vpy" -m pip install --disable-pip-version-check --quiet)

# Runtime: onnxruntime (pinned: the Rust ort crate binds this API version) + numpy.
if ! "$vpy" - "$ORT_VERSION" <<'EOF' >/dev/null 2>&1
import sys, importlib.metadata as md
assert md.version("onnxruntime") == sys.argv[1]
md.version("numpy")
EOF
then
  "${pipq[@]}" "onnxruntime==$ORT_VERSION" "numpy==$NUMPY_VERSION"
fi

if [ "$train" = 1 ]; then
  req="$here/requirements-train.txt"
  # pip is a no-op when every pinned requirement is already satisfied.
  "${pipq[@]}" -r "$req"
fi

lib="$("$vpy" - <<'EOF'
import glob, os, onnxruntime
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
libs = sorted(glob.glob(os.path.join(capi, "libonnxruntime.so*")), key=len)
print(libs[0] if libs else "")
EOF
)"
if [ -z "$lib" ]; then
  echo "setup-python.sh: libonnxruntime.so not found in the onnxruntime wheel" >&2
  exit 1
fi
echo "$lib"
