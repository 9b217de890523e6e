#!/usr/bin/env bash
# Regenerates the recurrent baseline models (an LSTM autoencoder per node, scripts/train_lstm_ae.py)
# with the same ONNX interface and contract as the attention models, so that `gridwatch eval` and
# the streaming job run them unchanged:
#   models/skab-lstm-v1.{onnx,json,golden.json}: SKAB, the same training CSV as skab-attention-v1
#     (anomaly-free.csv in cells of 1150 rows + the first 400 rows of each of the 34 labelled
#     files), the same geometry and task as skab-attention-v1: window 32, scored 32, masked-channels
#     (8 passes in the graph, channel c hidden and reconstructed from the other seven), every series
#     standardised with its own first 400 rows (contract: "standardisation": "per-series-fit");
#   models/metr-lstm-v1.{onnx,json,golden.json}: METR-LA speeds (first 5 days, sensors in H3
#     resolution-7 cells), window 24, scored 4, forecast (the last 4 steps hidden from the encoder),
#     channel statistics from the training range (contract: "standardisation": "contract").
# Each model is checked with scripts/check_model.py after it is written. About 3 minutes on 2
# cores (training about 70 s each). Not part of the test command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
skab="${SKAB_DIR:-$root/../shared/data/skab/data}"
metr="${METR_LA_DATA:-$root/../shared/data/metr-la-week}"
tmp="${TMPDIR:-/tmp}"
scripts/setup-python.sh --train >/dev/null

.venv/bin/python scripts/skab_to_long.py --data-dir "$skab" --out "$tmp/skab-train.csv" \
    --fit-rows 400 --anomaly-free-chunk 1150
.venv/bin/python scripts/train_lstm_ae.py --data "$tmp/skab-train.csv" --out-prefix models/skab-lstm-v1 \
    --name skab-lstm --version 1 --units g,g,A,bar,degC,degC,V,l/min --window 32 --scored 32 \
    --mode masked-channels --standardise-per-cell-rows 400 --seed 0 --epochs 10 --max-train-seconds 420
.venv/bin/python scripts/check_model.py models/skab-lstm-v1.json

.venv/bin/python scripts/metr_la_to_long.py --data-dir "$metr" --days 5 --h3-resolution 7 \
    --out "$tmp/metr-train.csv"
.venv/bin/python scripts/train_lstm_ae.py --data "$tmp/metr-train.csv" --out-prefix models/metr-lstm-v1 \
    --name metr-lstm --version 1 --units mph --window 24 --scored 4 --seed 0 --epochs 8 \
    --max-train-seconds 420
.venv/bin/python scripts/check_model.py models/metr-lstm-v1.json
