#!/usr/bin/env python
"""Train-step cost of the DReg flow heads: ``DRegModel`` with vs without them, side by side.

Contenders, per setting, built from the same seed (same backbone and embedding
initialisation) and timed in the same process:

* ``dreg``: the default DReg model -- ``flow="realnvp"``, 12 couplings per head,
  dueling heads, between-sample augmentation (epsilon 0.4), lambda 0.05 / 0.05;
* ``plain``: ``flow="none"``, plain Proxy Anchor on the same backbone and embedding.

Settings (``--settings``):

* ``resnet50``: ResNet50 (``backbone_weights=None``, frozen BN) at 224x224,
  embedding 512, coupling hidden width 512 -- the paper's recipe (the ``cub200``
  preset of :mod:`detreg_keras.training` with ``backbone="resnet50"``); batch 16
  by default; target ratio <= 1.03.
* ``small_cnn``: the library's small CNN (widths 32-64-128, embedding 128, hidden
  128: the ``TrainConfig`` defaults for ``small_cnn``) on 3-channel 64x64
  images; batch 64 by default; target ratio <= 1.15.

The models are built and compiled exactly as :func:`detreg_keras.training.run_training`
does (:func:`~detreg_keras.training.build_model` on a resolved ``TrainConfig``,
``model.compile(optimizer=make_run_optimizer(...))`` with the preset's learning rates,
weight decay and linear decay; no warm-up epoch, so that every step is a
full-backbone step as in the bulk of a run).

What is timed: the real Keras training step. ``model.make_train_function()``
builds the same ``tf.function`` that ``model.fit`` runs (``train_step`` -- forward,
Eq. 11, finite checks, gradients, ``GroupAdamW`` update, metric trackers), and it is
called with an iterator over ``tf.data.Dataset.from_tensors(batch).repeat()``, as
``fit`` calls it with its own data iterator. The fixed, already materialised batch
keeps the input pipeline out of the measurement (``bench/bench_tfdata.py`` measures
it), and calling the function directly avoids ``fit``'s per-epoch setup and
callbacks, which would blur a handful of steps. The first call (the trace) and
``--warmup`` further steps are not timed.

Each round times one sample of every contender (``--steps`` consecutive steps per
sample; the per-step time is the sample's mean), the order rotating every round so
that load from other processes hits both alike. Reported: median step time, the
ratio of medians dreg/plain, the median of the per-round paired ratios, and the
same two ratios on process CPU time (less sensitive to other processes' load).

FLOP efficiency: the FLOPs of one train step are counted by TensorFlow's profiler
(``tf.compat.v1.profiler``, float_operation) on the graph of ``model.train_step``
traced with the benchmark's static batch shape (Conv2D and its two backprop ops,
MatMul, and the element-wise ops that have a registered FLOP count), cross-checked
against the analytic estimate ``3 x forward`` (forward, input gradients, weight
gradients) with ResNet-50 v1 at 224 = 3.8 G multiply-adds = 7.6 GFLOP per image
(He et al. 2016; the 4.1 G often quoted is torchvision's v1.5, which moves the
stride into the 3x3 conv; Keras Applications' ResNet50 is v1), and against the
profiler's count of the forward ``embed_features`` graph. FLOPs / median step time
is compared with a float32 matmul peak measured in every round of the same run
(``tf.linalg.matmul`` of two ``--matmul-size`` squares in a ``tf.function``, and
numpy's ``matmul``) and, when given, with a nominal peak (``--nominal-peak``: it
depends on the CPU's cores, clock and FMA width, so there is no default). The CPU
(model, family, vector-ISA flags, ``detreg_keras.cpu.cpu_info``) and whether
TensorFlow runs oneDNN go into the printed ``env`` line and the JSON.

Duration on the project's 2-core VM: about 5 min for ``resnet50`` (traces of about
45 s and 25 s, about 30 s of FLOP-count traces, 5 rounds of two ~7 s steps and two
~2 s matmul probes) and about 4 min for ``small_cnn``; longer under load.

    python bench/bench_train_step.py                                  # both settings, defaults
    python bench/bench_train_step.py --settings resnet50 --batch-size 16 --reps 7 --json train_step.json
    python bench/bench_train_step.py --settings small_cnn --reps 2 --batch-size 8    # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

#: Per-setting defaults; ``preset`` / ``overrides`` feed :func:`detreg_keras.training.resolve_config`.
SETTINGS: dict[str, dict[str, Any]] = {
    "resnet50": {
        "preset": "cub200",
        "overrides": {"backbone": "resnet50", "backbone_weights": None, "image_size": 224, "channels": 3,
                      "embedding_dim": 512, "hidden_units": 512},
        "batch_size": 16,
        "reps": 5,
        "steps": 1,
        "target": 1.03,
        # ResNet-50 v1 at 224: 3.8 G multiply-adds per image (He et al. 2016, Table 1), 2 FLOPs
        # each. Keras Applications' ResNet50 is this original v1 (stride 2 in the first 1x1 conv
        # of a stage); torchvision's "v1.5" (stride in the 3x3) is the often-quoted 4.1 G.
        "analytic_forward_gflop_224": 2 * 3.8,
    },
    "small_cnn": {
        "preset": "digits",
        "overrides": {"backbone": "small_cnn", "backbone_weights": None, "image_size": 64, "channels": 3,
                      "cnn_widths": (32, 64, 128), "embedding_dim": 128, "hidden_units": 128},
        "batch_size": 64,
        "reps": 10,
        "steps": 3,
        "target": 1.15,
        "analytic_forward_gflop_224": None,
    },
}
CONTENDERS = ("dreg", "plain")
SAMPLES_PER_CLASS = 4
NUM_CLASSES = 100  # CUB-200's training classes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--batch-size", type=int, default=None,
                   help="for every setting (default: resnet50 16, small_cnn 64)")
    p.add_argument("--reps", type=int, default=None,
                   help="interleaved rounds per setting (default: resnet50 5, small_cnn 10)")
    p.add_argument("--steps", type=int, default=None,
                   help="train steps per timed sample (default: resnet50 1, small_cnn 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender after the trace")
    p.add_argument("--image-size", type=int, default=None, help="override the image size of every setting")
    p.add_argument("--embedding-dim", type=int, default=None, help="override the embedding dim of every setting")
    p.add_argument("--hidden-units", type=int, default=None, help="override the coupling hidden width")
    p.add_argument("--num-couplings", type=int, default=12, help="couplings per flow head (paper: 12)")
    p.add_argument("--cnn-widths", type=int, nargs="+", default=None, help="small_cnn conv widths")
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the matmul peak probe; 0: no probe")
    p.add_argument("--nominal-peak", type=float, default=None,
                   help="nominal fp32 peak of this CPU, GFLOP/s (optional: it depends on the CPU; the measured "
                        "matmul peak is always reported)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (saves one trace per contender)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results as JSON")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- helpers


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def setting_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The resolved parameters of one setting (defaults overridden by the flags)."""
    spec = SETTINGS[name]
    overrides = dict(spec["overrides"])
    for key in ("image_size", "embedding_dim", "hidden_units"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.cnn_widths is not None and overrides["backbone"] == "small_cnn":
        overrides["cnn_widths"] = tuple(args.cnn_widths)
    overrides["num_couplings"] = args.num_couplings
    batch = args.batch_size or spec["batch_size"]
    if batch < 2 * SAMPLES_PER_CLASS or batch % SAMPLES_PER_CLASS:
        raise ValueError(
            f"--batch-size must be a multiple of {SAMPLES_PER_CLASS} and >= {2 * SAMPLES_PER_CLASS}, got {batch}."
        )
    return {
        "preset": spec["preset"],
        "overrides": overrides,
        "batch_size": batch,
        "reps": args.reps or spec["reps"],
        "steps": args.steps or spec["steps"],
        "target": spec["target"],
        "analytic_forward_gflop": (
            None if spec["analytic_forward_gflop_224"] is None
            else spec["analytic_forward_gflop_224"] * (overrides["image_size"] / 224.0) ** 2
        ),
    }


def build_compiled_model(setting: dict[str, Any], flow: str, seed: int, total_steps: int = 10_000):
    """A ``DRegModel`` built and compiled as :func:`detreg_keras.training.run_training` does.

    Args:
        setting: from :func:`setting_config`.
        flow: ``"realnvp"`` (DReg) or ``"none"`` (plain Proxy Anchor).
        seed: ``keras.utils.set_random_seed`` before building (same backbone init for both).
        total_steps: length of the linear learning-rate decay.

    Returns:
        ``(model, cfg)``: the compiled model (optimizer built) and its ``TrainConfig``.
    """
    import keras

    from detreg_keras.training import build_model, make_run_optimizer, resolve_config

    cfg = resolve_config(
        setting["preset"], **setting["overrides"], flow=flow, batch_size=setting["batch_size"], warmup_epochs=0,
        seed=seed,
    )
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg, NUM_CLASSES)
    model.build((None, cfg.image_size, cfg.image_size, cfg.channels))
    model.compile(optimizer=make_run_optimizer(cfg, max(total_steps // max(cfg.epochs, 1), 1)))  # as run_training
    model.optimizer.build(model.trainable_variables)  # what fit's symbolic build does before the first step
    return model, cfg


def fixed_batch(batch: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw-pixel images in [0, 255] and m-per-class labels (``SAMPLES_PER_CLASS`` per class)."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 255.0, size=(batch, size, size, channels)).astype(np.float32)
    classes = rng.choice(NUM_CLASSES, size=batch // SAMPLES_PER_CLASS, replace=False)
    labels = np.repeat(classes, SAMPLES_PER_CLASS).astype(np.int64)
    return images, labels


def make_step_runner(model, images: np.ndarray, labels: np.ndarray) -> Callable[[int], float]:
    """``run(n)`` runs ``n`` real train steps (``model.train_function``) and returns the last loss."""
    import tensorflow as tf

    model.make_train_function()
    iterator = iter(tf.data.Dataset.from_tensors((images, labels)).repeat())
    train_function = model.train_function

    def run(n: int) -> float:
        logs = None
        for _ in range(n):
            logs = train_function(iterator)
        return float(logs["loss"])  # host sync (TF CPU kernels are synchronous anyway)

    return run


def count_flops(graph) -> dict[str, float]:
    """Float operations of a graph by op type (TF profiler, static shapes).

    The profiler's ``scope`` view holds one node per graph op (nested by name
    scope) with that op's own ``float_ops``; they are summed by op type.

    Returns:
        ``{"total": flops, op_type: flops, ...}`` (op types with 0 FLOPs omitted).
    """
    import tensorflow as tf

    profiler = tf.compat.v1.profiler
    opts = profiler.ProfileOptionBuilder(profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
    report = profiler.profile(graph=graph, cmd="scope", options=opts)
    by_type: dict[str, float] = {}
    stack = list(report.children)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.float_ops:
            try:
                op_type = graph.get_operation_by_name(node.name).type
            except (KeyError, ValueError):
                op_type = "other"
            by_type[op_type] = by_type.get(op_type, 0.0) + float(node.float_ops)
    out = {"total": float(report.total_float_ops)}
    out.update(by_type)
    return out


def train_step_flops(model, batch: int, size: int, channels: int) -> dict[str, Any]:
    """FLOPs of one ``train_step`` and of the forward ``embed_features`` at a static batch shape."""
    import tensorflow as tf

    x_spec = tf.TensorSpec([batch, size, size, channels], tf.float32)
    y_spec = tf.TensorSpec([batch], tf.int64)
    step_graph = tf.function(model.train_step).get_concrete_function((x_spec, y_spec)).graph
    fwd_graph = tf.function(lambda x: model.embed_features(x, training=True)).get_concrete_function(x_spec).graph
    step = count_flops(step_graph)
    forward = count_flops(fwd_graph)
    conv_fwd = step.get("Conv2D", 0.0)
    conv_bwd = step.get("Conv2DBackpropInput", 0.0) + step.get("Conv2DBackpropFilter", 0.0)
    return {
        "train_step_flops": step["total"],
        "forward_flops": forward["total"],
        "train_over_forward": _ratio(step["total"], forward["total"]),
        "conv_backward_over_forward": _ratio(conv_bwd, conv_fwd),
        "by_op": {k: v for k, v in sorted(step.items(), key=lambda kv: -kv[1]) if k != "total"},
    }


def make_matmul_probes(n: int) -> dict[str, Callable[[], None]]:
    """fp32 ``n x n`` matmul probes: TensorFlow (``tf.function``) and numpy."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    c_np = np.empty((n, n), np.float32)
    a_tf, b_tf = tf.constant(a_np), tf.constant(b_np)
    # Reduced to a scalar in the graph (n^2 adds, < 0.1% of the 2 n^3 FLOPs) so that no
    # n x n result is copied out, and no optimizer can drop any part of the product.
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.linalg.matmul(a, b)))

    def tf_probe() -> None:
        matmul(a_tf, b_tf).numpy()

    def np_probe() -> None:
        np.matmul(a_np, b_np, out=c_np)

    tf_probe()
    np_probe()
    return {"matmul_tf": tf_probe, "matmul_numpy": np_probe}


# ----------------------------------------------------------------------------- benchmark


def bench_setting(name: str, args: argparse.Namespace, probes: dict[str, Callable[[], None]]) -> dict[str, Any]:
    """Builds both contenders of one setting, interleaves them and returns the results row."""
    setting = setting_config(name, args)
    batch, steps, reps = setting["batch_size"], setting["steps"], setting["reps"]
    size, channels = setting["overrides"]["image_size"], setting["overrides"]["channels"]
    images, labels = fixed_batch(batch, size, channels, args.seed)
    print(f"[{name}] batch {batch}, {size}x{size}, {reps} rounds x {steps} step(s), load {os.getloadavg()[0]:.1f}",
          flush=True)

    # Build both models first: keras.utils.set_random_seed (tf.random.set_seed) after a
    # function's trace makes its next call trace again, which must not land in a timed round.
    models, build_s = {}, {}
    for contender in CONTENDERS:
        t0 = time.perf_counter()
        models[contender] = build_compiled_model(setting, "realnvp" if contender == "dreg" else "none", args.seed)
        build_s[contender] = time.perf_counter() - t0
    runners, info = {}, {}
    for contender in CONTENDERS:
        model, cfg = models[contender]
        run = make_step_runner(model, images, labels)
        t0 = time.perf_counter()
        loss = run(1)  # trace + first step
        trace_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if args.warmup:
            loss = run(args.warmup)
        warm_s = (time.perf_counter() - t0) / max(args.warmup, 1)
        flops = None if args.no_flops else train_step_flops(model, batch, size, channels)
        runners[contender] = run
        info[contender] = {
            "params": int(sum(int(np.prod(v.shape)) for v in model.trainable_variables)),
            "trainable_variables": len(model.trainable_variables),
            "build_s": build_s[contender], "trace_and_first_step_s": trace_s, "warmup_step_s": warm_s,
            "loss_after_warmup": loss, "jit_compile": bool(model.jit_compile), "flops": flops,
        }
        print(f"[{name}] {contender}: built {build_s[contender]:.1f} s, trace+step {trace_s:.1f} s, "
              f"warm step {warm_s:.2f} s, {info[contender]['trainable_variables']} variables"
              + ("" if flops is None else f", {flops['train_step_flops'] / 1e9:.1f} GFLOP/step"), flush=True)
    cfg_dict = models["dreg"][1].to_dict()
    times = {c: [] for c in CONTENDERS}
    cpu = {c: [] for c in CONTENDERS}
    probe_s = {p: [] for p in probes}
    loads = []
    for rep in range(reps):
        order = list(CONTENDERS[rep % 2:] + CONTENDERS[: rep % 2])
        for contender in order:
            c, t = time.process_time(), time.perf_counter()
            loss = runners[contender](steps)
            times[contender].append((time.perf_counter() - t) / steps)
            cpu[contender].append((time.process_time() - c) / steps)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{name}/{contender}: non-finite loss {loss} in round {rep}")
        for probe, fn in probes.items():
            t = time.perf_counter()
            fn()
            probe_s[probe].append(time.perf_counter() - t)
        loads.append(os.getloadavg()[0])
        print(f"[{name}] round {rep + 1}/{reps} ({'/'.join(order)}): "
              + " | ".join(f"{c} {times[c][-1] * 1e3:.0f} ms" for c in CONTENDERS)
              + f" | ratio {times['dreg'][-1] / times['plain'][-1]:.3f} | load {loads[-1]:.1f}", flush=True)

    med = {c: float(np.median(v)) for c, v in times.items()}
    cpu_med = {c: float(np.median(v)) for c, v in cpu.items()}
    paired = np.array(times["dreg"]) / np.array(times["plain"])
    paired_cpu = np.array(cpu["dreg"]) / np.array(cpu["plain"])
    row: dict[str, Any] = {
        "setting": name,
        "batch_size": batch, "image_size": size, "reps": reps, "steps_per_sample": steps,
        "config": {k: cfg_dict[k] for k in ("backbone", "embedding_dim", "num_couplings", "hidden_units", "dueling",
                                            "lambda_min", "lambda_max", "epsilon", "learning_rate", "cnn_widths")},
        "median_step_ms": {c: med[c] * 1e3 for c in CONTENDERS},
        "min_step_ms": {c: float(np.min(v)) * 1e3 for c, v in times.items()},
        "cpu_median_step_ms": {c: cpu_med[c] * 1e3 for c in CONTENDERS},
        "step_ms": {c: [t * 1e3 for t in v] for c, v in times.items()},
        "ratio_of_medians": _ratio(med["dreg"], med["plain"]),
        "paired_ratio_median": float(np.median(paired)),
        "paired_ratios": [float(r) for r in paired],
        "cpu_ratio_of_medians": _ratio(cpu_med["dreg"], cpu_med["plain"]),
        "cpu_paired_ratio_median": float(np.median(paired_cpu)),
        "target_ratio": setting["target"],
        "load_avg": float(np.median(loads)),
        "contenders": info,
    }
    row["meets_target"] = bool(row["paired_ratio_median"] <= setting["target"])
    if probes:
        n = args.matmul_size
        row["matmul_peak_gflops"] = {
            p: {"median": 2 * n**3 / float(np.median(v)) / 1e9, "max": 2 * n**3 / float(np.min(v)) / 1e9}
            for p, v in probe_s.items()
        }
    if not args.no_flops:
        row["flop_efficiency"] = flop_efficiency(row, setting, args)
    return row


def flop_efficiency(row: dict[str, Any], setting: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Achieved GFLOP/s of each contender's train step and its share of the nominal and measured peaks."""
    out: dict[str, Any] = {}
    batch = row["batch_size"]
    for contender in CONTENDERS:
        flops = row["contenders"][contender]["flops"]
        step_s = row["median_step_ms"][contender] / 1e3
        gflops = flops["train_step_flops"] / step_s / 1e9
        entry = {
            "train_step_gflop": flops["train_step_flops"] / 1e9,
            "forward_gflop_per_image": flops["forward_flops"] / batch / 1e9,
            "analytic_forward_gflop_per_image": setting["analytic_forward_gflop"],
            "analytic_train_step_gflop": (
                None if setting["analytic_forward_gflop"] is None else 3 * setting["analytic_forward_gflop"] * batch
            ),
            "achieved_gflops": gflops,
            "pct_of_nominal_peak": None if args.nominal_peak is None else 100 * gflops / args.nominal_peak,
        }
        for probe, peak in row.get("matmul_peak_gflops", {}).items():
            entry[f"pct_of_{probe}_median"] = 100 * gflops / peak["median"]
            entry[f"pct_of_{probe}_max"] = 100 * gflops / peak["max"]
        out[contender] = entry
    out["flop_ratio_dreg_over_plain"] = _ratio(
        out["dreg"]["train_step_gflop"], out["plain"]["train_step_gflop"]
    )
    return out


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Markdown tables of the step times, the ratios and the FLOP efficiency."""
    print("\n| setting | batch | contender | median step (ms) | min step (ms) | CPU per step (ms) | "
          "dreg/plain: ratio of medians | median of paired ratios | CPU-time ratio | target | met | load avg |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in results:
        for c in CONTENDERS:
            tail = "- | - | - | - | -"
            if c == "dreg":
                tail = (f"{r['ratio_of_medians']:.3f} | {r['paired_ratio_median']:.3f} | "
                        f"{r['cpu_paired_ratio_median']:.3f} | <= {r['target_ratio']:.2f} | "
                        f"{'yes' if r['meets_target'] else 'NO'}")
            print(f"| {r['setting']}@{r['image_size']} | {r['batch_size']} | {c} | {r['median_step_ms'][c]:.1f} | "
                  f"{r['min_step_ms'][c]:.1f} | {r['cpu_median_step_ms'][c]:.1f} | {tail} | {r['load_avg']:.1f} |")
    eff = [r for r in results if "flop_efficiency" in r]
    if not eff:
        return
    probes = sorted(eff[0].get("matmul_peak_gflops", {}))
    print("\n| setting | contender | GFLOP/step (profiler) | GFLOP/step (3x analytic fwd) | fwd GFLOP/img (profiler) | "
          "achieved GFLOP/s | "
          + ("" if args.nominal_peak is None else f"% of nominal {args.nominal_peak:g} GFLOP/s | ")
          + " | ".join(f"% of {p} (median)" for p in probes) + " |")
    print("|---|---|---:|---:|---:|---:|" + ("" if args.nominal_peak is None else "---:|") + "---:|" * len(probes))
    for r in eff:
        for c in CONTENDERS:
            e = r["flop_efficiency"][c]
            analytic = "-" if e["analytic_train_step_gflop"] is None else f"{e['analytic_train_step_gflop']:.1f}"
            print(f"| {r['setting']}@{r['image_size']} b{r['batch_size']} | {c} | {e['train_step_gflop']:.1f} | "
                  f"{analytic} | {e['forward_gflop_per_image']:.2f} | {e['achieved_gflops']:.1f} | "
                  + ("" if e["pct_of_nominal_peak"] is None else f"{e['pct_of_nominal_peak']:.0f}% | ")
                  + " | ".join(f"{e[f'pct_of_{p}_median']:.0f}%" for p in probes) + " |")
    for r in eff:
        if "matmul_peak_gflops" in r:
            peaks = ", ".join(f"{p} {v['median']:.1f} (max {v['max']:.1f})" for p, v in r["matmul_peak_gflops"].items())
            print(f"\n{r['setting']}: measured fp32 matmul peak {args.matmul_size}^2, GFLOP/s: {peaks}; "
                  f"FLOP ratio dreg/plain {r['flop_efficiency']['flop_ratio_dreg_over_plain']:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns 0 (prints tables, optionally writes ``--json``)."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    import detreg_keras  # noqa: I001  (first: it turns on oneDNN unless TF_ENABLE_ONEDNN_OPTS is set)
    import keras
    import tensorflow as tf
    from detreg_keras.cpu import cpu_info, describe

    print(f"cpu: {describe()}; TensorFlow oneDNN: {detreg_keras._backend.onednn_enabled()}", flush=True)
    probes = make_matmul_probes(args.matmul_size) if args.matmul_size > 0 else {}
    results = [bench_setting(name, args, probes) for name in args.settings]
    print_tables(results, args)
    env = {
        "python": platform.python_version(), "tensorflow": tf.__version__,
        "tf_onednn": detreg_keras._backend.onednn_enabled(), "keras": keras.__version__,
        "numpy": np.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "processor": platform.processor(), "cpu": cpu_info(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "nominal_peak_gflops": args.nominal_peak, "matmul_size": args.matmul_size,
        "total_s": time.perf_counter() - t_start, "argv": list(sys.argv[1:] if argv is None else argv),
    }
    print(f"\nenv: {json.dumps(env)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "env": env}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
