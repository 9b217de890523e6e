#!/usr/bin/env bash
# Regenerates models/metr-attention-v1.{onnx,json,golden.json}, the traffic model evaluated on the
# METR-LA week (docs/accuracy.md):
#   1. the training environment (JAX CPU, optax, onnx, h3) into .venv,
#   2. the first five days of METR-LA speeds as the trainer's long CSV, sensors placed in H3
#      resolution-7 cells (scripts/metr_la_to_long.py; the last two days are the test part and are
#      not read),
#   3. training, ONNX export, ORT-vs-JAX verification and calibration (scripts/train_model.py),
#   4. the ONNX Runtime check of the written model against its contract and golden vector.
# Not part of the test command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
metr="${METR_LA_DATA:-$root/../shared/data/metr-la-week}"
scripts/setup-python.sh --train >/dev/null
data="${TMPDIR:-/tmp}/metr-train.csv"
.venv/bin/python scripts/metr_la_to_long.py --data-dir "$metr" --days 5 --h3-resolution 7 --out "$data"
.venv/bin/python scripts/train_model.py --data "$data" --out-prefix models/metr-attention-v1 \
    --name metr-attention --version 1 --units mph --window 24 --scored 4 --mode forecast \
    --seed 0 --epochs 6 --max-train-seconds 480 \
    --data-description "METR-LA (los_speed.csv) days 1-5 (rows 0..1440), 207 loop detectors at 5-minute cadence, in 46 H3 resolution-7 cells (scripts/metr_la_to_long.py)"
.venv/bin/python scripts/check_model.py models/metr-attention-v1.json
