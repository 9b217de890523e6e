#!/usr/bin/env python3
"""Compare ways of turning a SKAB model's per-channel errors into one score.

Runs an exported SKAB model (default models/skab-attention-v1.json) over every labelled SKAB
file with ONNX Runtime, one window per row (not per 1-second step, as `gridwatch eval` does,
so figures differ from eval's in the second decimal), and keeps each window's per-channel
error: the mean over its scored steps of (reconstruction - value)^2 / error_scale[channel],
the contract's formula before its max over channels. Then, for each aggregation below, applies
SKAB's reference threshold rule per file (factor x the 0.999 quantile of the scores of windows
ending in the first 400 rows) and prints the pooled point-wise F1, FAR and MAR of the rows
after the first 400, without point-adjust.

This looks at the test part of every file: a choice made from its output is tuned on the test
set. docs/accuracy.md reports these figures as such.

Needs numpy and onnxruntime (scripts/setup.sh installs both into .venv):

    .venv/bin/python scripts/skab_score_variants.py [--model models/skab-attention-v1.json]
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
FIT_ROWS = 400


def window_errors(model_path, data_dir):
    """Per labelled file: (window end rows, per-channel errors [windows, channels], labels)."""
    contract = json.loads(model_path.read_text())
    channels = [c["name"] for c in contract["channels"]]
    scale = np.array(contract["calibration"]["error_scale"])
    steps = contract["window_steps"]
    scored = contract["scored_steps"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_path.parent / contract["onnx_file"]), options, providers=["CPUExecutionProvider"]
    )
    files = sorted(
        f for group in ("valve1", "valve2", "other") for f in (data_dir / group).glob("*.csv")
    )
    out = []
    for path in files:
        with path.open() as f:
            rows = list(csv.DictReader(f, delimiter=";"))
        x = np.array([[float(r[c]) for c in channels] for r in rows])
        labels = np.array([int(float(r["anomaly"])) for r in rows])
        # Per-series standardisation with the file's own first rows, as the contract says.
        mean, std = x[:FIT_ROWS].mean(0), np.maximum(x[:FIT_ROWS].std(0), 1e-3)
        z = ((x - mean) / std).astype(np.float32)
        ends = np.arange(steps - 1, len(z))
        windows = np.stack([z[t - steps + 1 : t + 1] for t in ends])[:, :, None, :]
        errors = []
        for b in range(0, len(windows), 512):
            v = windows[b : b + 512]
            feeds = {
                "values": v,
                "mask": np.ones_like(v),
                "node_mask": np.ones((len(v), 1), np.float32),
            }
            r = session.run(None, feeds)[0]
            errors.append(((r - v)[:, -scored:, 0, :] ** 2).mean(1) / scale)
        out.append((ends, np.concatenate(errors), labels))
    return channels, out


def pooled(files, aggregate, factor):
    tp = fp = fn = tn = 0
    for ends, errors, labels in files:
        scores = aggregate(errors, ends < FIT_ROWS)
        threshold = factor * np.quantile(scores[ends < FIT_ROWS], 0.999)
        test = ends >= FIT_ROWS
        flagged, truth = scores[test] >= threshold, labels[ends[test]] == 1
        tp += np.sum(flagged & truth)
        fp += np.sum(flagged & ~truth)
        fn += np.sum(~flagged & truth)
        tn += np.sum(~flagged & ~truth)
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return f1, 100 * fp / max(fp + tn, 1), 100 * fn / max(fn + tp, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/skab-attention-v1.json")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/skab/data")
    args = parser.parse_args()
    channels, files = window_errors(args.model, args.data)
    no_temps = [i for i, c in enumerate(channels) if c not in ("Temperature", "Thermocouple")]
    light = np.array([0.1 if c in ("Temperature", "Thermocouple") else 1.0 for c in channels])


    def per_channel(e, fit):
        # Each channel's error in units of its own 0.999 quantile over the fit rows.
        return e / np.maximum(np.quantile(e[fit], 0.999, axis=0), 1e-12)

    def smoothed(scores, k):
        # Mean of the last k windows' scores (a causal moving average).
        c = np.cumsum(np.concatenate([np.zeros(1), scores]))
        i = np.arange(1, len(scores) + 1)
        return (c[i] - c[np.maximum(i - k, 0)]) / np.minimum(i, k)

    def held(scores, k):
        # Max of the last k windows' scores: a window flags while any of the last k crossed
        # (an alarm held for k - 1 windows after its last crossing, like incidents' close_after).
        return np.array([scores[max(i - k + 1, 0) : i + 1].max() for i in range(len(scores))])

    variants = [
        ("max over channels (the contract)", lambda e, f: e.max(1), 4 / 3),
        ("mean over channels", lambda e, f: e.mean(1), 4 / 3),
        ("second-largest channel", lambda e, f: np.sort(e, 1)[:, -2], 4 / 3),
        ("max without the temperatures", lambda e, f: e[:, no_temps].max(1), 4 / 3),
        ("max without the temperatures, factor 1", lambda e, f: e[:, no_temps].max(1), 1.0),
        ("max without the temperatures, factor 2", lambda e, f: e[:, no_temps].max(1), 2.0),
        ("max, temperatures weighted 0.1", lambda e, f: (e * light).max(1), 4 / 3),
        ("per-channel quantile, max", lambda e, f: per_channel(e, f).max(1), 4 / 3),
        (
            "per-channel quantile, max without temperatures",
            lambda e, f: per_channel(e, f)[:, no_temps].max(1),
            4 / 3,
        ),
    ]
    for k in (5, 10, 20):
        variants.append(
            (
                f"max without temperatures, mean of last {k}",
                lambda e, f, k=k: smoothed(e[:, no_temps].max(1), k),
                4 / 3,
            )
        )
        variants.append(
            (
                f"max, mean of last {k}",
                lambda e, f, k=k: smoothed(e.max(1), k),
                4 / 3,
            )
        )
    for k in (6, 21):
        variants.append(
            (
                f"max without temperatures, held {k - 1} windows",
                lambda e, f, k=k: held(e[:, no_temps].max(1), k),
                4 / 3,
            )
        )
        variants.append(
            (
                f"max without temperatures, held {k - 1}, factor 2",
                lambda e, f, k=k: held(e[:, no_temps].max(1), k),
                2.0,
            )
        )
    print(f"{'score':45} {'F1':>6} {'FAR %':>7} {'MAR %':>7}")
    for name, aggregate, factor in variants:
        f1, far, mar = pooled(files, aggregate, factor)
        print(f"{name:45} {f1:6.3f} {far:7.2f} {mar:7.2f}")


if __name__ == "__main__":
    main()
