"""Probe of the flow heads during training (issue 13: heads at the paper's learning rate).

Runs ``run_training`` with preset overrides given as ``key=value`` (JSON values) and,
after every epoch, measures on a fixed batch of 256 training images:
|z|, max |s| and R(Z) of each head, the spread of log|det J| over samples, |y| of
each head, and the norm of each head's DML gradient with respect to z.
Appends one JSON line per epoch to ``--probe-out`` and the final metrics at the end.

    python results/omniglot-head-lr/probe.py --probe-out P.jsonl epochs=6 head_lr_multiplier=1.0 ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from detreg_keras.model import l2_normalize, normalize_head_input  # noqa: E402
from detreg_keras.regularizers import determinant_regularizer  # noqa: E402
from detreg_keras.training import load_splits, make_evaluation_data, resolve_config, run_training  # noqa: E402


class Probe(keras.callbacks.Callback):
    def __init__(self, images, labels, path):
        super().__init__()
        self.images, self.labels, self.path = images, labels, path

    def measure(self, epoch):
        m = self.model
        row = {"epoch": epoch}
        with tf.GradientTape(persistent=True) as tape:
            z = m.embed_features(self.images, training=False)
            tape.watch(z)
            heads = [("min", m.flow_min, m.loss_min), ("max", m.flow_max, m.loss_max)]
            outs = {}
            h = normalize_head_input(z, m.head_input_norm)
            for name, flow, loss in heads:
                if flow is None:
                    continue
                y, log_diag = flow.forward_with_log_diag(h)
                outs[name] = (y, log_diag, loss(l2_normalize(y), self.labels))
                # distance from the identity: relative change of the input and cosine(y, input)
                row[f"rel_change_{name}"] = float(tf.reduce_mean(tf.norm(y - h, axis=1) / tf.norm(h, axis=1)))
                row[f"cos_in_out_{name}"] = float(tf.reduce_mean(tf.reduce_sum(l2_normalize(y) * l2_normalize(h), 1)))
        row["z_norm"] = float(tf.reduce_mean(tf.norm(z, axis=1)))
        for name, (y, log_diag, dml) in outs.items():
            g = tape.gradient(dml, z)
            logdet = tf.reduce_sum(log_diag, axis=[1, 2])
            row.update({
                f"max_s_{name}": float(tf.reduce_max(tf.abs(log_diag))),
                f"mean_abs_s_{name}": float(tf.reduce_mean(tf.abs(log_diag))) * 2.0,  # over the transformed half
                f"R_{name}": float(determinant_regularizer(log_diag)),
                f"logdet_spread_{name}": float(tf.reduce_max(logdet) - tf.reduce_min(logdet)),
                f"logdet_mean_{name}": float(tf.reduce_mean(logdet)),
                f"y_norm_{name}": float(tf.reduce_mean(tf.norm(y, axis=1))),
                f"grad_z_{name}": float(tf.norm(g)),
                f"dml_{name}": float(dml),
            })
        del tape
        return row

    def on_train_begin(self, logs=None):
        self.t0 = time.time()
        self._write(self.measure(0))

    def on_epoch_end(self, epoch, logs=None):
        row = self.measure(epoch + 1)
        row.update({k: float(v) for k, v in (logs or {}).items()})
        row["wall_s"] = time.time() - self.t0
        self._write(row)

    def _write(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("PROBE", json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--probe-out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.overrides:
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    overrides.setdefault("verbose", 0)
    cfg = resolve_config("omniglot", **overrides)
    t0 = time.time()
    splits, _ = load_splits(cfg)
    ds, _ = make_evaluation_data(splits.train, cfg)
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy()); labels.append(y.numpy())
        if sum(len(a) for a in images) >= 2048:
            break
    images, labels = np.concatenate(images), np.concatenate(labels)
    idx = np.random.default_rng(0).choice(len(images), 256, replace=False)
    probe = Probe(tf.constant(images[idx]), tf.constant(labels[idx]), args.probe_out)
    out = run_training(cfg, callbacks=[probe])
    met = {k: v for k, v in out["metrics"].items() if isinstance(v, (int, float))}
    row = {"final": True, "overrides": overrides, "run_dir": out["run_dir"], "wall_s": time.time() - t0, **met}
    with open(args.probe_out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print("FINAL", json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
