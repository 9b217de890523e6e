#!/usr/bin/env bash
# Regenerates models/plant-attention-v1.{onnx,json,golden.json}, the demo plant's model:
#   1. the training environment (JAX CPU, optax, onnx) into .venv,
#   2. two hours of normal operation of a 12-line simulated plant (seed 1; the demo runs seed 7,
#      so the demo's machines are not the training machines), as CSV, from `gridwatch simulate`,
#   3. training, ONNX export, ORT-vs-JAX verification and calibration (scripts/train_model.py).
# Takes about 6 minutes on 2 cores. Not part of the test command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/setup-python.sh --train >/dev/null
data="${TMPDIR:-/tmp}/gridwatch-train.csv"
cargo run --locked --quiet -- simulate --csv "$data" --steps 7200 --lines 12 --no-faults --seed 1
.venv/bin/python scripts/train_model.py --data "$data" --out-prefix models/plant-attention-v1 --seed 0 --epochs 6
