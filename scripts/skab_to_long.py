#!/usr/bin/env python3
"""Convert SKAB (Skoltech Anomaly Benchmark) into the long CSV that scripts/train_model.py reads.

SKAB's files are `;`-separated, one experiment each, at about 1 Hz:

    datetime;Accelerometer1RMS;Accelerometer2RMS;Current;Pressure;Temperature;Thermocouple;Voltage;Volume Flow RateRMS;anomaly;changepoint

(`anomaly-free/anomaly-free.csv` has no label columns). The output is

    ts_ms,node_id,cell_id,Accelerometer1RMS,...,Volume Flow RateRMS

with one cell per file (`valve1-0`, `valve2-3`, `other-14`, `anomaly-free`), node id `pump`,
ts_ms = the datetime read as UTC, the eight channel values copied verbatim, labels dropped.

The protocol (SKAB's outlier-detection task): of each of the 34 labelled files only the first
400 rows may be used for fitting and calibration, the rest is the test part; anomaly-free.csv
may be used for training. So by default the output holds anomaly-free.csv whole and the first
`--fit-rows` (400) rows of every labelled file, nothing of the test parts.

`--anomaly-free-chunk N` cuts anomaly-free.csv into cells of N rows (`anomaly-free-0`, ...; a
last piece shorter than --fit-rows joins the one before it), so that with per-series
standardisation (train_model.py --standardise-per-cell-rows 400) each chunk is standardised
from its own first 400 rows, like a labelled experiment, and training sees how far normal
operation drifts in the ~700 rows after the fit range.

    .venv/bin/python scripts/skab_to_long.py --out /tmp/skab-train.csv --anomaly-free-chunk 1150
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import glob
import os
import re
import sys

CHANNELS = [
    "Accelerometer1RMS",
    "Accelerometer2RMS",
    "Current",
    "Pressure",
    "Temperature",
    "Thermocouple",
    "Voltage",
    "Volume Flow RateRMS",
]
NODE = "pump"


def natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def read_skab(path: str):
    """Returns (header, rows) of one SKAB file; rows are lists of strings."""
    with open(path, newline="") as f:
        reader = csv.reader(f, delimiter=";")
        header = [h.strip() for h in next(reader)]
        rows = [r for r in reader if r]
    if header[0] != "datetime" or header[1 : 1 + len(CHANNELS)] != CHANNELS:
        raise SystemExit(f"{path}: unexpected header {header}")
    return header, rows


def ts_ms(s: str) -> int:
    t = dt.datetime.fromisoformat(s.strip())
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(round(t.timestamp() * 1000))


def labelled_files(data_dir: str) -> list[tuple[str, str]]:
    """[(cell id, path)] of the 34 labelled files, in natural order (valve1, valve2, other)."""
    out = []
    for group in ("valve1", "valve2", "other"):
        for path in sorted(glob.glob(os.path.join(data_dir, group, "*.csv")), key=natural):
            out.append((f"{group}-{os.path.splitext(os.path.basename(path))[0]}", path))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "skab", "data")
    ap.add_argument("--data-dir", default=os.path.normpath(default_dir),
                    help="SKAB's data/ folder (default: ../shared/data/skab/data beside the repository)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fit-rows", type=int, default=400,
                    help="rows of each labelled file to include (the protocol's fit range)")
    ap.add_argument("--all-rows", action="store_true",
                    help="include the labelled files whole (test parts too): NOT for training")
    ap.add_argument("--anomaly-free-chunk", type=int, default=0, metavar="N",
                    help="cut anomaly-free.csv into cells of N rows (0: one cell, whole)")
    ap.add_argument("--no-anomaly-free", action="store_true", help="leave anomaly-free.csv out")
    args = ap.parse_args()

    cells: list[tuple[str, list[list[str]]]] = []
    if not args.no_anomaly_free:
        _, rows = read_skab(os.path.join(args.data_dir, "anomaly-free", "anomaly-free.csv"))
        n = args.anomaly_free_chunk
        if n <= 0:
            cells.append(("anomaly-free", rows))
        else:
            starts = list(range(0, len(rows), n))
            if len(starts) > 1 and len(rows) - starts[-1] < args.fit_rows:
                starts.pop()  # a short tail joins the chunk before it
            for k, s in enumerate(starts):
                e = starts[k + 1] if k + 1 < len(starts) else len(rows)
                cells.append((f"anomaly-free-{k}", rows[s:e]))
    files = labelled_files(args.data_dir)
    if len(files) != 34:
        print(f"warning: {len(files)} labelled files under {args.data_dir}, SKAB has 34", file=sys.stderr)
    for cell, path in files:
        _, rows = read_skab(path)
        cells.append((cell, rows if args.all_rows else rows[: args.fit_rows]))

    n_rows = 0
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ts_ms", "node_id", "cell_id", *CHANNELS])
        for cell, rows in cells:
            for r in rows:
                w.writerow([ts_ms(r[0]), NODE, cell, *[x.strip() for x in r[1 : 1 + len(CHANNELS)]]])
                n_rows += 1
    print(f"wrote {args.out}: {n_rows} rows, {len(cells)} cells "
          f"({'whole labelled files' if args.all_rows else f'first {args.fit_rows} rows of each labelled file'}"
          f"{'' if args.no_anomaly_free else ', anomaly-free.csv'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
