#!/usr/bin/env bash
# Regenerates models/skab-attention-v1.{onnx,json,golden.json}, the model for SKAB (Skoltech
# Anomaly Benchmark, a water-pump testbed: one node, 8 channels, ~1 Hz):
#   1. the training environment (JAX CPU, optax, onnx) into .venv,
#   2. the training CSV from SKAB (scripts/skab_to_long.py): anomaly-free.csv cut into cells of
#      1150 rows + the first 400 rows of each of the 34 labelled files (SKAB's protocol: the rest
#      of each labelled file is the test part and is not read),
#   3. training, ONNX export, ORT-vs-JAX verification and calibration (scripts/train_model.py),
#      every series standardised with its own first 400 rows (contract: "per-series-fit"),
#   4. the ONNX Runtime check of the written model against its contract and golden vector.
# Takes about 2-3 minutes on 2 cores. Not part of the test command. Detection quality on SKAB's
# test parts: scripts/eval-skab.sh (gridwatch eval; docs/accuracy.md)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
skab="${SKAB_DIR:-$root/../shared/data/skab/data}"
scripts/setup-python.sh --train >/dev/null
data="${TMPDIR:-/tmp}/skab-train.csv"
.venv/bin/python scripts/skab_to_long.py --data-dir "$skab" --out "$data" --fit-rows 400 --anomaly-free-chunk 1150
.venv/bin/python scripts/train_model.py --data "$data" --out-prefix models/skab-attention-v1 \
    --name skab-attention --version 1 --units g,g,A,bar,degC,degC,V,l/min \
    --window 32 --scored 32 --mode masked-channels --standardise-per-cell-rows 400 \
    --seed 0 --epochs 10 --max-train-seconds 420
.venv/bin/python scripts/check_model.py models/skab-attention-v1.json
