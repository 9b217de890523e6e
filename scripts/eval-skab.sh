#!/usr/bin/env bash
# SKAB, its published outlier-detection protocol: for each of the 34 labelled files only the first
# 400 rows calibrate (per-series statistics and thresholds), the rest is test; point-wise metrics
# pooled over all files, no point-adjust. MODEL=path picks another model contract; extra arguments
# go to `gridwatch eval` (e.g. `--threshold spot`, `--json /tmp/skab.json`).
# Needs the release build: scripts/setup.sh && cargo build --release --locked.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${SKAB_DATA:-$root/../shared/data/skab/data}"
exec "$root/target/release/gridwatch" eval --model "${MODEL:-$root/models/skab-attention-v1.json}" \
    --fit-rows 400 --label-column anomaly --ignore-columns changepoint \
    "$@" "$data/valve1" "$data/valve2" "$data/other"
