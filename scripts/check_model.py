#!/usr/bin/env python3
"""Check an exported model against its contract and golden vector with ONNX Runtime only
(needs just the runtime venv from `scripts/setup-python.sh`: onnxruntime + numpy, no JAX).

    .venv/bin/python scripts/check_model.py models/plant-attention-v1.json

Checks: the ONNX file's sha256 matches the contract; the graph's input/output names, dims
(symbolic "batch"/"nodes") and opset; the golden inputs' normalisation from raw_values with the
contract's channel mean/std; ONNX Runtime's reconstruction of the golden inputs on real nodes;
the scoring rule recomputed independently against the golden errors/scores; padded nodes'
outputs are finite. Exits non-zero on any failure.
"""

import hashlib
import json
import math
import os
import sys

import numpy as np
import onnxruntime as ort


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "models/plant-attention-v1.json"
    contract = json.load(open(path))
    base = os.path.dirname(os.path.abspath(path))
    onnx_path = os.path.join(base, contract["onnx_file"])
    golden_path = os.path.splitext(onnx_path)[0] + ".golden.json"
    golden = json.load(open(golden_path))
    results = []

    def check(name, ok, detail=""):
        results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")

    data = open(onnx_path, "rb").read()
    sha = hashlib.sha256(data).hexdigest()
    check("onnx sha256 matches contract", sha == contract["onnx_sha256"], sha)
    check("golden names the same onnx", golden["onnx_sha256"] == sha)
    check("onnx file under 1 MB", len(data) < 1 << 20, f"{len(data)} bytes")

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = [(i.name, list(i.shape)) for i in sess.get_inputs()]
    want = [(i["name"], i["shape"]) for i in contract["inputs"]]
    check("inputs", got == want, str(got))
    got = [(o.name, list(o.shape)) for o in sess.get_outputs()]
    want = [(o["name"], o["shape"]) for o in contract["outputs"]]
    check("outputs", got == want, str(got))

    tol = float(golden["tolerance"])
    v = np.asarray(golden["inputs"]["values"], np.float32)
    m = np.asarray(golden["inputs"]["mask"], np.float32)
    nm = np.asarray(golden["inputs"]["node_mask"], np.float32)
    raw = np.asarray([[[[math.nan if x is None else x for x in c] for c in n] for n in t] for t in golden["raw_values"]])
    mean = np.array([c["mean"] for c in contract["channels"]])
    std = np.array([c["std"] for c in contract["channels"]])
    obs = ~np.isnan(raw)
    check("mask = raw observed on real nodes", np.array_equal(obs & (nm[:, None, :, None] > 0), m > 0))
    norm = np.where(m > 0, (np.nan_to_num(raw) - mean) / std, 0.0)
    check("values = (raw - mean) / std", float(np.max(np.abs(norm - v))) < 1e-5)

    r = sess.run(["reconstruction"], {"values": v, "mask": m, "node_mask": nm})[0]
    want_r = np.asarray(golden["outputs"]["reconstruction"], np.float32)
    real = nm[:, None, :, None] > 0
    d = float(np.max(np.abs(np.where(real, r - want_r, 0.0))))
    check("reconstruction on real nodes", d < tol, f"max abs diff {d:.3g}")
    check("padded nodes' outputs finite", bool(np.all(np.isfinite(r))))

    # scoring rule, written independently of train_model.window_errors
    S = contract["scored_steps"]
    T = contract["window_steps"]
    scale = contract["calibration"]["error_scale"]
    B, _, N, F = v.shape
    for b in range(B):
        best = None
        for n in range(N):
            for c in range(F):
                acc, cnt = 0.0, 0
                if nm[b, n] > 0:
                    for t in range(T - S, T):
                        if m[b, t, n, c] > 0:
                            acc += (float(r[b, t, n, c]) - float(v[b, t, n, c])) ** 2
                            cnt += 1
                e = acc / cnt / scale[c] if cnt else None
                w = golden["expected"]["errors"][b][n][c]
                ok = (e is None and w is None) or (e is not None and w is not None and abs(e - w) <= tol * max(1.0, abs(w)))
                if not ok:
                    check(f"error[{b}][{n}][{c}]", False, f"{e} vs {w}")
                if e is not None:
                    best = e if best is None else max(best, e)
        w = golden["expected"]["score"][b]
        check(f"score[{b}]", abs(best - w) <= tol * max(1.0, abs(w)), f"{best:.4f} (threshold {contract['calibration']['threshold']:.4f})")
        check(f"anomalous[{b}]", (best > contract["calibration"]["threshold"]) == golden["expected"]["anomalous"][b])

    passed = sum(results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
