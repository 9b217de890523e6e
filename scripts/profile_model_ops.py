#!/usr/bin/env python3
"""Where ONNX Runtime spends a model's inference time, by operator type.

Runs one batch shape 30 times on the CPU execution provider (1 intra-op thread, as gridwatch
does) with ORT's profiler on, and prints each operator type's share of the kernel time.

    .venv/bin/python scripts/profile_model_ops.py [model.onnx] [batch] [nodes]

Defaults: models/plant-attention-v1.onnx, 64 windows of 8 nodes. Figures in
docs/performance.md.
"""

import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
RUNS = 30


def main():
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models/plant-attention-v1.onnx"
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    nodes = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    contract = json.loads(model.with_suffix(".json").read_text())
    steps, channels = contract["window_steps"], len(contract["channels"])

    values = np.random.default_rng(1).standard_normal((batch, steps, nodes, channels))
    values = values.astype(np.float32)
    feeds = {
        "values": values,
        "mask": np.ones_like(values),
        "node_mask": np.ones((batch, nodes), np.float32),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "profile")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(RUNS):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())

    time_by_op, nodes_by_op = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name")
            time_by_op[op] += e["dur"]
            nodes_by_op[op] += 1
    total = sum(time_by_op.values())
    print(f"{model.name}: {batch} windows of {nodes} nodes, {RUNS} runs")
    for op, micros in time_by_op.most_common():
        print(f"{op:25} {100 * micros / total:5.1f} %  {nodes_by_op[op] // RUNS} nodes")


if __name__ == "__main__":
    main()
