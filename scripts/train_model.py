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
ops (MatMul, Reshape with 0-dims, Transpose, Softmax, LayerNormalization) and has the
symbolic dims ``batch`` and ``nodes``.

Usage
-----
    scripts/setup-python.sh --train
    .venv/bin/python scripts/train_model.py --data /tmp/gridwatch-train.csv \\
        --out-prefix models/plant-attention-v1 --seed 0

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

import numpy as np

CHANNELS = [
    ("vibration_rms", "mm/s"),
    ("temperature", "degC"),
    ("pressure", "bar"),
    ("current", "A"),
]
F = len(CHANNELS)
WINDOW = 16  # window_steps
SCORED = 4  # scored_steps: the last SCORED steps are hidden from the model and forecast
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


def load_csv(path: str):
    """Returns (cadence_ms, cells, rows) where cells is a list of
    (cell_id, [node_id], raw float64 array [T, n, F] with NaN where missing)."""
    names = [c for c, _ in CHANNELS]
    ts_list: list[int] = []
    recs: list[tuple[int, str, str, list[float]]] = []
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
            for x in row[3:7]:
                x = x.strip()
                try:
                    v = float(x) if x else math.nan
                except ValueError:
                    v = math.nan
                vals.append(v if math.isfinite(v) else math.nan)
            ts = int(row[0])
            recs.append((ts, row[1], row[2], vals))
            ts_list.append(ts)
    if not recs:
        raise SystemExit(f"{path}: no rows")
    uts = np.unique(np.asarray(ts_list, dtype=np.int64))
    diffs = np.diff(uts)
    cadence = int(np.median(diffs)) if len(diffs) else 1000
    t0 = int(uts[0])
    steps = int(round((int(uts[-1]) - t0) / cadence)) + 1
    cell_nodes: dict[str, list[str]] = {}
    for _, node, cell, _ in recs:
        nodes = cell_nodes.setdefault(cell, [])
        if node not in nodes:
            nodes.append(node)
    def natural(s):  # "line-2" before "line-10"
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]

    cells = []
    index = {}
    for cell in sorted(cell_nodes, key=natural):
        nodes = sorted(cell_nodes[cell], key=natural)
        arr = np.full((steps, len(nodes), F), np.nan)
        cells.append((cell, nodes, arr))
        for j, node in enumerate(nodes):
            index[(cell, node)] = (arr, j)
    for ts, node, cell, vals in recs:
        arr, j = index[(cell, node)]
        i = int(round((ts - t0) / cadence))
        arr[i, j] = vals
    return cadence, cells, len(recs)


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
    Mirrors the ONNX graph built in build_onnx() op for op."""
    import jax
    import jax.numpy as jnp

    keep = jnp.asarray(time_keep())  # [T,1,1]
    m = mask * keep
    v = values * m
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
    k = np.ones((WINDOW, 1, 1), np.float32)
    k[WINDOW - SCORED :] = 0.0
    return k


# ----------------------------------------------------------------------------------------
# ONNX export


def build_onnx(p, producer: str):
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

    def linear(x, q, pname):
        w = param(q["w"], pname + ".weight")
        b = param(q["b"], pname + ".bias")
        return op("Add", [op("MatMul", [x, w]), b], prefix=pname)

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
    keep = const(time_keep(), "time_keep")  # hide the last SCORED steps
    m = op("Mul", ["mask", keep], prefix="mask_in")
    v = op("Mul", ["values", m], prefix="values_in")
    x = op("Concat", [v, m], axis=-1)
    x = linear(x, p["embed"], "embed")
    pos = param(np.asarray(p["pos"])[:, None, :], "pos_embedding")
    x = op("Add", [x, pos])
    one = const(np.float32(1.0), "one")
    neg = const(np.float32(-NEG), "neg_big")
    bias = op("Mul", [op("Sub", ["node_mask", one]), neg])
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
    nodes.append(helper.make_node("Identity", [y], ["reconstruction"], name="reconstruction_op"))

    dims4 = ["batch", WINDOW, "nodes", F]
    graph = helper.make_graph(
        nodes,
        "plant_attention",
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
    cadence, cells, rows = load_csv(args.data)
    steps = cells[0][2].shape[0]
    split = int(steps * args.train_frac)
    log(f"{args.data}: {rows} rows, {steps} steps of {cadence} ms, "
        f"{len(cells)} cells ({', '.join(f'{c}:{len(n)}' for c, n, _ in cells)}), split at step {split}")
    if split < WINDOW or steps - split < WINDOW:
        raise SystemExit("not enough steps for a train/calibration split")
    max_cell = max(len(n) for _, n, _ in cells)
    if max_cell > MAX_NODES:
        raise SystemExit(f"a cell has {max_cell} nodes, more than max_nodes={MAX_NODES}")

    train_raw = np.concatenate([a[:split].reshape(-1, F) for _, _, a in cells])
    mean = np.nanmean(train_raw, axis=0)
    std = np.nanstd(train_raw, axis=0)
    std = np.where(std > 1e-9, std, 1.0)
    norm = []  # per cell: (values f32 [T,n,F] with 0 where missing, mask f32)
    for _, _, a in cells:
        obs = ~np.isnan(a)
        z = np.where(obs, (a - mean) / std, 0.0).astype(np.float32)
        norm.append((z, obs.astype(np.float32)))
    missing_frac = 1.0 - float(np.mean(np.concatenate([m.reshape(-1) for _, m in norm])))
    log(f"channel mean {np.round(mean, 4).tolist()} std {np.round(std, 4).tolist()}, missing {missing_frac:.4%}")

    rng = np.random.default_rng(args.seed)
    n_train_windows = sum(split - WINDOW + 1 for _ in cells)
    spe = args.steps_per_epoch or max(1, n_train_windows // args.batch_size)

    def sample_batch():
        B = args.batch_size
        ci = rng.integers(0, len(cells), size=B)
        ks = [int(rng.integers(1, len(cells[c][1]) + 1)) for c in ci]
        N = max(ks)
        vals = np.zeros((B, WINDOW, N, F), np.float32)
        msk = np.zeros((B, WINDOW, N, F), np.float32)
        nm = np.zeros((B, N), np.float32)
        for b, (c, k) in enumerate(zip(ci, ks)):
            z, m = norm[c]
            s = int(rng.integers(0, split - WINDOW + 1))
            sel = rng.permutation(z.shape[1])[:k]
            vals[b, :, :k] = z[s : s + WINDOW][:, sel]
            msk[b, :, :k] = m[s : s + WINDOW][:, sel]
            nm[b, :k] = 1.0
        drop = (rng.random(msk.shape) < args.drop).astype(np.float32)
        return vals, msk, nm, drop

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

    @jax.jit
    def train_step(p, s, vals, msk, nm, drop):
        (loss, (main, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, vals, msk, nm, drop)
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
            vals, msk, nm, drop = sample_batch()
            params, opt_state, loss, main, aux = train_step(params, opt_state, vals, msk, nm, drop)
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
    model = build_onnx(params, f"jax {jax.__version__}, onnx {onnx.__version__}")
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
    vals, msk, nm, _ = sample_batch()
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
        for s in range(split, steps - WINDOW + 1, args.calib_stride):
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
    cal_r = np.concatenate([run_ort(cal_v[i : i + 256], cal_m[i : i + 256], cal_nm[i : i + 256])
                            for i in range(0, len(cal_v), 256)])
    cal_j = np.concatenate([np.asarray(fwd(params, cal_v[i : i + 256], cal_m[i : i + 256], cal_nm[i : i + 256]))
                            for i in range(0, len(cal_v), 256)])
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
    s0 = split + 40
    for b, (ci, n_real) in enumerate([(0, 3), (min(1, len(cells) - 1), 2)]):
        raw = cells[ci][2][s0 + 8 * b : s0 + 8 * b + WINDOW, :n_real].copy()
        k = min(n_real, raw.shape[1])
        graw[b, :, :k] = raw[:, :k]
    # some missing entries: early, scored, and one (node, channel) with no observed scored step
    graw[0, 3, 1, 2] = np.nan
    graw[0, 13, 0, 1] = np.nan
    graw[0, WINDOW - SCORED :, 2, 3] = np.nan
    graw[1, 0, 0, :] = np.nan
    graw[1, 14, 1, 0] = np.nan
    # an anomaly in the second window: +4 A on node 1's current in the scored steps
    graw[1, WINDOW - SCORED :, 1, 3] += 4.0
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
    sizes = sorted({len(n) for _, n, _ in cells})
    desc = args.data_description or (
        f"plant CSV {args.data}: normal operation, {len(cells)} cells ({cells[0][0]} .. {cells[-1][0]}) of "
        + "/".join(str(x) for x in sizes)
        + f" nodes, {sum(len(n) for _, n, _ in cells)} nodes, {steps} steps of {cadence} ms "
        f"({steps * cadence / 3.6e6:.2f} h); train = first {args.train_frac:.0%} of the time steps "
        f"({split} steps), calibration = the rest ({steps - split} steps)"
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
                f"held-out last {1 - args.train_frac:.0%} of the time steps; windows of every node of a cell "
                f"(the whole cell), stepping by {args.calib_stride} steps; error_scale[c] = mean squared "
                "forecast error of channel c over all observed scored entries of these windows; quantiles "
                "with numpy's linear interpolation"
            ),
        },
        "scoring": (
            "score = max over (node, channel) of mean over the last scored_steps observed steps of "
            "(reconstruction - values)^2 / error_scale[channel]"
        ),
        "normalisation": (
            "values = (x - channels[c].mean) / channels[c].std, 0 where unobserved (mask 0); padded nodes "
            "have node_mask 0 and are excluded from scoring; inside the graph the last scored_steps steps "
            "of mask and values are zeroed, so the model forecasts them from the first "
            f"{WINDOW - SCORED} steps of every node of the cell"
        ),
        "architecture": {
            "d_model": D_MODEL,
            "heads": HEADS,
            "blocks": BLOCKS,
            "ffn": FFN,
            "params": n_params,
            "description": (
                "embed concat(values*mask, mask) -> Linear(8->32) + learned temporal position embedding "
                "[16,32]; 2 x [temporal MHA over the 16 steps of each node + residual + LayerNorm; spatial "
                "MHA over the nodes at each step (padded nodes masked as keys, bias -1e9) + residual + "
                "LayerNorm; FFN 32->64->32 ReLU + residual + LayerNorm]; Linear(32->4); post-norm, "
                "LayerNorm eps 1e-5"
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
            "loss": (
                f"MSE on observed entries of the last {SCORED} steps (forecast) + {args.aux_weight} x MSE on "
                f"entries of the first {WINDOW - SCORED} steps hidden by {args.drop:.0%} random extra "
                "missingness; random windows, random node subsets (1..cell size) padded to the batch maximum"
            ),
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
    golden = {
        "model": base + ".onnx",
        "onnx_sha256": sha,
        "tolerance": TOL,
        "shape": {"batch": 2, "window_steps": WINDOW, "nodes": g_nodes, "channels": F},
        "notes": (
            "values are normalised with the contract's channel mean/std (0 where mask is 0); raw_values are "
            "the same readings in physical units (null = missing or padding). Item 0: 3 real nodes of one "
            "cell, with missing entries, and node 2's current unobserved on every scored step (excluded, "
            "error null). Item 1: 2 real nodes + 1 padded node (node_mask 0, values/mask 0), node 0 missing "
            "at step 0, and +4 A added to node 1's current on the scored steps (an anomaly). "
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
