#!/usr/bin/env python3
"""Rebuild an attention model's ONNX graph from its own weights, with the current exporter.

    .venv/bin/python scripts/reexport_model.py models/plant-attention-v1.json [...]

For a contract written by scripts/train_model.py: reads the weights back out of the ONNX file
it names, rebuilds the graph with train_model.build_onnx (the same code a training run
exports with, so a re-export and a new training run give the same graph), and runs the old
and the new file with ONNX Runtime on the golden vector's inputs and on random batches with
padded nodes. The new file replaces the old one only if every real node's reconstruction is
within 1e-6 of the old file's; then the contract's and the golden vector's `onnx_sha256` are
updated and the contract's `training.reexports` records the step (old and new sha256, the
largest difference, the date). Nothing else in the contract changes: same weights,
calibration and version. gridwatch's saved detector state is tied to the file's sha256, so a
detector restarted on the new file starts from the contract's calibration again.

Needs onnx and onnxruntime (`scripts/setup-python.sh --train`); no JAX.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_model as tm  # noqa: E402

MAX_DIFF = 1e-6


def params_from_onnx(model) -> dict:
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def dense(name):
        return {"w": w[name + ".weight"], "b": w[name + ".bias"]}

    def ln(name):
        return {"g": w[name + ".gamma"], "b": w[name + ".beta"]}

    def mha(name):
        return {k: dense(f"{name}.{k}") for k in ("q", "k", "v", "o")}

    blocks = []
    for i in range(tm.BLOCKS):
        pre = f"block{i}"
        blocks.append(
            {
                "t_attn": mha(pre + ".temporal"),
                "t_ln": ln(pre + ".temporal_ln"),
                "s_attn": mha(pre + ".spatial"),
                "s_ln": ln(pre + ".spatial_ln"),
                "ff1": dense(pre + ".ffn1"),
                "ff2": dense(pre + ".ffn2"),
                "f_ln": ln(pre + ".ffn_ln"),
            }
        )
    return {"embed": dense("embed"), "pos": w["pos_embedding"][:, 0, :], "blocks": blocks, "out": dense("head")}


def feeds_to_compare(golden: dict, window: int, channels: int):
    yield {k: np.asarray(golden["inputs"][k], np.float32) for k in ("values", "mask", "node_mask")}
    rng = np.random.default_rng(0)
    for batch, nodes in ((1, 1), (5, 3), (16, 8), (3, 32)):
        node_mask = np.ones((batch, nodes), np.float32)
        node_mask[::2, (nodes + 1) // 2 :] = 0  # every other window has padded nodes
        mask = (rng.random((batch, window, nodes, channels)) > 0.1).astype(np.float32)
        mask *= node_mask[:, None, :, None]
        values = rng.standard_normal((batch, window, nodes, channels)).astype(np.float32) * mask
        yield {"values": values, "mask": mask, "node_mask": node_mask}


def reexport(contract_path: str) -> None:
    import onnx
    import onnxruntime as ort

    contract = json.load(open(contract_path))
    base = os.path.dirname(os.path.abspath(contract_path))
    onnx_path = os.path.join(base, contract["onnx_file"])
    golden_path = os.path.splitext(onnx_path)[0] + ".golden.json"
    golden = json.load(open(golden_path))
    arch = contract["architecture"]
    if contract.get("family") != "spatio-temporal-attention":
        raise SystemExit(f"{contract_path}: family {contract.get('family')!r}: only attention models are re-exported")
    if (arch["d_model"], arch["heads"], arch["blocks"], arch["ffn"]) != (tm.D_MODEL, tm.HEADS, tm.BLOCKS, tm.FFN):
        raise SystemExit(f"{contract_path}: architecture {arch} differs from train_model.py's")
    channels = [(c["name"], c["unit"]) for c in contract["channels"]]
    tm.configure(channels, contract["window_steps"], contract["scored_steps"], arch.get("mode", "forecast"))

    old_bytes = open(onnx_path, "rb").read()
    old_sha = hashlib.sha256(old_bytes).hexdigest()
    if old_sha != contract["onnx_sha256"]:
        raise SystemExit(f"{onnx_path}: sha256 {old_sha} is not the contract's {contract['onnx_sha256']}")
    old = onnx.load_from_string(old_bytes)
    new = tm.build_onnx(params_from_onnx(old), old.producer_version, old.graph.name)
    new_bytes = new.SerializeToString()
    new_sha = hashlib.sha256(new_bytes).hexdigest()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    run_old = ort.InferenceSession(old_bytes, options, providers=providers)
    run_new = ort.InferenceSession(new_bytes, options, providers=providers)
    worst = 0.0
    for feeds in feeds_to_compare(golden, contract["window_steps"], len(channels)):
        a = run_old.run(None, feeds)[0]
        b = run_new.run(None, feeds)[0]
        real = np.broadcast_to(feeds["node_mask"][:, None, :, None] > 0, a.shape)
        if not np.isfinite(b).all():
            raise SystemExit(f"{contract_path}: the new graph gives non-finite outputs")
        worst = max(worst, float(np.abs(a - b)[real].max()))
    if worst > MAX_DIFF:
        raise SystemExit(f"{contract_path}: the new graph differs by {worst:.3g} (> {MAX_DIFF}); nothing written")
    if new_sha == old_sha:
        print(f"{onnx_path}: unchanged ({old_sha})")
        return

    with open(onnx_path, "wb") as f:
        f.write(new_bytes)
    contract["onnx_sha256"] = new_sha
    contract["training"].setdefault("reexports", []).append(
        {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": f".venv/bin/python scripts/reexport_model.py {os.path.relpath(contract_path)}",
            "from_sha256": old_sha,
            "max_abs_diff": worst,
            "nodes": len(new.graph.node),
        }
    )
    golden["onnx_sha256"] = new_sha
    with open(contract_path, "w") as f:
        json.dump(contract, f, indent=2)
        f.write("\n")
    with open(golden_path, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(
        f"{onnx_path}: {len(old.graph.node)} -> {len(new.graph.node)} nodes, largest difference {worst:.3g}, "
        f"sha256 {old_sha[:12]}… -> {new_sha[:12]}…"
    )


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(sys.argv) >= 2 else 2
    for path in sys.argv[1:]:
        reexport(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
