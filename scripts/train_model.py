#!/usr/bin/env python3
"""Train gridwatch's spatio-temporal attention model and export it to ONNX.

What it does
------------
1. Reads a plant CSV (``ts_ms,node_id,cell_id,vibration_rms,temperature,pressure,current``,
   one row per node per step, normal operation only), splits it by time: the first
   ``--train-frac`` (80 %) of the steps train the model, the rest calibrates the detector.
2. Trains, self-supervised, a small attention model that sees a 16-step window of every
   node of a cell, with the last 4 steps hidden, and forecasts them (and reconstructs
   randomly hidden entries of the first 12 steps).
3. Builds the ONNX graph (opset 17) node by node with ``onnx.helper`` from the trained
   weights, runs it with ONNX Runtime and checks it against the JAX forward pass
   (max abs diff < 1e-4 on several batch sizes / node counts, padding invariance);
   nothing is written unless every check passes.
4. Calibrates the detector on the held-out time range (per-channel error scale,
   threshold = 1.25 x p99.9 of window scores) and writes
   ``<out-prefix>.onnx``, ``<out-prefix>.json`` (the model contract that the Rust
   detector reads) and ``<out-prefix>.golden.json`` (a small golden vector for the
   Rust test of inference + scoring).

Why JAX and not PyTorch
-----------------------
PyTorch from PyPI pulls ~3 GB of CUDA wheels (the CPU-only wheels live on a separate
index that is not reachable here); JAX's CPU wheels (jax + jaxlib 0.10.2) are an 89 MB
download (~380 MB installed), and the whole training environment, ONNX Runtime, onnx,
optax and scipy included, is a ~170 MB download (~730 MB installed). The model is a
~27k-parameter pure function of its weights, written directly in ``jax.numpy`` (no
flax module is needed), trained with optax. The ONNX export is built by hand from the
same weights, op for op, rather than traced, so the graph is small, uses plain opset-17
ops (Gemm on 2-D views for the linear layers, MatMul, Reshape with 0-dims, Transpose,
Softmax, LayerNormalization) and has the symbolic dims ``batch`` and ``nodes``.

Usage
-----
    scripts/setup-python.sh --train
    .venv/bin/python scripts/train_model.py --data /tmp/gridwatch-train.csv \\
        --out-prefix models/plant-attention-v1 --seed 0

The above (the defaults) is the plant model. The trainer is not tied to the plant:
* the channels are the CSV header's columns after ``ts_ms,node_id,cell_id`` (``--units``
  gives their units, default: the plant's known units, else ""); ``--window`` / ``--scored``
  set window_steps / scored_steps (16 / 4);
* every cell has its own time axis (own first timestamp and step count), so cells recorded
  at different times cost no empty steps; windows never cross cells; with unequal cells a
  training window's cell is drawn in proportion to the cell's training windows;
* ``--standardise-per-cell-rows K`` standardises every (cell, node, channel) series with the
  mean/std of its first K rows (std floored at ``--std-floor-frac`` x the channel's global
  std) before training and calibration; the contract then says ``"standardisation":
  "per-series-fit"`` (channel stats identity, details in ``training.standardisation``);
* ``--calibration-cells REGEX``: the matching cells calibrate, the others train (instead of
  the time split);
* ``--mode masked-channels`` (default ``forecast``): inside the graph, one pass per channel
  stacked on the batch axis, pass c hiding channel c on the last scored steps; channel c's
  output comes from pass c (Split/Mul/Sum). Same inputs, output and scoring rule.
* ``--mode masked-nodes``: inside the graph, one pass per node (a dynamic count: the graph's
  ``nodes`` dim) stacked on the batch axis, pass p hiding node p (all channels) on the last
  scored steps while the other nodes stay fully visible; node p's output comes from pass p
  (EyeLike one-hot, Mul, ReduceSum). Every node's scored steps are predicted from its own
  earlier steps and its neighbours' concurrent readings (a 1-node cell: a forecast).
scripts/train-skab-model.sh uses these for SKAB (scripts/skab_to_long.py makes its CSV).

The model contract
------------------
Inputs (float32): ``values`` [batch, 16, nodes, 4] per-channel normalised
((x - mean) / std), 0 where unobserved; ``mask`` [batch, 16, nodes, 4] 1 observed,
0 missing; ``node_mask`` [batch, nodes] 1 real node, 0 padding.
Output: ``reconstruction`` [batch, 16, nodes, 4], normalised.
Scoring: for each real node n and channel c, e[n,c] = mean over the last 4 steps t with
mask[t,n,c] = 1 of (reconstruction - values)^2 / error_scale[c] (entries with no observed
scored step are excluded); score = max over (n,c) of e[n,c].
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import math
import os
import re
import shlex
import sys
import time
import warnings

import numpy as np

# units of the demo plant's channels (used when --units is not given)
KNOWN_UNITS = {
    "vibration_rms": "mm/s",
    "temperature": "degC",
    "pressure": "bar",
    "current": "A",
}
# Set by configure() from the CSV header and the command line (defaults: the plant's four
# channels, a 16-step window with the last 4 steps scored, forecast mode).
CHANNELS = [(n, u) for n, u in KNOWN_UNITS.items()]
F = len(CHANNELS)
WINDOW = 16  # window_steps
SCORED = 4  # scored_steps: the last SCORED steps are the ones the detector scores
MODE = "forecast"  # or "masked-channels" or "masked-nodes"
MODES = ("forecast", "masked-channels", "masked-nodes")
D_MODEL = 32
HEADS = 4
D_HEAD = D_MODEL // HEADS
BLOCKS = 2
FFN = 64
LN_EPS = 1e-5
NEG = -1e9  # additive attention bias for padded nodes (finite: no NaN when all are padded)
OPSET = 17
IR_VERSION = 8  # the IR version that goes with opset 17 (onnx 1.12); any ORT >= 1.12 loads it
MAX_NODES = 32
CALIB_NODES_NOTE = "whole cell"
TOL = 1e-4


# ----------------------------------------------------------------------------------------
# data


def natural(s):  # "line-2" before "line-10"
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def read_header(path: str) -> list[str]:
    """The channel names of a training CSV: the header's columns after ts_ms,node_id,cell_id."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise SystemExit(f"{path}: empty file")
    header = [h.strip() for h in header]
    if header[:3] != ["ts_ms", "node_id", "cell_id"] or len(header) < 4:
        raise SystemExit(f"{path}: unexpected header {header}, want ts_ms,node_id,cell_id,<channels...>")
    names = header[3:]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise SystemExit(f"{path}: empty or repeated channel names in {names}")
    return names


def configure(channels: list[tuple[str, str]], window: int, scored: int, mode: str) -> None:
    """Sets the module-wide shape constants (used by the model, the export and the scoring)."""
    global CHANNELS, F, WINDOW, SCORED, MODE
    if not 1 <= scored <= window:
        raise SystemExit(f"--scored {scored} must be within 1..--window {window}")
    if mode not in MODES:
        raise SystemExit(f"--mode must be one of {MODES}")
    if mode == "forecast" and scored == window:
        raise SystemExit("forecast mode needs at least one unscored (visible) step: --scored < --window")
    CHANNELS = list(channels)
    F = len(CHANNELS)
    WINDOW = window
    SCORED = scored
    MODE = mode


def load_csv(path: str):
    """Returns (cadence_ms, cells, rows) where cells is a list of
    (cell_id, [node_id], raw float64 array [T_cell, n, F] with NaN where missing, t0_ms).
    Every cell has its own time axis: t0 = the cell's first timestamp, T_cell steps of
    cadence_ms up to its last one (cells recorded at different times cost no empty steps)."""
    names = [c for c, _ in CHANNELS]
    recs: list[tuple[int, str, str, list[float]]] = []
    cell_ts: dict[str, list[int]] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        want = ["ts_ms", "node_id", "cell_id", *names]
        if [h.strip() for h in header] != want:
            raise SystemExit(f"{path}: unexpected header {header}, want {want}")
        for row in reader:
            if not row:
                continue
            vals = []
            for x in row[3 : 3 + F]:
                x = x.strip()
                try:
                    v = float(x) if x else math.nan
                except ValueError:
                    v = math.nan
                vals.append(v if math.isfinite(v) else math.nan)
            vals += [math.nan] * (F - len(vals))  # short row: the rest is missing
            ts = int(row[0])
            recs.append((ts, row[1], row[2], vals))
            cell_ts.setdefault(row[2], []).append(ts)
    if not recs:
        raise SystemExit(f"{path}: no rows")
    uts = {cell: np.unique(np.asarray(t, dtype=np.int64)) for cell, t in cell_ts.items()}
    diffs = np.concatenate([np.diff(u) for u in uts.values()])
    cadence = int(np.median(diffs)) if len(diffs) else 1000
    cell_nodes: dict[str, list[str]] = {}
    for _, node, cell, _ in recs:
        nodes = cell_nodes.setdefault(cell, [])
        if node not in nodes:
            nodes.append(node)

    cells = []
    index = {}
    for cell in sorted(cell_nodes, key=natural):
        nodes = sorted(cell_nodes[cell], key=natural)
        t0 = int(uts[cell][0])
        steps = int(round((int(uts[cell][-1]) - t0) / cadence)) + 1
        arr = np.full((steps, len(nodes), F), np.nan)
        cells.append((cell, nodes, arr, t0))
        for j, node in enumerate(nodes):
            index[(cell, node)] = (arr, j, t0)
    for ts, node, cell, vals in recs:
        arr, j, t0 = index[(cell, node)]
        i = int(round((ts - t0) / cadence))
        arr[i, j] = vals
    return cadence, cells, len(recs)


def standardise_per_series(cells, k_rows: int, floor_frac: float):
    """Standardises every (cell, node, channel) series in place with the mean/std of that
    node's first k_rows rows (its first k_rows steps with any reading). std is floored at
    floor_frac x the channel's std over all data; a series with no reading of a channel in
    its fit rows uses the channel's global mean/std. Returns (stats, global_std) with
    stats[cell_id][node_id] = (mean[F], std[F])."""
    allv = np.concatenate([a.reshape(-1, F) for _, _, a, _ in cells])
    g_mean = np.nanmean(allv, axis=0)
    g_std = np.nanstd(allv, axis=0)
    g_std = np.where(g_std > 1e-12, g_std, 1.0)
    floor = floor_frac * g_std
    stats = {}
    for cell, nodes, a, _ in cells:
        stats[cell] = {}
        for j, node in enumerate(nodes):
            seen = np.flatnonzero(np.any(~np.isnan(a[:, j]), axis=1))[:k_rows]
            fit = a[seen, j]  # [<=k, F]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=RuntimeWarning)
                mu = np.nanmean(fit, axis=0) if len(fit) else np.full(F, np.nan)
                sd = np.nanstd(fit, axis=0) if len(fit) else np.full(F, np.nan)
            mu = np.where(np.isnan(mu), g_mean, mu)
            sd = np.where(np.isnan(sd), g_std, np.maximum(sd, floor))
            a[:, j] = (a[:, j] - mu) / sd
            stats[cell][node] = (mu, sd)
    return stats, g_std


# ----------------------------------------------------------------------------------------
# model (JAX)


def init_params(key):
    import jax
    import jax.numpy as jnp

    keys = iter(jax.random.split(key, 64))

    def dense(fan_in, fan_out):
        w = jax.random.normal(next(keys), (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
        return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}

    def ln():
        return {"g": jnp.ones((D_MODEL,), jnp.float32), "b": jnp.zeros((D_MODEL,), jnp.float32)}

    def mha():
        return {k: dense(D_MODEL, D_MODEL) for k in ("q", "k", "v", "o")}

    p = {
        "embed": dense(2 * F, D_MODEL),
        "pos": 0.02 * jax.random.normal(next(keys), (WINDOW, D_MODEL), jnp.float32),
        "blocks": [],
        "out": dense(D_MODEL, F),
    }
    for _ in range(BLOCKS):
        p["blocks"].append(
            {
                "t_attn": mha(),
                "t_ln": ln(),
                "s_attn": mha(),
                "s_ln": ln(),
                "ff1": dense(D_MODEL, FFN),
                "ff2": dense(FFN, D_MODEL),
                "f_ln": ln(),
            }
        )
    return p


def count_params(p) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(p)))


def forward(p, values, mask, node_mask):
    """values, mask: [B, T, N, F]; node_mask: [B, N] -> reconstruction [B, T, N, F].
    Hides the mode's inputs (forecast: the last SCORED steps; masked-channels: one pass per
    channel with that channel hidden on the last SCORED steps, each channel's output taken
    from its own pass; masked-nodes: one pass per node with that node hidden on the last
    SCORED steps, each node's output taken from its own pass) and runs body(). Mirrors the
    ONNX graph built in build_onnx() op for op."""
    import jax.numpy as jnp

    if MODE == "forecast":
        keep = jnp.asarray(time_keep())  # [T,1,1]
        m = mask * keep
        v = values * m
        return body(p, v, m, node_mask)
    if MODE == "masked-nodes":
        B, T, N, Fc = values.shape
        onehot = jnp.eye(N, dtype=jnp.float32)[:, None, :, None]  # [P=N,1,N,1]: pass p <-> node p
        scored = jnp.asarray((1.0 - time_keep())[None])  # [1,T,1,1]: 1 on the last SCORED steps
        keep = 1.0 - onehot * scored  # [P,T,N,1]: pass p hides node p on the scored steps
        m = mask[:, None] * keep  # [B,P,T,N,F]
        v = values[:, None] * m
        nm = node_mask[:, None, :] * jnp.ones((N, 1), jnp.float32)  # [B,P,N]
        y = body(p, v.reshape((B * N, T, N, Fc)), m.reshape((B * N, T, N, Fc)), nm.reshape((B * N, N)))
        y = y.reshape((B, N, T, N, Fc))  # [B,P,T,N,F]
        return jnp.sum(y * onehot, axis=1)  # node n's output from pass n
    keeps = pass_keep()  # [G,T,1,F]
    G = keeps.shape[0]
    m = jnp.concatenate([mask * jnp.asarray(keeps[g]) for g in range(G)], axis=0)
    v = jnp.concatenate([values] * G, axis=0) * m
    nm = jnp.concatenate([node_mask] * G, axis=0)
    y = body(p, v, m, nm)
    parts = jnp.split(y, G, axis=0)
    sel = pass_select()  # [G,1,1,F]
    out = parts[0] * jnp.asarray(sel[0])
    for g in range(1, G):
        out = out + parts[g] * jnp.asarray(sel[g])
    return out


def body(p, v, m, node_mask):
    """The network on already hidden inputs: v = values * m, m = the visible mask."""
    import jax
    import jax.numpy as jnp

    x = jnp.concatenate([v, m], axis=-1) @ p["embed"]["w"] + p["embed"]["b"]
    x = x + p["pos"][:, None, :]  # [B,T,N,D]
    bias = (node_mask - 1.0) * (-NEG)  # [B,N]: 0 real, -1e9 padded
    bias = bias[:, None, None, None, :]  # [B,1,1,1,N]

    def ln(x, q):
        mu = jnp.mean(x, axis=-1, keepdims=True)
        d = x - mu
        var = jnp.mean(d * d, axis=-1, keepdims=True)
        return d / jnp.sqrt(var + LN_EPS) * q["g"] + q["b"]

    def heads(x, q):
        y = x @ q["w"] + q["b"]
        return y.reshape(y.shape[:3] + (HEADS, D_HEAD))  # [B,T,N,H,dh]

    scale = np.float32(1.0 / math.sqrt(D_HEAD))

    def temporal(x, a):
        q = jnp.transpose(heads(x, a["q"]) * scale, (0, 2, 3, 1, 4))  # [B,N,H,T,dh]
        k = jnp.transpose(heads(x, a["k"]), (0, 2, 3, 4, 1))  # [B,N,H,dh,T]
        v = jnp.transpose(heads(x, a["v"]), (0, 2, 3, 1, 4))  # [B,N,H,T,dh]
        w = jax.nn.softmax(q @ k, axis=-1)
        o = jnp.transpose(w @ v, (0, 3, 1, 2, 4))  # [B,T,N,H,dh]
        o = o.reshape(o.shape[:3] + (D_MODEL,))
        return o @ a["o"]["w"] + a["o"]["b"]

    def spatial(x, a):
        q = jnp.transpose(heads(x, a["q"]) * scale, (0, 1, 3, 2, 4))  # [B,T,H,N,dh]
        k = jnp.transpose(heads(x, a["k"]), (0, 1, 3, 4, 2))  # [B,T,H,dh,N]
        v = jnp.transpose(heads(x, a["v"]), (0, 1, 3, 2, 4))  # [B,T,H,N,dh]
        w = jax.nn.softmax(q @ k + bias, axis=-1)
        o = jnp.transpose(w @ v, (0, 1, 3, 2, 4))  # [B,T,N,H,dh]
        o = o.reshape(o.shape[:3] + (D_MODEL,))
        return o @ a["o"]["w"] + a["o"]["b"]

    for blk in p["blocks"]:
        x = ln(x + temporal(x, blk["t_attn"]), blk["t_ln"])
        x = ln(x + spatial(x, blk["s_attn"]), blk["s_ln"])
        h = jax.nn.relu(x @ blk["ff1"]["w"] + blk["ff1"]["b"])
        x = ln(x + (h @ blk["ff2"]["w"] + blk["ff2"]["b"]), blk["f_ln"])
    return x @ p["out"]["w"] + p["out"]["b"]


def time_keep() -> np.ndarray:
    """Forecast mode: [T,1,1], 0 on the last SCORED steps (hidden from the model)."""
    k = np.ones((WINDOW, 1, 1), np.float32)
    k[WINDOW - SCORED :] = 0.0
    return k


def pass_keep() -> np.ndarray:
    """Masked-channels mode: [G=F,T,1,F]; pass g hides channel g on the last SCORED steps."""
    k = np.ones((F, WINDOW, 1, F), np.float32)
    for g in range(F):
        k[g, WINDOW - SCORED :, :, g] = 0.0
    return k


def pass_select() -> np.ndarray:
    """Masked-channels mode: [G=F,1,1,F]; channel c's reconstruction comes from pass c."""
    s = np.zeros((F, 1, 1, F), np.float32)
    for g in range(F):
        s[g, :, :, g] = 1.0
    return s


# ----------------------------------------------------------------------------------------
# ONNX export


def build_onnx(p, producer: str, graph_name: str = "plant_attention"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    inits = []
    counter = [0]

    def name(prefix):
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(arr, prefix="c", dtype=np.float32):
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=dtype), n))
        return n

    def op(op_type, inputs, prefix=None, **attrs):
        out = name(prefix or op_type.lower())
        nodes.append(helper.make_node(op_type, inputs, [out], name=out + "_op", **attrs))
        return out

    def param(arr, pname):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), pname))
        return pname

    rows_shapes = {}

    def linear(x, q, pname):
        """x @ w + b over the last axis, as one Gemm on the [rows, fan_in] view of x: ONNX
        Runtime adds the bias inside a 2-D Gemm, while on the trunk's 4-D tensors MatMul + Add
        is two passes (about 20 % of the CPU time; docs/performance.md). Same result as MatMul +
        Add, bit for bit, with ONNX Runtime 1.31.1 on CPU."""
        w = param(q["w"], pname + ".weight")
        b = param(q["b"], pname + ".bias")
        fan_in, fan_out = np.shape(q["w"])
        if fan_in not in rows_shapes:
            rows_shapes[fan_in] = const([-1, fan_in], f"rows{fan_in}_shape", np.int64)
        rows = op("Reshape", [x, rows_shapes[fan_in]], prefix=pname + ".rows")
        y = op("Gemm", [rows, w, b], prefix=pname + ".gemm")
        lead = op("Shape", [x], prefix=pname + ".lead", end=-1)
        shape = op("Concat", [lead, const([fan_out], pname + ".width", np.int64)], prefix=pname + ".shape", axis=0)
        return op("Reshape", [y, shape], prefix=pname)

    def layernorm(x, q, pname):
        g = param(q["g"], pname + ".gamma")
        b = param(q["b"], pname + ".beta")
        return op("LayerNormalization", [x, g, b], prefix=pname, axis=-1, epsilon=LN_EPS)

    split_shape = const([0, 0, 0, HEADS, D_HEAD], "split_heads_shape", np.int64)
    merge_shape = const([0, 0, 0, D_MODEL], "merge_heads_shape", np.int64)
    scale = const(np.float32(1.0 / math.sqrt(D_HEAD)), "attn_scale")

    def heads(x, q, pname):
        return op("Reshape", [linear(x, q, pname), split_shape])

    def attention(x, a, pname, perm_q, perm_k, perm_back, bias=None):
        q = op("Transpose", [op("Mul", [heads(x, a["q"], pname + ".q"), scale])], perm=perm_q)
        k = op("Transpose", [heads(x, a["k"], pname + ".k")], perm=perm_k)
        v = op("Transpose", [heads(x, a["v"], pname + ".v")], perm=perm_q)
        s = op("MatMul", [q, k])
        if bias is not None:
            s = op("Add", [s, bias])
        w = op("Softmax", [s], axis=-1)
        o = op("Transpose", [op("MatMul", [w, v])], perm=perm_back)
        o = op("Reshape", [o, merge_shape])
        return linear(o, a["o"], pname + ".o")

    # inputs
    if MODE == "forecast":
        keep = const(time_keep(), "time_keep")  # hide the last SCORED steps
        m = op("Mul", ["mask", keep], prefix="mask_in")
        v = op("Mul", ["values", m], prefix="values_in")
        node_mask = "node_mask"
    elif MODE == "masked-nodes":
        # one pass per node (a dynamic count), stacked on the batch axis: [B, P=N, ...] ->
        # [B*N, ...]; pass p sees mask with node p zeroed on the last SCORED steps
        n_dim = op("Slice", [op("Shape", ["node_mask"]), const([1], "i1", np.int64), const([2], "i2", np.int64),
                             const([0], "i0", np.int64)], prefix="nodes_dim")  # [1] = N
        nn_dim = op("Concat", [n_dim, n_dim], axis=0, prefix="nodes_sq_dim")  # [2] = [N, N]
        eye = op("EyeLike", [op("ConstantOfShape", [nn_dim], prefix="ones_nn",
                                value=numpy_helper.from_array(np.array([1.0], np.float32)))],
                 prefix="pass_eye")  # [N, N]: pass p <-> node p
        onehot = op("Unsqueeze", [eye, const([1, 3], "onehot_axes", np.int64)], prefix="pass_onehot")  # [P,1,N,1]
        scored = const((1.0 - time_keep())[None], "scored_steps_sel")  # [1,T,1,1]
        keep = op("Sub", [const(np.float32(1.0), "one_keep"), op("Mul", [onehot, scored])],
                  prefix="pass_keep")  # [P,T,N,1]
        axis1 = const([1], "axis1", np.int64)
        m5 = op("Mul", [op("Unsqueeze", ["mask", axis1]), keep], prefix="mask_passes")  # [B,P,T,N,F]
        v5 = op("Mul", [op("Unsqueeze", ["values", axis1]), m5], prefix="values_passes")
        stack_shape = op("Concat", [const([-1, WINDOW], "stack_lead", np.int64), n_dim,
                                    const([F], "stack_f", np.int64)], axis=0, prefix="stack_shape")  # [-1,T,N,F]
        m = op("Reshape", [m5, stack_shape], prefix="mask_in")  # [B*N,T,N,F]
        v = op("Reshape", [v5, stack_shape], prefix="values_in")
        ones_n = op("ConstantOfShape", [n_dim], prefix="ones_n",
                    value=numpy_helper.from_array(np.array([1.0], np.float32)))  # [N]
        ones_col = op("Unsqueeze", [ones_n, const([1], "col_axes", np.int64)], prefix="ones_col")  # [N,1]
        nm3 = op("Mul", [op("Unsqueeze", ["node_mask", axis1]), ones_col], prefix="node_mask_passes")  # [B,P,N]
        node_mask = op("Reshape", [nm3, const([-1, 0], "nm_stack_shape", np.int64)], prefix="node_mask_in")
    else:
        # one pass per channel, stacked on the batch axis: pass g sees mask * pass_keep[g]
        # (channel g hidden on the last SCORED steps)
        keeps = pass_keep()
        G = keeps.shape[0]
        ms = [op("Mul", ["mask", const(keeps[g], f"pass{g}_keep")], prefix=f"mask_in{g}") for g in range(G)]
        m = op("Concat", ms, axis=0, prefix="mask_in")
        v = op("Mul", [op("Concat", ["values"] * G, axis=0), m], prefix="values_in")
        node_mask = op("Concat", ["node_mask"] * G, axis=0, prefix="node_mask_in")
    x = op("Concat", [v, m], axis=-1)
    x = linear(x, p["embed"], "embed")
    pos = param(np.asarray(p["pos"])[:, None, :], "pos_embedding")
    x = op("Add", [x, pos])
    one = const(np.float32(1.0), "one")
    neg = const(np.float32(-NEG), "neg_big")
    bias = op("Mul", [op("Sub", [node_mask, one]), neg])
    bias = op("Unsqueeze", [bias, const([1, 2, 3], "bias_axes", np.int64)], prefix="node_bias")

    for i, blk in enumerate(p["blocks"]):
        pre = f"block{i}"
        t = attention(x, blk["t_attn"], pre + ".temporal", [0, 2, 3, 1, 4], [0, 2, 3, 4, 1], [0, 3, 1, 2, 4])
        x = layernorm(op("Add", [x, t]), blk["t_ln"], pre + ".temporal_ln")
        s = attention(x, blk["s_attn"], pre + ".spatial", [0, 1, 3, 2, 4], [0, 1, 3, 4, 2], [0, 1, 3, 2, 4], bias)
        x = layernorm(op("Add", [x, s]), blk["s_ln"], pre + ".spatial_ln")
        h = op("Relu", [linear(x, blk["ff1"], pre + ".ffn1")])
        h = linear(h, blk["ff2"], pre + ".ffn2")
        x = layernorm(op("Add", [x, h]), blk["f_ln"], pre + ".ffn_ln")
    y = linear(x, p["out"], "head")
    if MODE == "masked-nodes":
        # back to [batch, pass, T, N, F]; node n of the output comes from pass n
        unstack_shape = op("Concat", [const([-1], "unstack_lead", np.int64), n_dim, const([WINDOW], "unstack_t", np.int64),
                                      n_dim, const([F], "unstack_f", np.int64)], axis=0, prefix="unstack_shape")
        y5 = op("Reshape", [y, unstack_shape], prefix="passes_out")
        y = op("ReduceSum", [op("Mul", [y5, onehot]), axis1], prefix="merge_passes", keepdims=0)
    elif MODE != "forecast":
        # back to [batch, ...]: channel c of the output comes from pass c
        parts = [name(f"pass{g}_out") for g in range(G)]
        nodes.append(helper.make_node("Split", [y], parts, name=name("split") + "_op", axis=0))
        sel = pass_select()
        picked = [op("Mul", [parts[g], const(sel[g], f"pass{g}_select")]) for g in range(G)]
        y = op("Sum", picked, prefix="merge_passes")
    nodes.append(helper.make_node("Identity", [y], ["reconstruction"], name="reconstruction_op"))

    dims4 = ["batch", WINDOW, "nodes", F]
    graph = helper.make_graph(
        nodes,
        graph_name,
        [
            helper.make_tensor_value_info("values", TensorProto.FLOAT, dims4),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, dims4),
            helper.make_tensor_value_info("node_mask", TensorProto.FLOAT, ["batch", "nodes"]),
        ],
        [helper.make_tensor_value_info("reconstruction", TensorProto.FLOAT, dims4)],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="gridwatch/scripts/train_model.py",
        producer_version=producer,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


# ----------------------------------------------------------------------------------------
# scoring


def window_errors(recon, values, mask, node_mask, error_scale):
    """Per-(window, node, channel) error e and per-window score, float64.
    e is NaN where excluded (padded node, or no observed scored step); score is NaN for a
    window with no scorable entry."""
    r = np.asarray(recon, np.float64)[:, WINDOW - SCORED :]
    v = np.asarray(values, np.float64)[:, WINDOW - SCORED :]
    m = np.asarray(mask, np.float64)[:, WINDOW - SCORED :] * np.asarray(node_mask, np.float64)[:, None, :, None]
    sq = (r - v) ** 2 * m
    cnt = m.sum(axis=1)  # [B,N,F]
    with np.errstate(invalid="ignore", divide="ignore"):
        e = sq.sum(axis=1) / cnt / np.asarray(error_scale, np.float64)
    e = np.where(cnt > 0, e, np.nan)
    score = np.array([np.nan if np.all(np.isnan(x)) else np.nanmax(x) for x in e])
    return e, score


# ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description="Train and export gridwatch's attention model.")
    ap.add_argument("--data", default="/tmp/gridwatch-train.csv", help="plant CSV (normal operation)")
    ap.add_argument("--out-prefix", default="models/plant-attention-v1")
    ap.add_argument("--name", default="plant-attention")
    ap.add_argument("--version", default="1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps-per-epoch", type=int, default=500,
                    help="optimizer steps per epoch; 0 = number of training windows / batch size")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--drop", type=float, default=0.10, help="extra random missingness in training inputs")
    ap.add_argument("--aux-weight", type=float, default=0.2, help="loss weight on randomly hidden early entries")
    ap.add_argument("--train-frac", type=float, default=0.8)
    ap.add_argument("--calib-stride", type=int, default=4)
    ap.add_argument("--max-train-seconds", type=float, default=480.0,
                    help="stop training (after the current step) once this much time has passed")
    ap.add_argument("--data-description", default=None)
    ap.add_argument("--units", default=None,
                    help="comma-separated units of the CSV's channels, in header order (default: known units "
                         "of the plant's channels, else empty)")
    ap.add_argument("--window", type=int, default=16, help="window_steps")
    ap.add_argument("--scored", type=int, default=4, help="scored_steps: the last steps of a window that are scored")
    ap.add_argument("--mode", choices=MODES, default="forecast",
                    help="forecast: the last --scored steps of every channel are hidden and forecast from the "
                         "earlier steps; masked-channels: one pass per channel inside the graph, channel c hidden "
                         "on the last --scored steps and predicted from its earlier steps and all other channels; "
                         "masked-nodes: one pass per node inside the graph, node p hidden on the last --scored "
                         "steps and predicted from its earlier steps and the other nodes' readings (incl. the "
                         "same steps)")
    ap.add_argument("--standardise-per-cell-rows", type=int, default=0, metavar="K",
                    help="standardise every (cell, node, channel) series with the mean/std of its first K rows "
                         "before training and calibration (contract channel stats become identity); 0 = off")
    ap.add_argument("--std-floor-frac", type=float, default=1e-3,
                    help="with --standardise-per-cell-rows: per-series std floor as a fraction of the global std")
    ap.add_argument("--whole-cell-frac", type=float, default=0.0,
                    help="share of training windows that take all nodes of their cell instead of a random subset "
                         "of 1..(cell size) nodes (default 0: always a random subset)")
    ap.add_argument("--calibration-cells", default=None, metavar="REGEX",
                    help="cells whose id matches REGEX (re.search) calibrate (all their steps) and are not trained "
                         "on; the other cells train on all their steps. Default: the time split (--train-frac)")
    args = ap.parse_args()

    t_start = time.time()
    import jax
    import jax.numpy as jnp
    import onnx
    import onnxruntime as ort
    import optax

    jax.config.update("jax_default_matmul_precision", "highest")

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    # ---------------- data
    names = read_header(args.data)
    if args.units is None:
        units = [KNOWN_UNITS.get(n, "") for n in names]
    else:
        units = [u.strip() for u in args.units.split(",")] if args.units else []
        if len(units) != len(names):
            raise SystemExit(f"--units has {len(units)} entries, the CSV has {len(names)} channels {names}")
    configure(list(zip(names, units)), args.window, args.scored, args.mode)
    cadence, cells, rows = load_csv(args.data)
    cell_steps = [a.shape[0] for _, _, a, _ in cells]
    if args.calibration_cells is None:
        splits = [int(t * args.train_frac) for t in cell_steps]
    else:
        cal_re = re.compile(args.calibration_cells)
        splits = [0 if cal_re.search(c) else t for (c, _, _, _), t in zip(cells, cell_steps)]
    uniform = len(set(cell_steps)) == 1 and args.calibration_cells is None
    steps, split = cell_steps[0], splits[0]  # the common time axis when uniform
    if uniform:
        log(f"{args.data}: {rows} rows, {steps} steps of {cadence} ms, "
            f"{len(cells)} cells ({', '.join(f'{c}:{len(n)}' for c, n, _, _ in cells)}), split at step {split}")
    else:
        log(f"{args.data}: {rows} rows, {len(cells)} cells, {sum(cell_steps)} cell steps of {cadence} ms "
            f"({min(cell_steps)}..{max(cell_steps)} per cell); train steps {sum(splits)}, "
            f"calibration steps {sum(t - s for t, s in zip(cell_steps, splits))}")
    train_cells = [i for i, s in enumerate(splits) if s >= WINDOW]
    cal_cells = [i for i, (t, s) in enumerate(zip(cell_steps, splits)) if t - s >= WINDOW]
    if not train_cells or not cal_cells:
        raise SystemExit("not enough steps for a train/calibration split")
    max_cell = max(len(n) for _, n, _, _ in cells)
    if max_cell > MAX_NODES:
        raise SystemExit(f"a cell has {max_cell} nodes, more than max_nodes={MAX_NODES}")

    series_stats = None
    if args.standardise_per_cell_rows > 0:
        series_stats, g_std = standardise_per_series(cells, args.standardise_per_cell_rows, args.std_floor_frac)
        mean = np.zeros(F)
        std = np.ones(F)
        log(f"per-series standardisation: every (cell, node, channel) with the mean/std of its first "
            f"{args.standardise_per_cell_rows} rows, std floored at {args.std_floor_frac:g} x global std "
            f"{np.round(g_std, 4).tolist()}; contract channel stats are identity")
    else:
        train_raw = np.concatenate([a[:sp].reshape(-1, F) for (_, _, a, _), sp in zip(cells, splits)])
        mean = np.nanmean(train_raw, axis=0)
        std = np.nanstd(train_raw, axis=0)
        std = np.where(std > 1e-9, std, 1.0)
    norm = []  # per cell: (values f32 [T,n,F] with 0 where missing, mask f32)
    for _, _, a, _ in cells:
        obs = ~np.isnan(a)
        z = np.where(obs, (a - mean) / std, 0.0).astype(np.float32)
        norm.append((z, obs.astype(np.float32)))
    missing_frac = 1.0 - float(np.mean(np.concatenate([m.reshape(-1) for _, m in norm])))
    log(f"channel mean {np.round(mean, 4).tolist()} std {np.round(std, 4).tolist()}, missing {missing_frac:.4%}")

    rng = np.random.default_rng(args.seed)
    cell_windows = np.array([max(0, sp - WINDOW + 1) for sp in splits], np.float64)
    n_train_windows = int(cell_windows.sum())
    spe = args.steps_per_epoch or max(1, n_train_windows // args.batch_size)
    # cells are drawn in proportion to their training windows (uniformly when all are alike)
    cell_p = None if len(set(cell_windows.tolist())) == 1 else cell_windows / cell_windows.sum()

    def sample_batch():
        B = args.batch_size
        if cell_p is None:
            ci = rng.integers(0, len(cells), size=B)
        else:
            ci = rng.choice(len(cells), size=B, p=cell_p)
        if args.whole_cell_frac > 0:
            # a share of the windows takes the whole cell (as the detector sees it), the rest a
            # random subset of 1..(cell size) nodes
            ks = [len(cells[c][1]) if rng.random() < args.whole_cell_frac else int(rng.integers(1, len(cells[c][1]) + 1))
                  for c in ci]
        else:
            ks = [int(rng.integers(1, len(cells[c][1]) + 1)) for c in ci]
        N = max(ks)
        vals = np.zeros((B, WINDOW, N, F), np.float32)
        msk = np.zeros((B, WINDOW, N, F), np.float32)
        nm = np.zeros((B, N), np.float32)
        for b, (c, k) in enumerate(zip(ci, ks)):
            z, m = norm[c]
            s = int(rng.integers(0, splits[c] - WINDOW + 1))
            sel = rng.permutation(z.shape[1])[:k]
            vals[b, :, :k] = z[s : s + WINDOW][:, sel]
            msk[b, :, :k] = m[s : s + WINDOW][:, sel]
            nm[b, :k] = 1.0
        drop = (rng.random(msk.shape) < args.drop).astype(np.float32)
        if MODE == "forecast":
            return vals, msk, nm, drop
        if MODE == "masked-nodes":
            # each window trains one of the graph's passes: a random real node hidden on the
            # last SCORED steps (all channels), the other nodes fully visible
            hide = np.zeros((B, WINDOW, N, 1), np.float32)
            for b, k in enumerate(ks):
                hide[b, WINDOW - SCORED :, int(rng.integers(0, k))] = 1.0
            return vals, msk, nm, drop * (1.0 - hide), hide
        # masked-channels: each window trains one of the graph's passes (a random channel)
        hide = 1.0 - pass_keep()[rng.integers(0, F, size=B)]  # [B,T,1,F]
        return vals, msk, nm, drop * (1.0 - hide), hide

    # ---------------- training
    params = init_params(jax.random.PRNGKey(args.seed))
    n_params = count_params(params)
    total_steps = args.epochs * spe
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(500, total_steps // 10 + 1), total_steps, args.lr * 0.02)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=args.weight_decay))
    opt_state = opt.init(params)
    scored_sel = jnp.asarray((1.0 - time_keep())[None])  # [1,T,1,1]: 1 on the last SCORED steps
    early_sel = 1.0 - scored_sel

    def loss_fn(p, vals, msk, nm, drop):
        m_in = msk * (1.0 - drop)
        recon = forward(p, vals * m_in, m_in, nm)
        err = (recon - vals) ** 2
        real = msk * nm[:, None, :, None]
        w_main = real * scored_sel
        w_aux = real * drop * early_sel
        main = jnp.sum(err * w_main) / jnp.maximum(jnp.sum(w_main), 1.0)
        aux = jnp.sum(err * w_aux) / jnp.maximum(jnp.sum(w_aux), 1.0)
        return main + args.aux_weight * aux, (main, aux)

    def loss_fn_masked(p, vals, msk, nm, drop, hide):
        # one pass of the masked-channels graph per window: hide = the pass's hidden entries
        m_in = msk * (1.0 - drop) * (1.0 - hide)
        recon = body(p, vals * m_in, m_in, nm)
        err = (recon - vals) ** 2
        real = msk * nm[:, None, :, None]
        w_main = real * hide
        w_aux = real * drop
        main = jnp.sum(err * w_main) / jnp.maximum(jnp.sum(w_main), 1.0)
        aux = jnp.sum(err * w_aux) / jnp.maximum(jnp.sum(w_aux), 1.0)
        return main + args.aux_weight * aux, (main, aux)

    @jax.jit
    def train_step(p, s, vals, msk, nm, drop, *hide):
        fn = loss_fn if MODE == "forecast" else loss_fn_masked
        (loss, (main, aux)), g = jax.value_and_grad(fn, has_aux=True)(p, vals, msk, nm, drop, *hide)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss, main, aux

    log(f"model: {n_params} params; training {args.epochs} epochs x {spe} steps, batch {args.batch_size}")
    t_train = time.time()
    history = []
    epochs_done = 0
    stopped_early = False
    for epoch in range(args.epochs):
        acc = []
        for _ in range(spe):
            # no host sync inside the epoch: JAX dispatches asynchronously, so the next batch
            # is sampled while the previous step still runs
            batch = sample_batch()
            params, opt_state, loss, main, aux = train_step(params, opt_state, *batch)
            acc.append(jnp.stack([loss, main, aux]))
        acc = np.asarray(jnp.mean(jnp.stack(acc), axis=0), np.float64)
        epochs_done += 1
        history.append({"epoch": epoch + 1, "loss": acc[0], "forecast_mse": acc[1], "masked_mse": acc[2]})
        log(f"epoch {epoch + 1:3d}/{args.epochs}: loss {acc[0]:.5f} (forecast {acc[1]:.5f}, masked {acc[2]:.5f})")
        if time.time() - t_train > args.max_train_seconds and epoch + 1 < args.epochs:
            log(f"time budget of {args.max_train_seconds:.0f}s used up: stopping after epoch {epoch + 1}")
            stopped_early = True
            break
    train_seconds = time.time() - t_train
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    fwd = jax.jit(forward)

    # ---------------- export + verification against JAX
    graph_name = re.sub(r"\W", "_", args.name)
    model = build_onnx(params, f"jax {jax.__version__}, onnx {onnx.__version__}", graph_name)
    onnx_bytes = model.SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])

    def run_ort(vals, msk, nm):
        return sess.run(["reconstruction"], {"values": vals, "mask": msk, "node_mask": nm})[0]

    vrng = np.random.default_rng(args.seed + 1)
    max_diff = 0.0
    checks = []
    for B, N in [(1, 1), (2, 3), (5, 6), (7, 11), (3, MAX_NODES)]:
        msk = (vrng.random((B, WINDOW, N, F)) > 0.15).astype(np.float32)
        nm = np.ones((B, N), np.float32)
        for b in range(B):
            real = int(vrng.integers(1, N + 1))
            nm[b, real:] = 0.0
        msk *= nm[:, None, :, None]
        vals = (vrng.standard_normal((B, WINDOW, N, F)) * msk).astype(np.float32)
        a = run_ort(vals, msk, nm)
        j = np.asarray(fwd(params, vals, msk, nm))
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(j))):
            raise SystemExit(f"non-finite output at batch={B} nodes={N}")
        d = float(np.max(np.abs(a - j)))
        checks.append({"batch": B, "nodes": N, "max_abs_diff": d})
        max_diff = max(max_diff, d)
        log(f"verify ORT vs JAX: batch {B:2d} nodes {N:2d}: max abs diff {d:.3g}")
    if max_diff >= TOL:
        raise SystemExit(f"ONNX export does not match JAX: max abs diff {max_diff} >= {TOL}")

    # padding invariance: a real node's output must not depend on padded nodes' contents
    vals, msk, nm = sample_batch()[:3]
    B, _, N, _ = vals.shape
    padded_v = np.concatenate([vals, vrng.standard_normal((B, WINDOW, 3, F)).astype(np.float32)], axis=2)
    padded_m = np.concatenate([msk, np.ones((B, WINDOW, 3, F), np.float32)], axis=2)
    padded_nm = np.concatenate([nm, np.zeros((B, 3), np.float32)], axis=1)
    a = run_ort(vals, msk, nm)
    b = run_ort(padded_v, padded_m, padded_nm)[:, :, :N]
    real = nm[:, None, :, None] > 0
    pad_diff = float(np.max(np.abs(np.where(real, a - b, 0.0))))
    log(f"verify padding invariance (3 extra garbage padded nodes): max abs diff {pad_diff:.3g}")
    if pad_diff >= TOL:
        raise SystemExit(f"padded nodes leak into real nodes' outputs: {pad_diff}")

    # ---------------- calibration (held-out time range, whole cells, stride calib_stride)
    cal_v, cal_m, cal_nm, cal_meta = [], [], [], []
    for ci, (z, m) in enumerate(norm):
        n = z.shape[1]
        for s in range(splits[ci], cell_steps[ci] - WINDOW + 1, args.calib_stride):
            v = np.zeros((WINDOW, max_cell, F), np.float32)
            mm = np.zeros((WINDOW, max_cell, F), np.float32)
            v[:, :n] = z[s : s + WINDOW]
            mm[:, :n] = m[s : s + WINDOW]
            nmm = np.zeros((max_cell,), np.float32)
            nmm[:n] = 1.0
            cal_v.append(v)
            cal_m.append(mm)
            cal_nm.append(nmm)
            cal_meta.append((ci, s))
    cal_v, cal_m, cal_nm = np.stack(cal_v), np.stack(cal_m), np.stack(cal_nm)
    ck = 256 if MODE != "masked-nodes" else max(8, 256 // max_cell)  # masked-nodes: max_cell passes each
    cal_r = np.concatenate([run_ort(cal_v[i : i + ck], cal_m[i : i + ck], cal_nm[i : i + ck])
                            for i in range(0, len(cal_v), ck)])
    cal_j = np.concatenate([np.asarray(fwd(params, cal_v[i : i + ck], cal_m[i : i + ck], cal_nm[i : i + ck]))
                            for i in range(0, len(cal_v), ck)])
    cal_real = cal_nm[:, None, :, None] > 0
    cal_diff = float(np.max(np.abs(np.where(cal_real, cal_r - cal_j, 0.0))))
    log(f"verify ORT vs JAX on {len(cal_v)} calibration windows: max abs diff {cal_diff:.3g}")
    if cal_diff >= TOL:
        raise SystemExit(f"ONNX export does not match JAX on calibration windows: {cal_diff}")
    max_diff = max(max_diff, cal_diff)

    sm = cal_m[:, WINDOW - SCORED :] * cal_nm[:, None, :, None]
    sq = (cal_r[:, WINDOW - SCORED :].astype(np.float64) - cal_v[:, WINDOW - SCORED :]) ** 2
    error_scale = (sq * sm).sum(axis=(0, 1, 2)) / sm.sum(axis=(0, 1, 2))
    _, scores = window_errors(cal_r, cal_v, cal_m, cal_nm, error_scale)
    scores = scores[~np.isnan(scores)]
    qs = {k: float(np.quantile(scores, float(k))) for k in ("0.5", "0.9", "0.99", "0.999")}
    qs["max"] = float(np.max(scores))
    threshold = 1.25 * qs["0.999"]
    log(f"calibration: {len(scores)} windows, error_scale {np.round(error_scale, 5).tolist()}, "
        f"quantiles {({k: round(v, 3) for k, v in qs.items()})}, threshold {threshold:.4f}")
    # for orientation: the same forecast MSE on the training windows' time range
    last_loss = history[-1]["loss"]

    # ---------------- golden vector: batch 2, nodes 3
    g_nodes = 3
    gv = np.zeros((2, WINDOW, g_nodes, F), np.float32)
    gm = np.zeros((2, WINDOW, g_nodes, F), np.float32)
    graw = np.full((2, WINDOW, g_nodes, F), np.nan)
    gnm = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    # each item's nodes: the first nodes of a cell with a calibration range (continuing with
    # the next such cells if the cell has fewer nodes), from a window 40 steps into that range
    g_cells = [i for i in cal_cells if cell_steps[i] >= WINDOW + 8] or [i for i in range(len(cells)) if cell_steps[i] >= WINDOW + 8]
    if not g_cells:
        raise SystemExit("no cell is long enough for the golden vector")
    g_src = []  # per item: [(cell index, node index)]
    for b, (start, n_real) in enumerate([(0, 3), (min(1, len(g_cells) - 1), 2)]):
        src = []
        for ci in g_cells[start:] + g_cells[:start]:
            src += [(ci, j) for j in range(len(cells[ci][1]))]
        src = src[:n_real]
        g_src.append(src)
        for n, (ci, j) in enumerate(src):
            s0 = max(0, min(splits[ci] + 40, cell_steps[ci] - WINDOW - 8))
            graw[b, :, n] = cells[ci][2][s0 + 8 * b : s0 + 8 * b + WINDOW, j]
    ac = min(3, F - 1)  # the channel of the unobserved entry and of the anomaly
    # some missing entries: early, scored, and one (node, channel) with no observed scored step
    graw[0, 3, 1, min(2, F - 1)] = np.nan
    graw[0, 13, 0, min(1, F - 1)] = np.nan
    graw[0, WINDOW - SCORED :, 2, ac] = np.nan
    graw[1, 0, 0, :] = np.nan
    graw[1, 14, 1, 0] = np.nan
    # an anomaly in the second window: +4 (A for the plant's current) on node 1's channel ac in
    # the scored steps
    graw[1, WINDOW - SCORED :, 1, ac] += 4.0
    obs = ~np.isnan(graw) & (gnm[:, None, :, None] > 0)
    gv[:] = np.where(obs, (graw - mean) / std, 0.0)
    gm[:] = obs
    g_recon = run_ort(gv, gm, gnm)
    g_jax = np.asarray(fwd(params, gv, gm, gnm))
    g_diff = float(np.max(np.abs(g_recon - g_jax)))
    if g_diff >= TOL or not np.all(np.isfinite(g_recon)):
        raise SystemExit(f"golden vector: ORT vs JAX diff {g_diff}")
    # the Rust side may run ORT with other graph-optimisation levels: they must agree too
    so0 = ort.SessionOptions()
    so0.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess0 = ort.InferenceSession(onnx_bytes, so0, providers=["CPUExecutionProvider"])
    g_plain = sess0.run(["reconstruction"], {"values": gv, "mask": gm, "node_mask": gnm})[0]
    g_opt_diff = float(np.max(np.abs(g_recon - g_plain)))
    if g_opt_diff >= TOL:
        raise SystemExit(f"golden vector: ORT optimised vs unoptimised graph differ by {g_opt_diff}")
    g_e, g_score = window_errors(g_recon, gv, gm, gnm, error_scale)
    log(f"golden: scores {np.round(g_score, 4).tolist()} (threshold {threshold:.4f}), ORT vs JAX {g_diff:.3g}, "
        f"ORT all vs no graph optimisations {g_opt_diff:.3g}")

    # ---------------- write
    prefix = args.out_prefix
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.basename(prefix)
    onnx_path = prefix + ".onnx"
    with open(onnx_path, "wb") as f:
        f.write(onnx_bytes)
    sha = hashlib.sha256(onnx_bytes).hexdigest()

    def nested(x):
        x = np.asarray(x, np.float64)
        return [nested(y) for y in x] if x.ndim else (None if math.isnan(float(x)) else float(x))

    argv0 = os.path.relpath(sys.argv[0]) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    py = sys.executable
    try:
        rel = os.path.relpath(py)
        py = rel if not rel.startswith("..") else py
    except ValueError:
        pass
    command = shlex.join([py, argv0, *sys.argv[1:]])
    sizes = sorted({len(n) for _, n, _, _ in cells})
    cell_range = f"{len(cells)} cells ({cells[0][0]} .. {cells[-1][0]}) of " + "/".join(str(x) for x in sizes)
    n_nodes = sum(len(n) for _, n, _, _ in cells)
    if uniform:
        desc = args.data_description or (
            f"plant CSV {args.data}: normal operation, {cell_range}"
            + f" nodes, {n_nodes} nodes, {steps} steps of {cadence} ms "
            f"({steps * cadence / 3.6e6:.2f} h); train = first {args.train_frac:.0%} of the time steps "
            f"({split} steps), calibration = the rest ({steps - split} steps)"
        )
        cal_where = f"held-out last {1 - args.train_frac:.0%} of the time steps"
    else:
        if args.calibration_cells is None:
            split_desc = (f"train = the first {args.train_frac:.0%} of every cell's time steps, calibration = the "
                          "rest of each cell")
            cal_where = f"held-out last {1 - args.train_frac:.0%} of every cell's time steps"
        else:
            n_cal = sum(1 for sp in splits if sp == 0)
            split_desc = (f"calibration = all steps of the {n_cal} cells matching {args.calibration_cells!r}, "
                          "train = all steps of the other cells")
            cal_where = f"all steps of the cells matching {args.calibration_cells!r} (not trained on)"
        desc = args.data_description or (
            f"CSV {args.data}: normal operation, {cell_range} nodes, {n_nodes} nodes, each cell on its own "
            f"time axis of {cadence} ms steps ({min(cell_steps)}..{max(cell_steps)} steps per cell, "
            f"{sum(cell_steps)} in all, {sum(cell_steps) * cadence / 3.6e6:.2f} h); {split_desc} "
            f"({sum(splits)} train steps, {sum(cell_steps) - sum(splits)} calibration steps)"
        )
    if MODE == "forecast":
        hiding = ("inside the graph the last scored_steps steps of mask and values are zeroed, so the model "
                  f"forecasts them from the first {WINDOW - SCORED} steps of every node of the cell")
        loss_desc = (f"MSE on observed entries of the last {SCORED} steps (forecast) + {args.aux_weight} x MSE on "
                     f"entries of the first {WINDOW - SCORED} steps hidden by {args.drop:.0%} random extra "
                     "missingness; random windows, random node subsets (1..cell size) padded to the batch maximum")
        arch_in = ""
    elif MODE == "masked-nodes":
        source = (f"its own first {WINDOW - SCORED} steps and from the other nodes' readings (all steps, "
                  "including the scored ones)" if SCORED < WINDOW
                  else "the other nodes' readings only (its own readings are hidden on the whole window)")
        hiding = ("inside the graph the window is run as one pass per node (nodes passes, a dynamic count) "
                  "stacked on the batch axis; pass p zeroes mask and values of node p (all channels) on the "
                  "last scored_steps steps, the other nodes stay fully visible, and reconstruction[:, :, p, :] "
                  f"is pass p's output for node p, so every node is predicted on the scored steps from {source} "
                  "of the cell (a 1-node cell: a forecast from its own earlier steps)")
        loss_desc = (f"MSE on the hidden entries (one random real node per window hidden on the last {SCORED} "
                     f"steps, all channels: one pass of the graph) + {args.aux_weight} x MSE on the other "
                     f"entries hidden by {args.drop:.0%} random extra missingness; random windows, random node "
                     "subsets (1..cell size) padded to the batch maximum")
        arch_in = ("masked-nodes: one pass per node (batch x nodes; [N,N] identity from EyeLike on the dynamic "
                   "node count) with per-pass input masks (Unsqueeze + Mul + Reshape to [batch*nodes, ...]), "
                   "node p taken from pass p after the head (Reshape, Mul by the one-hot, ReduceSum over "
                   "passes); ")
    else:
        source = (f"its own first {WINDOW - SCORED} steps and from all other channels" if SCORED < WINDOW
                  else "all other channels only (its own readings are hidden on the whole window)")
        hiding = (f"inside the graph the window is run as {F} passes stacked on the batch axis; pass c zeroes "
                  "mask and values of channel c on the last scored_steps steps, and reconstruction[..., c] is "
                  "pass c's output for channel c, so every channel is predicted on the scored steps from "
                  f"{source} of every node of the cell")
        loss_desc = (f"MSE on the hidden entries (one random channel per window hidden on the last {SCORED} "
                     f"steps: one pass of the graph) + {args.aux_weight} x MSE on the other entries hidden by "
                     f"{args.drop:.0%} random extra missingness; random windows, random node subsets (1..cell "
                     "size) padded to the batch maximum")
        arch_in = (f"masked-channels: {F} passes (batch x {F}) with per-pass input masks, merged per channel "
                   "after the head (Split + Mul + Sum); ")
    if args.whole_cell_frac > 0:
        loss_desc += f"; {args.whole_cell_frac:.0%} of the windows take the whole cell instead of a random subset"
    cal_err = "forecast" if MODE == "forecast" else "prediction"
    normalisation_desc = (
        "values = (x - channels[c].mean) / channels[c].std, 0 where unobserved (mask 0); padded nodes "
        f"have node_mask 0 and are excluded from scoring; {hiding}"
    )
    if series_stats is not None:
        normalisation_desc = (
            f"per series: every (cell, node, channel) series is standardised with the mean and std of its own "
            f"first {args.standardise_per_cell_rows} rows (std floored at {args.std_floor_frac:g} x the channel's "
            "global std in training); channels[c].mean/std are the identity (0/1). " + normalisation_desc
        )
    contract = {
        "name": args.name,
        "version": args.version,
        "onnx_file": base + ".onnx",
        "onnx_sha256": sha,
        "family": "spatio-temporal-attention",
        "inputs": [
            {"name": "values", "shape": ["batch", WINDOW, "nodes", F]},
            {"name": "mask", "shape": ["batch", WINDOW, "nodes", F]},
            {"name": "node_mask", "shape": ["batch", "nodes"]},
        ],
        "outputs": [{"name": "reconstruction", "shape": ["batch", WINDOW, "nodes", F]}],
        "cadence_ms": cadence,
        "window_steps": WINDOW,
        "scored_steps": SCORED,
        "max_nodes": MAX_NODES,
        "channels": [
            {"name": n, "unit": u, "mean": float(mean[i]), "std": float(std[i])}
            for i, (n, u) in enumerate(CHANNELS)
        ],
        "calibration": {
            "error_scale": [float(x) for x in error_scale],
            "threshold": float(threshold),
            "score_quantiles": qs,
            "windows": int(len(scores)),
            "rule": "threshold = 1.25 x p99.9 of calibration scores",
            "method": (
                f"{cal_where}; windows of every node of a cell "
                f"(the whole cell), stepping by {args.calib_stride} steps; error_scale[c] = mean squared "
                f"{cal_err} error of channel c over all observed scored entries of these windows; quantiles "
                "with numpy's linear interpolation"
            ),
        },
        "scoring": (
            "score = max over (node, channel) of mean over the last scored_steps observed steps of "
            "(reconstruction - values)^2 / error_scale[channel]"
        ),
        "normalisation": normalisation_desc,
        "architecture": {
            "d_model": D_MODEL,
            "heads": HEADS,
            "blocks": BLOCKS,
            "ffn": FFN,
            "params": n_params,
            "description": (
                f"{arch_in}embed concat(values*mask, mask) -> Linear({2 * F}->{D_MODEL}) + learned temporal "
                f"position embedding [{WINDOW},{D_MODEL}]; {BLOCKS} x [temporal MHA over the {WINDOW} steps of "
                "each node + residual + LayerNorm; spatial "
                "MHA over the nodes at each step (padded nodes masked as keys, bias -1e9) + residual + "
                f"LayerNorm; FFN {D_MODEL}->{FFN}->{D_MODEL} ReLU + residual + LayerNorm]; "
                f"Linear({D_MODEL}->{F}); post-norm, LayerNorm eps 1e-5"
            ),
        },
        "training": {
            "data": desc,
            "rows": int(rows),
            "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "epochs": epochs_done,
            "steps_per_epoch": spe,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "final_loss": float(last_loss),
            "final_forecast_mse": float(history[-1]["forecast_mse"]),
            "final_masked_mse": float(history[-1]["masked_mse"]),
            "train_seconds": round(train_seconds, 1),
            "stopped_by_time_budget": stopped_early,
            "loss": loss_desc,
            "optimizer": f"adamw lr {args.lr} warmup+cosine, weight decay {args.weight_decay}, clip 1.0",
            "command": command,
            "framework": f"jax {jax.__version__} + optax {optax.__version__}, exported with onnx {onnx.__version__} "
                         f"(graph built with onnx.helper), verified with onnxruntime {ort.__version__}",
            "onnx_opset": OPSET,
            "onnx_ir_version": IR_VERSION,
            "verification": {
                "ort_vs_jax_max_abs_diff": max_diff,
                "padding_invariance_max_abs_diff": pad_diff,
                "golden_ort_optimised_vs_unoptimised_max_abs_diff": g_opt_diff,
                "checks": checks,
            },
        },
    }
    # keys that only appear when the generalised options are used (the plant's default contract
    # keeps its exact layout)
    if MODE != "forecast":
        contract["architecture"]["mode"] = MODE
        contract["architecture"]["passes"] = "nodes" if MODE == "masked-nodes" else F
        contract["training"]["mode"] = MODE
    if args.calibration_cells is not None:
        contract["training"]["calibration_cells"] = args.calibration_cells
    if not uniform:
        contract["training"]["cells"] = len(cells)
        contract["training"]["time_axis"] = "per cell (own t0 and step count); windows never cross cells"
    if series_stats is not None:
        # `normalisation` stays the human-readable description; `standardisation` is the
        # machine-readable switch the Rust side reads ("contract", the default, or this).
        contract["normalisation"] = normalisation_desc
        contract["standardisation"] = "per-series-fit"
        contract["training"]["standardisation"] = {
            "kind": "per-series-fit",
            "fit_rows": args.standardise_per_cell_rows,
            "series": "(cell, node, channel)",
            "statistics": "mean and std (ddof 0) of the series' readings in its first fit_rows rows "
                          "(a row = a time step with any reading of that node)",
            "std_floor": [float(x) for x in args.std_floor_frac * g_std],
            "std_floor_rule": f"{args.std_floor_frac:g} x the channel's std over all training CSV readings",
        }

    # golden notes: which nodes, which channel carries the unobserved entry and the anomaly
    ac_name, ac_unit = CHANNELS[ac]
    multi = any(len({ci for ci, _ in src}) > 1 for src in g_src)
    nodes_of = "nodes taken from several 1-node cells (a numerical test only)" if multi else "nodes of one cell"
    if series_stats is not None:
        raw_note = ("raw_values are the per-series standardised readings (the contract's channel stats are the "
                    "identity; series_mean/series_std [b][n][c] give each node's series statistics, physical = "
                    "raw * std + mean) (null = missing or padding)")
    else:
        raw_note = "raw_values are the same readings in physical units (null = missing or padding)"
    if series_stats is not None:
        offset = "+4 (per-series standardised units)"
    else:
        offset = f"+4 {ac_unit}" if ac_unit else "+4"
    golden = {
        "model": base + ".onnx",
        "onnx_sha256": sha,
        "tolerance": TOL,
        "shape": {"batch": 2, "window_steps": WINDOW, "nodes": g_nodes, "channels": F},
        "notes": (
            f"values are normalised with the contract's channel mean/std (0 where mask is 0); {raw_note}. "
            f"Item 0: 3 real {nodes_of}, with missing entries, and node 2's {ac_name} unobserved on every "
            "scored step (excluded, "
            "error null). Item 1: 2 real nodes + 1 padded node (node_mask 0, values/mask 0), node 0 missing "
            f"at step 0, and {offset} added to node 1's {ac_name} on the scored steps (an anomaly). "
            "reconstruction is ONNX Runtime's output for every entry; padded nodes' outputs are don't-care "
            "(compare real nodes only). errors[b][n][c] is e[n,c] of the scoring rule (null = excluded), "
            "score[b] = max of errors[b]."
        ),
        "inputs": {"values": nested(gv), "mask": nested(gm), "node_mask": nested(gnm)},
        "raw_values": nested(graw),
        "outputs": {"reconstruction": nested(g_recon)},
        "error_scale": [float(x) for x in error_scale],
        "threshold": float(threshold),
        "expected": {
            "score": nested(g_score),
            "errors": nested(g_e),
            "anomalous": [bool(s > threshold) for s in g_score],
        },
    }
    if series_stats is not None:
        g_mu = np.full((2, g_nodes, F), np.nan)
        g_sd = np.full((2, g_nodes, F), np.nan)
        for b, src in enumerate(g_src):
            for n, (ci, j) in enumerate(src):
                if gnm[b, n] > 0:
                    g_mu[b, n], g_sd[b, n] = series_stats[cells[ci][0]][cells[ci][1][j]]
        golden["series_mean"] = nested(g_mu)
        golden["series_std"] = nested(g_sd)
    with open(prefix + ".json", "w") as f:
        json.dump(contract, f, indent=2)
        f.write("\n")
    with open(prefix + ".golden.json", "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    log(f"wrote {onnx_path} ({len(onnx_bytes)} bytes, sha256 {sha}), {prefix}.json, {prefix}.golden.json")
    log(f"done in {time.time() - t_start:.1f}s (training {train_seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
