#!/usr/bin/env bash
# METR-LA week: seeded faults injected into the last two days (gridwatch inject, defaults of
# docs/eval.md), sensors placed in H3 resolution-7 cells, the first five days (what the model
# trained on) before the test part. Row 0 is taken to be 2012-03-05T00:00:00Z (the files carry no
# timestamps). MODEL=path picks another model contract, SEED=n the faults; extra arguments go
# to `gridwatch eval` (e.g. `--threshold fit`, `--json F`). Needs the release build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
data="${METR_LA_DATA:-$root/../shared/data/metr-la-week}"
work="${TMPDIR:-/tmp}/gridwatch-metr-la"
mkdir -p "$work"
bin="$root/target/release/gridwatch"
"$bin" inject --readings "$data/los_speed.csv" --adjacency "$data/los_adj.csv" \
    --seed "${SEED:-1}" --out "$work/faulted.csv" --labels "$work/labels.csv" \
    --faults-json "$work/faults.json"
exec "$bin" eval --model "${MODEL:-$root/models/metr-attention-v1.json}" \
    --nodes "$data/graph_sensor_locations.csv" --h3-resolution 7 \
    --start 2012-03-05T00:00:00Z --fit-rows 1440 --labels "$work/labels.csv" \
    "$@" "$work/faulted.csv"
