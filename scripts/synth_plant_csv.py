#!/usr/bin/env python3
"""Write a synthetic plant CSV in the training format, for developing and testing
scripts/train_model.py without the Rust simulator.

Format (same as `/tmp/gridwatch-train.csv` from the simulator):

    ts_ms,node_id,cell_id,vibration_rms,temperature,pressure,current

one row per node per step, sorted by ts then node. The dynamics follow
src/simulate/plant.rs loosely (shared sinusoidal load + AR(1) disturbance per
cell, per-machine operating points, first-order thermal lag, Gaussian noise) but
with configurable cell sizes and a small fraction of blank (missing) readings.
It is *not* bit-compatible with the Rust simulator. Only numpy is needed.

    python scripts/synth_plant_csv.py --out /tmp/synth.csv --hours 4 --cells 4,5,6
"""

import argparse
import math

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hours", type=float, default=4.0)
    ap.add_argument("--cells", default="4,5,6", help="nodes per cell, comma separated")
    ap.add_argument("--cadence-ms", type=int, default=1000)
    ap.add_argument("--start-ms", type=int, default=1_767_225_600_000)
    ap.add_argument("--missing", type=float, default=0.002, help="fraction of blank readings")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    sizes = [int(s) for s in args.cells.split(",")]
    steps = int(args.hours * 3600 * 1000 / args.cadence_ms)
    dt = args.cadence_ms / 1000.0
    t = np.arange(steps) * dt

    cells = []
    for ci, n in enumerate(sizes):
        phase = rng.uniform(0, 2 * math.pi)
        innov = rng.standard_normal(steps) * 0.02
        dist = np.zeros(steps)
        acc = 0.0
        for i in range(steps):
            acc = 0.97 * acc + innov[i]
            dist[i] = acc
        load = 0.7 + 0.2 * np.sin(2 * math.pi * t / 300.0 + phase) + dist
        alpha = min(dt / 60.0, 1.0)
        thermal = np.zeros(steps)
        acc = 0.0
        for i in range(steps):
            acc += alpha * (load[i] - acc)
            thermal[i] = acc
        vals = np.empty((steps, n, 4))
        for m in range(n):
            v0 = 1.8 + 0.6 * rng.random()
            T0 = 55.0 + 10.0 * rng.random()
            p0 = 4.0 + 1.0 * rng.random()
            c0 = 20.0 + 8.0 * rng.random()
            vals[:, m, 0] = v0 + 1.2 * load + 0.15 * rng.standard_normal(steps)
            vals[:, m, 1] = T0 + 10.0 * thermal + 0.2 * rng.standard_normal(steps)
            vals[:, m, 2] = p0 + 1.5 * load + 0.05 * rng.standard_normal(steps)
            vals[:, m, 3] = c0 + 8.0 * load + 0.3 * rng.standard_normal(steps)
        vals[rng.random(vals.shape) < args.missing] = np.nan
        cells.append((f"line-{ci + 1}", [f"line-{ci + 1}/m{m + 1:02d}" for m in range(n)], vals))

    with open(args.out, "w") as f:
        f.write("ts_ms,node_id,cell_id,vibration_rms,temperature,pressure,current\n")
        for i in range(steps):
            ts = args.start_ms + i * args.cadence_ms
            for cell, nodes, vals in cells:
                for m, node in enumerate(nodes):
                    row = ["" if math.isnan(x) else f"{x:.4f}" for x in vals[i, m]]
                    f.write(f"{ts},{node},{cell},{','.join(row)}\n")


if __name__ == "__main__":
    main()
