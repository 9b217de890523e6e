#!/usr/bin/env python3
"""Convert the METR-LA week into gridwatch's training CSV (long format):

    ts_ms,node_id,cell_id,speed

one row per sensor per 5-minute step, sorted by time and then by sensor in the column order of
los_speed.csv. By default it writes the first 5 days (rows 0..1440), the training part; the last
2 days (rows 1440..2016) are the test part, into which src/eval/inject.rs writes labelled faults.

Timestamps: the METR-LA files carry no timestamps. By convention row 0 is
2012-03-05T00:00:00Z (a Monday, 1330905600000 ms) and each row adds 300,000 ms; the Rust side
uses the same constants (METR_LA_START_MS, METR_LA_STEP_MS in src/eval/inject.rs). The real
collection dates of this slice are unknown, so weekday effects are only approximately placed.

node_id is the sensor id as in the header of los_speed.csv. cell_id is the H3 cell of the
sensor's coordinates (graph_sensor_locations.csv) at --h3-resolution, from the `h3` PyPI package
(v4 API, h3.latlng_to_cell), as the lowercase hex string that the Rust h3o crate's CellIndex
Display prints. Speeds are copied as they are written in los_speed.csv (mph, no blanks).

--stats prints, for resolutions 5..8, the number of cells, the sensors per cell and how many of
the injector's incident (primary, neighbour) pairs share a cell (the 4 strongest road-graph
neighbours with los_adj.csv weight > 0.3), to choose a resolution at which a cell holds a handful
of neighbouring sensors; it writes no CSV. The default, 7 (edge ~1.4 km), gives 46 cells with a
median of 4 sensors (max 12, 11 cells of one sensor) and keeps 52 % of the incident pairs in one
cell; 6 gives 15 cells of 1-31 sensors (median 10, 76 % of the pairs together, at the edge of the
current model contract's 32 nodes); 8 leaves 15 % of the sensors alone in their cell.

Needs numpy and h3 (pip install h3==4.5.0).

    .venv/bin/python scripts/metr_la_to_long.py --out /tmp/metr-la-train.csv --h3-resolution 7
    .venv/bin/python scripts/metr_la_to_long.py --stats
"""

import argparse
import sys
from pathlib import Path

import numpy as np

START_MS = 1_330_905_600_000  # 2012-03-05T00:00:00Z, a Monday (a convention, see above)
STEP_MS = 300_000  # 5 minutes
ROWS_PER_DAY = 288
STATS_RESOLUTIONS = (5, 6, 7, 8)
STRONG_WEIGHT = 0.3  # incident.min_weight in src/eval/inject.rs
MAX_NEIGHBOURS = 4  # incident.max_neighbours in src/eval/inject.rs


def default_data_dir() -> Path:
    repo = Path(__file__).resolve().parent.parent
    for cand in (repo.parent / "shared/data/metr-la-week", repo / "shared/data/metr-la-week"):
        if cand.is_dir():
            return cand
    return repo.parent / "shared/data/metr-la-week"


def import_h3():
    try:
        import h3
    except ImportError:
        sys.exit("metr_la_to_long.py: the h3 package is missing: pip install h3==4.5.0")
    if not hasattr(h3, "latlng_to_cell"):
        sys.exit(f"metr_la_to_long.py: h3 {h3.__version__} lacks the v4 API: pip install h3==4.5.0")
    return h3


def read_speeds(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header ids and the rows as text fields (so speeds are copied exactly), checked numeric."""
    with path.open() as f:
        ids = f.readline().strip().split(",")
        rows = [line.strip().split(",") for line in f if line.strip()]
    if len(set(ids)) != len(ids):
        sys.exit(f"{path}: duplicate sensor ids in the header")
    for i, row in enumerate(rows):
        if len(row) != len(ids):
            sys.exit(f"{path}: row {i} has {len(row)} fields, the header {len(ids)}")
    values = np.array(rows, dtype=np.float64)  # raises on a non-numeric field
    if not np.isfinite(values).all():
        sys.exit(f"{path}: non-finite speeds")
    return ids, rows


def read_locations(path: Path, ids: list[str]) -> np.ndarray:
    """(lat, lng) per id, in the order of `ids`."""
    loc = {}
    with path.open() as f:
        header = f.readline().strip().split(",")
        col = {name: k for k, name in enumerate(header)}
        for line in f:
            if not line.strip():
                continue
            fields = line.strip().split(",")
            loc[fields[col["sensor_id"]]] = (float(fields[col["latitude"]]), float(fields[col["longitude"]]))
    missing = [i for i in ids if i not in loc]
    if missing:
        sys.exit(f"{path}: no location for sensors {missing[:5]}")
    return np.array([loc[i] for i in ids])


def cells_at(h3, latlng: np.ndarray, res: int) -> list[str]:
    return [h3.latlng_to_cell(float(lat), float(lng), res) for lat, lng in latlng]


def incident_pairs(adj: np.ndarray) -> np.ndarray:
    """(primary, neighbour) pairs as the injector picks them: per sensor the MAX_NEIGHBOURS
    strongest other sensors with weight > STRONG_WEIGHT (ties by column)."""
    pairs = []
    for i, row in enumerate(adj):
        order = sorted((j for j in range(len(row)) if j != i and row[j] > STRONG_WEIGHT), key=lambda j: (-row[j], j))
        pairs.extend((i, j) for j in order[:MAX_NEIGHBOURS])
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def print_stats(h3, latlng: np.ndarray, adj: np.ndarray | None) -> None:
    n = len(latlng)
    print(f"{n} sensors; h3 {h3.__version__}")
    pairs = incident_pairs(adj) if adj is not None else None
    if pairs is not None:
        print(
            f"{len(pairs)} incident (primary, neighbour) pairs: the {MAX_NEIGHBOURS} strongest road-graph"
            f" neighbours with weight > {STRONG_WEIGHT}"
        )
    print("res  edge km  cells  sensors/cell min  median  mean  max  single-sensor cells  sensors alone  incident pairs in one cell")
    for res in STATS_RESOLUTIONS:
        cells = np.array(cells_at(h3, latlng, res))
        _, counts = np.unique(cells, return_counts=True)
        single = int((counts == 1).sum())
        together = f"{(cells[pairs[:, 0]] == cells[pairs[:, 1]]).mean():.0%}" if pairs is not None else "-"
        print(
            f"{res:>3}  {h3.average_hexagon_edge_length(res, 'km'):>7.2f}  {len(counts):>5}  {counts.min():>16}"
            f"  {np.median(counts):>6.1f}  {counts.mean():>4.1f}  {counts.max():>3}  {single:>19}"
            f"  {single / n:>13.0%}  {together:>26}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(), help="folder with los_speed.csv")
    ap.add_argument("--out", default="-", help="output CSV, '-' for stdout (default)")
    ap.add_argument("--days", type=float, default=5, help="days to write (default 5: the training part)")
    ap.add_argument("--offset-days", type=float, default=0, help="days to skip first (5 with --days 2: the clean test part)")
    ap.add_argument("--h3-resolution", type=int, default=7, help="H3 resolution of cell_id (default 7)")
    ap.add_argument("--stats", action="store_true", help="print sensors-per-cell statistics for resolutions 5..8 and exit")
    args = ap.parse_args()

    h3 = import_h3()
    ids, rows = read_speeds(args.data_dir / "los_speed.csv")
    latlng = read_locations(args.data_dir / "graph_sensor_locations.csv", ids)
    if args.stats:
        adj_path = args.data_dir / "los_adj.csv"
        adj = np.loadtxt(adj_path, delimiter=",") if adj_path.exists() else None
        if adj is not None and adj.shape != (len(ids), len(ids)):
            sys.exit(f"{adj_path}: shape {adj.shape}, expected {len(ids)} x {len(ids)}")
        print_stats(h3, latlng, adj)
        return

    if not 0 <= args.h3_resolution <= 15:
        sys.exit("--h3-resolution must be 0..15")
    first = round(args.offset_days * ROWS_PER_DAY)
    last = first + round(args.days * ROWS_PER_DAY)
    if args.days <= 0 or first < 0 or last > len(rows):
        sys.exit(f"rows [{first}, {last}) do not fit the {len(rows)} rows of the data")
    cells = cells_at(h3, latlng, args.h3_resolution)

    out = sys.stdout if args.out == "-" else open(args.out, "w", newline="\n")
    try:
        out.write("ts_ms,node_id,cell_id,speed\n")
        for r in range(first, last):
            ts = START_MS + r * STEP_MS
            out.write("".join(f"{ts},{i},{c},{v}\n" for i, c, v in zip(ids, cells, rows[r])))
    finally:
        if out is not sys.stdout:
            out.close()
    if args.out != "-":
        print(
            f"Wrote {(last - first) * len(ids)} readings ({last - first} steps × {len(ids)} sensors, rows {first}..{last},"
            f" {len(set(cells))} cells at resolution {args.h3_resolution}) to {args.out}.",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
