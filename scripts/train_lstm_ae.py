#!/usr/bin/env python3
"""Train gridwatch's recurrent baseline, an LSTM autoencoder, and export it to ONNX with the same
interface and model contract as the attention models (scripts/train_model.py), so that the Rust
runtime, the detector and `gridwatch eval` run it unchanged.

What it does
------------
1. Reads a long training CSV (``ts_ms,node_id,cell_id,<channels...>``, normal operation) with
   train_model.py's loader; every cell has its own time axis; the first ``--train-frac`` (80 %)
   of each cell's steps train, the rest calibrates. Channel statistics: the training range's
   mean/std per channel (contract ``"standardisation": "contract"``) or, with
   ``--standardise-per-cell-rows K``, every (cell, node, channel) series standardised with its own
   first K rows (train_model.standardise_per_series; contract ``"per-series-fit"``).
2. Trains, self-supervised, an LSTM autoencoder on single-node windows (the model treats every
   node of a cell independently). ``--mode forecast`` (default): the last ``--scored`` steps are
   hidden from the encoder and forecast by the decoder, the earlier steps are reconstructed
   through the bottleneck. ``--mode masked-channels`` (train_model.py's mode of the same name,
   for --scored = --window as in skab-attention-v1): the graph runs one pass per channel stacked
   on the batch axis, pass c hides channel c on the last ``--scored`` steps, and channel c of the
   output comes from pass c; training runs one random pass per window.
3. Builds the ONNX graph (opset 17, the ``LSTM`` operator) node by node with ``onnx.helper``,
   checks it (onnx.checker full check; ONNX Runtime vs JAX max abs diff < 1e-4 at several
   (batch, nodes) shapes with padding and missing entries; padding invariance; golden vector with
   ORT's graph optimisations on and off); nothing is written unless every check passes.
4. Calibrates exactly as train_model.py does (error_scale[c] = mean squared error of channel c on
   the scored steps of the calibration windows, threshold = 1.25 x p99.9 of the window scores)
   and writes ``<out-prefix>.onnx``, ``.json`` (contract) and ``.golden.json``.

Interface (identical to the attention models)
---------------------------------------------
Inputs (float32): ``values`` [batch, T, nodes, F] standardised, 0 where unobserved;
``mask`` [batch, T, nodes, F] 1 observed / 0 missing; ``node_mask`` [batch, nodes] 1 real /
0 padding. Output: ``reconstruction`` [batch, T, nodes, F].

Architecture
------------
    m = mask * time_keep[T,1,1] * node_mask[:, None, :, None]   # last S steps and padding hidden
                                                                # (masked-channels: F passes, pass c
                                                                #  hides channel c on the last S steps)
    x = concat(values * m, m)                                   # [B, T, N, 2F]
    x -> Transpose/Reshape -> [T, B*N, 2F]                      # every node its own sequence
    _, (h, c) = LSTM_enc(x)                                     # hidden H; (h, c): bottleneck
    y, _ = LSTM_dec(repeat(h, T), initial state (h, c))         # unrolled over the T steps
    reconstruction = Reshape/Transpose(Linear(H -> F)(y))       # [B, T, N, F]

ONNX's LSTM (layout 0: X [seq, batch, input]) uses the gate order (i, o, f, c) and weights
W [num_directions, 4H, input], R [num_directions, 4H, H], B [num_directions, 8H] = (Wb, Rb).
The JAX parameters are kept in exactly that layout (W [4H, in], R [4H, H], one bias b [4H] in
i, o, f, c order), so the export is W[None], R[None], concat(b, 0)[None].

    scripts/train-lstm-models.sh        # both models (SKAB and METR-LA), with the exact commands
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_model as tm  # noqa: E402  (CSV loading, per-series standardisation, shape constants)

OPSET = 17
IR_VERSION = 8
MAX_NODES = 32
TOL = 1e-4


# ----------------------------------------------------------------------------------------
# model (JAX), parameters in ONNX's LSTM layout



def init_params(key, F: int, H: int):
    import jax
    import jax.numpy as jnp

    k = iter(jax.random.split(key, 8))
    lim = 1.0 / math.sqrt(H)

    def lstm(inp):
        b = jnp.zeros((4 * H,), jnp.float32).at[2 * H : 3 * H].set(1.0)  # forget gate (i,o,f,c) bias 1
        return {
            "W": jax.random.uniform(next(k), (4 * H, inp), jnp.float32, -lim, lim),
            "R": jax.random.uniform(next(k), (4 * H, H), jnp.float32, -lim, lim),
            "b": b,
        }

    return {
        "enc": lstm(2 * F),
        "dec": lstm(H),
        "out": {"w": jax.random.normal(next(k), (H, F), jnp.float32) / math.sqrt(H),
                "b": jnp.zeros((F,), jnp.float32)},
    }


def count_params(p) -> int:
    import jax

    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(p)))


def lstm_scan(q, xs, h0, c0):
    """ONNX LSTM semantics (no peepholes, sigmoid/tanh/tanh), xs [T, B, in] -> (ys [T,B,H], h, c)."""
    import jax
    import jax.numpy as jnp

    H = q["R"].shape[1]
    Wt, Rt, b = q["W"].T, q["R"].T, q["b"]

    def step(carry, x):
        h, c = carry
        g = x @ Wt + h @ Rt + b
        i = jax.nn.sigmoid(g[:, :H])
        o = jax.nn.sigmoid(g[:, H : 2 * H])
        f = jax.nn.sigmoid(g[:, 2 * H : 3 * H])
        z = jnp.tanh(g[:, 3 * H :])
        c = f * c + i * z
        h = o * jnp.tanh(c)
        return (h, c), h

    (h, c), ys = jax.lax.scan(step, (h0, c0), xs)
    return ys, h, c




def body(p, v, m):
    """The network on already hidden inputs (v = values * m, m = the visible mask), [B,T,N,F]."""
    import jax.numpy as jnp

    B, T, N, F = v.shape
    H = p["enc"]["R"].shape[1]
    x = jnp.concatenate([v, m], axis=-1)
    x = jnp.transpose(x, (1, 0, 2, 3)).reshape(T, B * N, 2 * F)
    zero = jnp.zeros((B * N, H), x.dtype)
    _, h, c = lstm_scan(p["enc"], x, zero, zero)
    ys, _, _ = lstm_scan(p["dec"], jnp.broadcast_to(h[None], (T, B * N, H)), h, c)
    y = ys @ p["out"]["w"] + p["out"]["b"]  # [T, B*N, F]
    return jnp.transpose(y.reshape(T, B, N, F), (1, 0, 2, 3))


def make_forward(T: int, S: int, mode: str = "forecast"):
    def forward(p, values, mask, node_mask):
        """values, mask [B,T,N,F], node_mask [B,N] -> [B,T,N,F]; mirrors build_onnx() op for op."""
        import jax.numpy as jnp

        B, _, N, F = values.shape
        m = mask * node_mask[:, None, :, None]
        if mode == "forecast":
            m = m * jnp.asarray(tm.time_keep())
            return body(p, values * m, m)
        keeps = tm.pass_keep()
        G = keeps.shape[0]
        m = jnp.concatenate([m * jnp.asarray(keeps[g]) for g in range(G)], axis=0)  # [G*B,T,N,F]
        v = jnp.concatenate([values] * G, axis=0) * m
        y = jnp.transpose(body(p, v, m), (1, 0, 2, 3)).reshape(T, G, B, N, F)
        y = jnp.sum(y * jnp.asarray(tm.pass_select().reshape(1, G, 1, 1, F)), axis=1)  # [T,B,N,F]
        return jnp.transpose(y, (1, 0, 2, 3))

    return forward


def flops_per_node_window(T: int, F: int, H: int) -> dict:
    """Multiply-adds x 2 of the matrix products plus the element-wise work (each add, product,
    sigmoid or tanh counted as 1), per node and window."""
    def lstm_step(inp):
        mm = 2 * 4 * H * (inp + H)
        ew = 4 * H * 2 + 4 * H + 3 * H + 2 * H  # 2 bias/sum adds per gate row, 4H activations, c update, tanh(c)*o
        return mm + ew

    enc = T * lstm_step(2 * F)
    dec = T * lstm_step(H)
    head = T * (2 * H * F + F)
    prep = T * F * 5  # masks, products, concat
    return {"encoder": enc, "decoder": dec, "head": head, "input": prep, "total": enc + dec + head + prep}


# ----------------------------------------------------------------------------------------
# ONNX export


def build_onnx(p, T: int, S: int, F: int, producer: str, graph_name: str, mode: str = "forecast"):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H = int(np.asarray(p["enc"]["R"]).shape[1])
    nodes, inits = [], []
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

    def lstm_weights(q, pname):
        W = param(np.asarray(q["W"])[None], pname + ".W")  # [1, 4H, in], gates i,o,f,c
        R = param(np.asarray(q["R"])[None], pname + ".R")  # [1, 4H, H]
        B = param(np.concatenate([np.asarray(q["b"]), np.zeros(4 * H, np.float32)])[None], pname + ".B")  # [1, 8H]
        return W, R, B

    # hide padded nodes and (forecast) the scored steps or (masked-channels) one channel per pass
    if mode == "forecast":
        keep = const(tm.time_keep(), "time_keep")
        nm4 = op("Unsqueeze", ["node_mask", const([1, 3], "node_mask_axes", np.int64)], prefix="node_mask4")
        m = op("Mul", [op("Mul", ["mask", keep]), nm4], prefix="mask_in")
        v = op("Mul", ["values", m], prefix="values_in")
    else:
        nm4 = op("Unsqueeze", ["node_mask", const([1, 3], "node_mask_axes", np.int64)], prefix="node_mask4")
        m = op("Mul", ["mask", nm4], prefix="mask_real")
        keeps = tm.pass_keep()
        G = keeps.shape[0]
        ms = [op("Mul", [m, const(keeps[g], f"pass{g}_keep")], prefix=f"mask_in{g}") for g in range(G)]
        m = op("Concat", ms, axis=0, prefix="mask_in")  # [G*B,T,N,F]
        v = op("Mul", [op("Concat", ["values"] * G, axis=0), m], prefix="values_in")
    x = op("Concat", [v, m], axis=-1, prefix="x")  # [B',T,N,2F]
    x = op("Transpose", [x], perm=[1, 0, 2, 3])  # [T,B',N,2F]
    x = op("Reshape", [x, const([0, -1, 2 * F], "seq_shape", np.int64)], prefix="x_seq")  # [T,B'*N,2F]

    # encoder: only its final state is used
    W, R, B = lstm_weights(p["enc"], "encoder")
    enc_h, enc_c = name("encoder_h"), name("encoder_c")
    nodes.append(helper.make_node("LSTM", [x, W, R, B], ["", enc_h, enc_c], name="encoder_lstm", hidden_size=H))
    # decoder: the bottleneck h repeated over the T steps, initial state (h, c)
    dec_in = op("Expand", [enc_h, const([T, 1, 1], "repeat_shape", np.int64)], prefix="decoder_in")  # [T,B*N,H]
    W, R, B = lstm_weights(p["dec"], "decoder")
    dec_y = name("decoder_y")
    nodes.append(helper.make_node("LSTM", [dec_in, W, R, B, "", enc_h, enc_c], [dec_y], name="decoder_lstm",
                                  hidden_size=H))
    y = op("Squeeze", [dec_y, const([1], "dir_axis", np.int64)])  # [T,B*N,H]
    y = op("Add", [op("MatMul", [y, param(p["out"]["w"], "head.weight")]), param(p["out"]["b"], "head.bias")],
           prefix="head")  # [T,B*N,F]
    if mode == "forecast":
        shape = op("Concat", [const([T], "t_dim", np.int64), op("Shape", ["node_mask"]),
                              const([F], "f_dim", np.int64)], axis=0, prefix="out_shape")
        y = op("Reshape", [y, shape])  # [T,B,N,F]
    else:
        shape = op("Concat", [const([T, G], "tg_dims", np.int64), op("Shape", ["node_mask"]),
                              const([F], "f_dim", np.int64)], axis=0, prefix="out_shape")
        y = op("Reshape", [y, shape])  # [T,G,B,N,F]
        y = op("Mul", [y, const(tm.pass_select().reshape(1, G, 1, 1, F), "pass_select")])
        y = op("ReduceSum", [y, const([1], "pass_axis", np.int64)], prefix="merge_passes", keepdims=0)
    y = op("Transpose", [y], perm=[1, 0, 2, 3])
    nodes.append(helper.make_node("Identity", [y], ["reconstruction"], name="reconstruction_op"))

    dims4 = ["batch", T, "nodes", F]
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="gridwatch/scripts/train_lstm_ae.py", producer_version=producer)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model



# ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description="Train and export gridwatch's LSTM-autoencoder baseline.")
    ap.add_argument("--data", required=True, help="long CSV ts_ms,node_id,cell_id,<channels...> (normal operation)")
    ap.add_argument("--out-prefix", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--version", default="1")
    ap.add_argument("--units", default=None, help="comma-separated units of the CSV's channels, in header order")
    ap.add_argument("--window", type=int, required=True, help="window_steps")
    ap.add_argument("--scored", type=int, required=True, help="scored_steps (hidden from the encoder, forecast)")
    ap.add_argument("--mode", choices=("forecast", "masked-channels"), default="forecast",
                    help="forecast: the last --scored steps are hidden from the encoder and forecast; "
                         "masked-channels: one pass per channel inside the graph, channel c hidden on the last "
                         "--scored steps and reconstructed from the other channels (train_model.py's modes)")
    ap.add_argument("--hidden", type=int, default=32, help="LSTM hidden size (encoder and decoder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8, help="0: export the untrained model (a smoke test)")
    ap.add_argument("--steps-per-epoch", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=128, help="node-windows per optimizer step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--drop", type=float, default=0.10, help="extra random missingness in training inputs")
    ap.add_argument("--aux-weight", type=float, default=0.2,
                    help="loss weight on the reconstruction of the observed unscored steps")
    ap.add_argument("--train-frac", type=float, default=0.8)
    ap.add_argument("--calib-stride", type=int, default=4)
    ap.add_argument("--max-train-seconds", type=float, default=420.0)
    ap.add_argument("--standardise-per-cell-rows", type=int, default=0, metavar="K",
                    help="standardise every (cell, node, channel) series with its first K rows; 0 = off")
    ap.add_argument("--std-floor-frac", type=float, default=1e-3,
                    help="with --standardise-per-cell-rows: per-series std floor as a fraction of the global std")
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

    T, S, H = args.window, args.scored, args.hidden
    if not 1 <= S <= T or (args.mode == "forecast" and S == T):
        raise SystemExit("--scored must be within 1..--window (forecast mode: --window - 1, the encoder needs a "
                         "visible step)")

    # ---------------- data (train_model's loader; it reads the module's CHANNELS/F)
    names = tm.read_header(args.data)
    if args.units is None:
        units = [tm.KNOWN_UNITS.get(n, "") for n in names]
    else:
        units = [u.strip() for u in args.units.split(",")]
        if len(units) != len(names):
            raise SystemExit(f"--units has {len(units)} entries, the CSV has {len(names)} channels {names}")
    channels = list(zip(names, units))
    F = len(channels)
    tm.configure(channels, T, S, args.mode)
    cadence, cells, rows = tm.load_csv(args.data)
    cell_steps = [a.shape[0] for _, _, a, _ in cells]
    splits = [int(t * args.train_frac) for t in cell_steps]
    max_cell = max(len(n) for _, n, _, _ in cells)
    if max_cell > MAX_NODES:
        raise SystemExit(f"a cell has {max_cell} nodes, more than max_nodes={MAX_NODES}")
    log(f"{args.data}: {rows} rows, {len(cells)} cells of {min(len(n) for _, n, _, _ in cells)}..{max_cell} nodes, "
        f"{sum(cell_steps)} cell steps of {cadence} ms ({min(cell_steps)}..{max(cell_steps)} per cell); "
        f"train steps {sum(splits)}, calibration steps {sum(cell_steps) - sum(splits)}")

    series_stats = None
    if args.standardise_per_cell_rows > 0:
        series_stats, g_std = tm.standardise_per_series(cells, args.standardise_per_cell_rows, args.std_floor_frac)
        mean, std = np.zeros(F), np.ones(F)
        log(f"per-series standardisation with each series' first {args.standardise_per_cell_rows} rows, std floor "
            f"{args.std_floor_frac:g} x global std {np.round(g_std, 4).tolist()}")
    else:
        train_raw = np.concatenate([a[:sp].reshape(-1, F) for (_, _, a, _), sp in zip(cells, splits)])
        mean = np.nanmean(train_raw, axis=0)
        std = np.nanstd(train_raw, axis=0)
        std = np.where(std > 1e-9, std, 1.0)
    norm = []
    for _, _, a, _ in cells:
        obs = ~np.isnan(a)
        norm.append((np.where(obs, (a - mean) / std, 0.0).astype(np.float32), obs.astype(np.float32)))
    log(f"channel mean {np.round(mean, 4).tolist()} std {np.round(std, 4).tolist()}")

    # training samples: (cell, node) series, drawn in proportion to their training windows
    series = [(ci, j) for ci, (_, nodes, _, _) in enumerate(cells) for j in range(len(nodes))]
    weights = np.array([max(0, splits[ci] - T + 1) for ci, _ in series], np.float64)
    if weights.sum() == 0:
        raise SystemExit("no cell has a training range of a whole window")
    series_p = weights / weights.sum()
    rng = np.random.default_rng(args.seed)

    def sample_batch():
        Bn = args.batch_size
        pick = rng.choice(len(series), size=Bn, p=series_p)
        vals = np.zeros((Bn, T, 1, F), np.float32)
        msk = np.zeros((Bn, T, 1, F), np.float32)
        for b, k in enumerate(pick):
            ci, j = series[k]
            s = int(rng.integers(0, splits[ci] - T + 1))
            z, m = norm[ci]
            vals[b, :, 0] = z[s : s + T, j]
            msk[b, :, 0] = m[s : s + T, j]
        nm = np.ones((Bn, 1), np.float32)
        drop = (rng.random(msk.shape) < args.drop).astype(np.float32)
        if args.mode == "forecast":
            return vals, msk, nm, drop
        # masked-channels: each window trains one of the graph's passes (a random channel hidden)
        hide = 1.0 - tm.pass_keep()[rng.integers(0, F, size=Bn)]  # [B,T,1,F]
        return vals, msk, nm, drop, hide

    # ---------------- training
    forward = make_forward(T, S, args.mode)
    passes = 1 if args.mode == "forecast" else F
    params = init_params(jax.random.PRNGKey(args.seed), F, H)
    n_params = count_params(params)
    flops = flops_per_node_window(T, F, H)
    if passes > 1:
        flops = {**{k: v * passes for k, v in flops.items()}, "passes": passes}
    spe = args.steps_per_epoch
    total_steps = max(2, args.epochs * spe)
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(500, total_steps // 10 + 1), total_steps,
                                               args.lr * 0.02)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=args.weight_decay))
    opt_state = opt.init(params)
    scored_sel = jnp.asarray((1.0 - tm.time_keep())[None])  # [1,T,1,1]
    early_sel = 1.0 - scored_sel

    def loss_fn(p, vals, msk, nm, drop):
        m_in = msk * (1.0 - drop)
        recon = forward(p, vals * m_in, m_in, nm)
        err = (recon - vals) ** 2
        real = msk * nm[:, None, :, None]
        w_main = real * scored_sel
        w_aux = real * early_sel
        main = jnp.sum(err * w_main) / jnp.maximum(jnp.sum(w_main), 1.0)
        aux = jnp.sum(err * w_aux) / jnp.maximum(jnp.sum(w_aux), 1.0)
        return main + args.aux_weight * aux, (main, aux)

    def loss_fn_masked(p, vals, msk, nm, drop, hide):
        # one pass of the masked-channels graph per window (nm is all ones: single-node windows)
        m_in = msk * (1.0 - drop) * (1.0 - hide)
        recon = body(p, vals * m_in, m_in)
        err = (recon - vals) ** 2
        w_main = msk * hide
        w_aux = msk * (1.0 - hide)
        main = jnp.sum(err * w_main) / jnp.maximum(jnp.sum(w_main), 1.0)
        aux = jnp.sum(err * w_aux) / jnp.maximum(jnp.sum(w_aux), 1.0)
        return main + args.aux_weight * aux, (main, aux)

    @jax.jit
    def train_step(p, s, vals, msk, nm, drop, *hide):
        fn = loss_fn if args.mode == "forecast" else loss_fn_masked
        (loss, (main, aux)), g = jax.value_and_grad(fn, has_aux=True)(p, vals, msk, nm, drop, *hide)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss, main, aux

    log(f"model: LSTM autoencoder ({args.mode}, {passes} pass(es)), hidden {H}, {n_params} params, {flops['total']:,} FLOPs per node-window; "
        f"training {args.epochs} epochs x {spe} steps, batch {args.batch_size} node-windows")
    t_train = time.time()
    history, epochs_done, stopped_early = [], 0, False
    for epoch in range(args.epochs):
        acc = []
        for _ in range(spe):
            params, opt_state, loss, main, aux = train_step(params, opt_state, *sample_batch())
            acc.append(jnp.stack([loss, main, aux]))
        acc = np.asarray(jnp.mean(jnp.stack(acc), axis=0), np.float64)
        epochs_done += 1
        history.append({"epoch": epoch + 1, "loss": acc[0], "forecast_mse": acc[1], "reconstruction_mse": acc[2]})
        log(f"epoch {epoch + 1:3d}/{args.epochs}: loss {acc[0]:.5f} (forecast {acc[1]:.5f}, "
            f"reconstruction {acc[2]:.5f})")
        if time.time() - t_train > args.max_train_seconds and epoch + 1 < args.epochs:
            log(f"time budget of {args.max_train_seconds:.0f}s used up: stopping after epoch {epoch + 1}")
            stopped_early = True
            break
    train_seconds = time.time() - t_train
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    fwd = jax.jit(forward)

    # ---------------- export + verification
    graph_name = re.sub(r"\W", "_", args.name)
    model = build_onnx(params, T, S, F, f"jax {jax.__version__}, onnx {onnx.__version__}", graph_name, args.mode)
    onnx_bytes = model.SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])

    def run_ort(vals, msk, nm):
        return sess.run(["reconstruction"], {"values": vals, "mask": msk, "node_mask": nm})[0]

    vrng = np.random.default_rng(args.seed + 1)
    max_diff, checks = 0.0, []
    for B, N in [(1, 1), (4, 1), (2, 3), (5, 6), (7, 11), (3, MAX_NODES)]:
        msk = (vrng.random((B, T, N, F)) > 0.15).astype(np.float32)
        nm = np.ones((B, N), np.float32)
        for b in range(B):
            nm[b, int(vrng.integers(1, N + 1)):] = 0.0
        if B > 1 and N > 1:
            nm[-1, :] = 0.0  # one item with every node padded
        msk *= nm[:, None, :, None]
        vals = (vrng.standard_normal((B, T, N, F)) * msk).astype(np.float32)
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

    # padding invariance: 3 extra padded nodes with garbage values (mask 1)
    vals, msk = sample_batch()[:2]
    vals, msk = vals[:16], msk[:16]
    vals = np.concatenate([vals, vals[::-1]], axis=2)  # 2 real nodes per item
    msk = np.concatenate([msk, msk[::-1]], axis=2)
    nm = np.ones((16, 2), np.float32)
    pv = np.concatenate([vals, vrng.standard_normal((16, T, 3, F)).astype(np.float32) * 50], axis=2)
    pm = np.concatenate([msk, np.ones((16, T, 3, F), np.float32)], axis=2)
    pnm = np.concatenate([nm, np.zeros((16, 3), np.float32)], axis=1)
    a = run_ort(vals, msk, nm)
    b_out = run_ort(pv, pm, pnm)
    pad_diff = float(np.max(np.abs(a - b_out[:, :, :2])))
    log(f"verify padding invariance (3 extra garbage padded nodes): max abs diff {pad_diff:.3g}; padded outputs "
        f"finite: {bool(np.all(np.isfinite(b_out)))}")
    if pad_diff >= TOL or not np.all(np.isfinite(b_out)):
        raise SystemExit(f"padded nodes leak into real nodes' outputs ({pad_diff}) or are not finite")

    # ---------------- calibration: held-out last (1 - train_frac) of every cell, whole cells, stride
    cal_v, cal_m, cal_nm = [], [], []
    for ci, (z, m) in enumerate(norm):
        n = z.shape[1]
        for s in range(splits[ci], cell_steps[ci] - T + 1, args.calib_stride):
            v = np.zeros((T, max_cell, F), np.float32)
            mm = np.zeros((T, max_cell, F), np.float32)
            v[:, :n] = z[s : s + T]
            mm[:, :n] = m[s : s + T]
            nmm = np.zeros((max_cell,), np.float32)
            nmm[:n] = 1.0
            cal_v.append(v)
            cal_m.append(mm)
            cal_nm.append(nmm)
    if not cal_v:
        raise SystemExit("no calibration window")
    cal_v, cal_m, cal_nm = np.stack(cal_v), np.stack(cal_m), np.stack(cal_nm)
    cal_r = np.concatenate([run_ort(cal_v[i : i + 256], cal_m[i : i + 256], cal_nm[i : i + 256])
                            for i in range(0, len(cal_v), 256)])
    cal_j = np.concatenate([np.asarray(fwd(params, cal_v[i : i + 256], cal_m[i : i + 256], cal_nm[i : i + 256]))
                            for i in range(0, len(cal_v), 256)])
    cal_diff = float(np.max(np.abs(np.where(cal_nm[:, None, :, None] > 0, cal_r - cal_j, 0.0))))
    log(f"verify ORT vs JAX on {len(cal_v)} calibration windows: max abs diff {cal_diff:.3g}")
    if cal_diff >= TOL:
        raise SystemExit(f"ONNX export does not match JAX on calibration windows: {cal_diff}")
    max_diff = max(max_diff, cal_diff)

    sm = cal_m[:, T - S :] * cal_nm[:, None, :, None]
    sq = (cal_r[:, T - S :].astype(np.float64) - cal_v[:, T - S :]) ** 2
    error_scale = (sq * sm).sum(axis=(0, 1, 2)) / sm.sum(axis=(0, 1, 2))
    _, scores = tm.window_errors(cal_r, cal_v, cal_m, cal_nm, error_scale)
    scores = scores[~np.isnan(scores)]
    qs = {k: float(np.quantile(scores, float(k))) for k in ("0.5", "0.9", "0.99", "0.999")}
    qs["max"] = float(np.max(scores))
    threshold = 1.25 * qs["0.999"]
    log(f"calibration: {len(scores)} windows, error_scale {np.round(error_scale, 5).tolist()}, "
        f"quantiles {({k: round(v, 3) for k, v in qs.items()})}, threshold {threshold:.4f}")

    # ---------------- golden vector: batch 2, nodes 3 (train_model.py's recipe)
    g_nodes = 3
    gv = np.zeros((2, T, g_nodes, F), np.float32)
    gm = np.zeros((2, T, g_nodes, F), np.float32)
    graw = np.full((2, T, g_nodes, F), np.nan)
    gnm = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    cal_cells = [i for i, (t, s) in enumerate(zip(cell_steps, splits)) if t - s >= T]
    g_cells = [i for i in cal_cells if cell_steps[i] >= T + 8] or [i for i in range(len(cells)) if cell_steps[i] >= T + 8]
    if not g_cells:
        raise SystemExit("no cell is long enough for the golden vector")
    g_src = []
    for b, (start, n_real) in enumerate([(0, 3), (min(1, len(g_cells) - 1), 2)]):
        src = []
        for ci in g_cells[start:] + g_cells[:start]:
            src += [(ci, j) for j in range(len(cells[ci][1]))]
        src = src[:n_real]
        g_src.append(src)
        for n, (ci, j) in enumerate(src):
            s0 = max(0, min(splits[ci] + 40, cell_steps[ci] - T - 8))
            graw[b, :, n] = cells[ci][2][s0 + 8 * b : s0 + 8 * b + T, j]
    ac = min(3, F - 1)
    graw[0, 3, 1, min(2, F - 1)] = np.nan
    graw[0, T - 3, 0, min(1, F - 1)] = np.nan
    graw[0, T - S :, 2, ac] = np.nan
    graw[1, 0, 0, :] = np.nan
    graw[1, T - 2, 1, 0] = np.nan
    # the anomaly: node 1's channel ac moved by 4 std on the scored steps (+4 standardised units
    # for per-series models, a drop of 4 std for contract-statistics models, e.g. a speed drop)
    offset = 4.0 * float(std[ac]) * (1.0 if series_stats is not None else -1.0)
    graw[1, T - S :, 1, ac] += offset
    obs = ~np.isnan(graw) & (gnm[:, None, :, None] > 0)
    gv[:] = np.where(obs, (np.nan_to_num(graw) - mean) / std, 0.0)
    gm[:] = obs
    g_recon = run_ort(gv, gm, gnm)
    g_jax = np.asarray(fwd(params, gv, gm, gnm))
    g_diff = float(np.max(np.abs(g_recon - g_jax)))
    if g_diff >= TOL or not np.all(np.isfinite(g_recon)):
        raise SystemExit(f"golden vector: ORT vs JAX diff {g_diff}")
    so0 = ort.SessionOptions()
    so0.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess0 = ort.InferenceSession(onnx_bytes, so0, providers=["CPUExecutionProvider"])
    g_plain = sess0.run(["reconstruction"], {"values": gv, "mask": gm, "node_mask": gnm})[0]
    g_opt_diff = float(np.max(np.abs(g_recon - g_plain)))
    if g_opt_diff >= TOL:
        raise SystemExit(f"golden vector: ORT optimised vs unoptimised graph differ by {g_opt_diff}")
    g_e, g_score = tm.window_errors(g_recon, gv, gm, gnm, error_scale)
    log(f"golden: scores {np.round(g_score, 4).tolist()} (threshold {threshold:.4f}), ORT vs JAX {g_diff:.3g}, "
        f"ORT all vs no graph optimisations {g_opt_diff:.3g}")

    # ---------------- write
    prefix = args.out_prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
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
    n_nodes = sum(len(n) for _, n, _, _ in cells)
    desc = args.data_description or (
        f"CSV {args.data}: normal operation, {len(cells)} cells ({cells[0][0]} .. {cells[-1][0]}) of "
        f"{'/'.join(str(x) for x in sizes) if len(sizes) <= 4 else f'{sizes[0]}..{sizes[-1]}'} nodes, {n_nodes} nodes, "
        f"each cell on its own time axis of {cadence} ms steps ({min(cell_steps)}..{max(cell_steps)} steps per cell, "
        f"{sum(cell_steps)} in all, {sum(cell_steps) * cadence / 3.6e6:.2f} h); train = the first "
        f"{args.train_frac:.0%} of every cell's time steps, calibration = the rest of each cell "
        f"({sum(splits)} train steps, {sum(cell_steps) - sum(splits)} calibration steps)"
    )
    if args.mode == "forecast":
        hiding = (f"inside the graph the last scored_steps steps of mask and values (and padded nodes, node_mask 0) "
                  f"are zeroed before the encoder, so the model forecasts them from the first {T - S} steps of the "
                  "same node (every node is its own sequence: no information flows between nodes)")
        loss_desc = (f"MSE on observed entries of the last {S} steps (the forecast) + {args.aux_weight} x MSE on the "
                     f"observed entries of the first {T - S} steps (the reconstruction through the bottleneck); "
                     f"inputs with {args.drop:.0%} random extra missingness; random windows of random (cell, node) "
                     "series, drawn in proportion to their training windows")
        arch_in = ""
    else:
        own = f"from its own first {T - S} steps and " if S < T else ""
        hiding = (f"inside the graph the window is run as {F} passes stacked on the batch axis; pass c zeroes mask "
                  "and values of channel c on the last scored_steps steps (and of padded nodes, node_mask 0), and "
                  "reconstruction[..., c] is pass c's output for channel c, so every channel is predicted on the "
                  f"scored steps {own}from all other channels of the same node (every node is its own sequence: no "
                  "information flows between nodes)")
        loss_desc = (f"MSE on the hidden entries (one random channel per window hidden on the last {S} steps: one "
                     f"pass of the graph) + {args.aux_weight} x MSE on the other observed entries (their "
                     f"reconstruction through the bottleneck); inputs with {args.drop:.0%} random extra missingness; "
                     "random windows of random (cell, node) series, drawn in proportion to their training windows")
        arch_in = (f"masked-channels: {F} passes (batch x {F}) with per-pass input masks, merged per channel after "
                   "the head (Reshape + Mul + ReduceSum); ")
    normalisation_desc = (
        "values = (x - channels[c].mean) / channels[c].std, 0 where unobserved (mask 0); padded nodes have "
        f"node_mask 0 and are excluded from scoring; {hiding}"
    )
    if series_stats is not None:
        normalisation_desc = (
            f"per series: every (cell, node, channel) series is standardised with the mean and std of its own first "
            f"{args.standardise_per_cell_rows} rows (std floored at {args.std_floor_frac:g} x the channel's global std "
            "in training); channels[c].mean/std are the identity (0/1). " + normalisation_desc
        )
    final = history[-1] if history else {"loss": float("nan"), "forecast_mse": float("nan"),
                                         "reconstruction_mse": float("nan")}
    hidden_part = (f"the last {S} steps" if args.mode == "forecast" else f"the pass's channel on the last {S} steps")
    contract = {
        "name": args.name,
        "version": args.version,
        "onnx_file": base + ".onnx",
        "onnx_sha256": sha,
        "family": "lstm-autoencoder",
        "inputs": [
            {"name": "values", "shape": ["batch", T, "nodes", F]},
            {"name": "mask", "shape": ["batch", T, "nodes", F]},
            {"name": "node_mask", "shape": ["batch", "nodes"]},
        ],
        "outputs": [{"name": "reconstruction", "shape": ["batch", T, "nodes", F]}],
        "cadence_ms": cadence,
        "window_steps": T,
        "scored_steps": S,
        "max_nodes": MAX_NODES,
        "channels": [{"name": n, "unit": u, "mean": float(mean[i]), "std": float(std[i])}
                     for i, (n, u) in enumerate(channels)],
        "calibration": {
            "error_scale": [float(x) for x in error_scale],
            "threshold": float(threshold),
            "score_quantiles": qs,
            "windows": int(len(scores)),
            "rule": "threshold = 1.25 x p99.9 of calibration scores",
            "method": (
                f"held-out last {1 - args.train_frac:.0%} of every cell's time steps; windows of every node of a "
                f"cell (the whole cell), stepping by {args.calib_stride} steps; error_scale[c] = mean squared "
                f"{'forecast' if args.mode == 'forecast' else 'prediction'} error of channel c over all observed scored entries of these windows; quantiles with "
                "numpy's linear interpolation"
            ),
        },
        "scoring": (
            "score = max over (node, channel) of mean over the last scored_steps observed steps of "
            "(reconstruction - values)^2 / error_scale[channel]"
        ),
        "standardisation": "per-series-fit" if series_stats is not None else "contract",
        "normalisation": normalisation_desc,
        "architecture": {
            "hidden": H,
            "layers": {"encoder": 1, "decoder": 1},
            "params": n_params,
            "flops_per_node_window": flops,
            "description": (
                f"{arch_in}every node its own sequence (nodes folded into the batch: [batch*nodes, {T}, {2 * F}]); input "
                f"concat(values*mask, mask) with {hidden_part} and padded nodes zeroed; encoder LSTM({2 * F}->{H}) "
                f"over the {T} steps, its final state (h, c) is the bottleneck; decoder LSTM({H}->{H}) unrolled over "
                f"the {T} steps with h repeated as its input and (h, c) as its initial state; Linear({H}->{F}) per "
                "step. ONNX LSTM operator (opset 17, forward, gates i,o,f,c, sigmoid/tanh/tanh, no peepholes), "
                "Transpose/Reshape/Expand/Squeeze around it"
            ),
        },
        "training": {
            "data": desc,
            "rows": int(rows),
            "cells": len(cells),
            "time_axis": "per cell (own t0 and step count); windows never cross cells",
            "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "epochs": epochs_done,
            "steps_per_epoch": spe,
            "batch_size": args.batch_size,
            "batch_unit": "single-node windows (the model has no cross-node path)",
            "seed": args.seed,
            "final_loss": float(final["loss"]),
            "final_forecast_mse": float(final["forecast_mse"]),
            "final_reconstruction_mse": float(final["reconstruction_mse"]),
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
                "calibration_ort_vs_jax_max_abs_diff": cal_diff,
                "padding_invariance_max_abs_diff": pad_diff,
                "golden_ort_optimised_vs_unoptimised_max_abs_diff": g_opt_diff,
                "checks": checks,
            },
        },
    }
    if args.mode != "forecast":
        contract["architecture"]["mode"] = args.mode
        contract["architecture"]["passes"] = passes
        contract["training"]["mode"] = args.mode
    if series_stats is not None:
        contract["training"]["standardisation"] = {
            "kind": "per-series-fit",
            "fit_rows": args.standardise_per_cell_rows,
            "series": "(cell, node, channel)",
            "statistics": "mean and std (ddof 0) of the series' readings in its first fit_rows rows "
                          "(a row = a time step with any reading of that node)",
            "std_floor": [float(x) for x in args.std_floor_frac * g_std],
            "std_floor_rule": f"{args.std_floor_frac:g} x the channel's std over all training CSV readings",
        }
    else:
        contract["training"]["standardisation"] = {
            "kind": "contract",
            "statistics": "channels[c].mean/std: mean and std (ddof 0) of channel c over the training range's "
                          "readings",
        }

    ac_name, ac_unit = channels[ac]
    multi = any(len({ci for ci, _ in src}) > 1 for src in g_src)
    nodes_of = "nodes taken from several cells (a numerical test only)" if multi else "nodes of one cell"
    if series_stats is not None:
        raw_note = ("raw_values are the per-series standardised readings (the contract's channel stats are the "
                    "identity; series_mean/series_std [b][n][c] give each node's series statistics, physical = "
                    "raw * std + mean) (null = missing or padding)")
    else:
        raw_note = "raw_values are the same readings in physical units (null = missing or padding)"
    off_txt = f"{offset:+.4g}" + (f" {ac_unit}" if ac_unit else "")
    golden = {
        "model": base + ".onnx",
        "onnx_sha256": sha,
        "tolerance": TOL,
        "shape": {"batch": 2, "window_steps": T, "nodes": g_nodes, "channels": F},
        "notes": (
            f"values are normalised with the contract's channel mean/std (0 where mask is 0); {raw_note}. "
            f"Item 0: 3 real {nodes_of}, with missing entries, and node 2's {ac_name} unobserved on every scored "
            "step (excluded, error null). Item 1: 2 real nodes + 1 padded node (node_mask 0, values/mask 0), node 0 "
            f"missing at step 0, and {off_txt} (4 std) added to node 1's {ac_name} on the scored steps (an anomaly). "
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
