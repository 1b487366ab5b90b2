#!/usr/bin/env python
"""Embedding latency: onnxruntime vs TensorFlow on ResNet50@224 + DReg heads, measured side by side.

Model: ``DRegModel(backbone="resnet50", backbone_weights=None, image_size=224,
embedding_dim=512, flow="realnvp", num_couplings=12, hidden_units=512)``
(random weights: no ImageNet download; latency does not depend on the values).

Contenders, timed in the same process, interleaved (the order rotates every
repetition) so that load from other processes hits all of them alike:

* ``tf``: ``tf.function`` of the Keras model with a fixed input signature,
  traced once and warmed up;
* ``ort_default``: ``onnxruntime.InferenceSession`` with default options
  (``ORT_ENABLE_ALL``, one intra-op thread per core);
* ``ort_t1``, ``ort_t2``: :class:`detreg_keras.retrieval.Embedder` (``ORT_ENABLE_ALL``,
  sequential executor, optimized-graph cache, input validation included) with
  1 and 2 intra-op threads (``--threads``);
* ``int8_default``, ``int8_t1``, ``int8_t2``: the same for the int8 copy written by
  :func:`detreg_keras.quantize.quantize_onnx` (``--no-int8`` drops them). Its
  calibration images are ``--calibration-images`` random images, and its recall
  guard is off (tolerance 100 points): the random-weight model has no meaningful
  recall. With ``--model`` a trained ``.keras`` model is benchmarked instead and
  ``--omniglot`` calibrates on the Omniglot training alphabets and reports the
  Recall@1 / MAP@R change on the test alphabets (guard at ``--max-r1-drop``).

Reports the median latency of each, the ratio of medians TF/ORT, the median of
the per-repetition ratios, CPU time per call and the max abs difference between
the embeddings.

    python bench/bench_onnx_vs_tf.py                         # batch 1 and 32
    python bench/bench_onnx_vs_tf.py --batch-sizes 1 8 --reps 10 3 --json out.json
    python bench/bench_onnx_vs_tf.py --model runs/omniglot/model.keras --omniglot --reps 50 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--reps", type=int, nargs="+", default=[15, 3], help="repetitions per batch size")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="intra-op thread counts of the Embedder variants (one ort_tN contender each)")
    p.add_argument("--ort-config", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra onnxruntime session config entries for the Embedder variants")
    p.add_argument("--workdir", default=None, help="keep the ONNX file / optimized cache here (default: temp)")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.add_argument("--model", default=None, help="a trained .keras model instead of the random ResNet50")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 contenders")
    p.add_argument("--calibration-images", type=int, default=32, help="int8 calibration images (default 32)")
    p.add_argument("--omniglot", action="store_true",
                   help="calibrate on Omniglot train, measure the recall change on Omniglot test (needs --model)")
    p.add_argument("--max-r1-drop", type=float, default=0.2, help="recall guard with --omniglot (points)")
    return p.parse_args(argv)


def build_model(args):
    """The benchmarked Keras model: ``--model`` or the random-weight ResNet50@size + DReg heads."""
    import detreg_keras
    from detreg_keras import export

    if args.model:
        return export.load_model(args.model)
    size = args.image_size
    model = detreg_keras.DRegModel(
        num_classes=100, backbone="resnet50", backbone_weights=None, image_size=size,
        embedding_dim=512, flow="realnvp", num_couplings=12, hidden_units=512,
    )
    model(np.zeros((1, size, size, 3), np.float32))
    return model


def omniglot_images(split: str, shape, limit=None, seed: int = 0):
    """``(float32 images, labels)`` of an Omniglot split decoded like the Embedder (optionally a random subset)."""
    from detreg_keras.data import load_omniglot
    from detreg_runtime.imaging import load_image

    records = load_omniglot(split=split)
    order = np.arange(len(records.labels))
    if limit is not None and limit < len(order):
        order = np.sort(np.random.default_rng(seed).choice(len(order), limit, replace=False))
    images = np.stack([load_image(records.data[i], shape[:2], shape[2]) for i in order])
    return images, np.asarray(records.labels)[order]


def quantize_for_bench(args, onnx_path: Path, shape):
    """Write (or reuse) the int8 copy; return ``(path, report dict or None)``."""
    from detreg_keras import export
    from detreg_keras.quantize import quantize_onnx

    int8_path = onnx_path.with_name(onnx_path.stem + f".int8.{export.read_onnx_metadata(onnx_path)['model_hash'][:12]}.onnx")
    if int8_path.exists() and not args.omniglot:
        return int8_path, None
    int8_path.unlink(missing_ok=True)  # a bench artefact of this model: re-measured
    if args.omniglot:
        calibration, _ = omniglot_images("train", shape, args.calibration_images)
        images, labels = omniglot_images("test", shape)
        tolerance = args.max_r1_drop
    else:
        calibration = export.sample_images(args.calibration_images, shape, seed=100)
        rng = np.random.default_rng(0)
        base = np.repeat(export.sample_images(16, shape, seed=101), 2, axis=0)
        images = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.float32)
        labels, tolerance = np.repeat(np.arange(16), 2), 100.0  # near-duplicate pairs; no guard
    report = quantize_onnx(onnx_path, int8_path, calibration, images, labels, max_r1_drop=tolerance,
                           latency_batch_sizes=(), latency_reps=0)
    print(report.summary(), flush=True)
    return int8_path, report.to_dict()


def main(argv=None) -> int:
    args = parse_args(argv)
    reps = dict(zip(args.batch_sizes, args.reps + [args.reps[-1]] * len(args.batch_sizes)))
    t_start = time.perf_counter()

    import detreg_keras  # noqa: I001  (first: it turns on oneDNN unless TF_ENABLE_ONEDNN_OPTS is set)
    import keras
    import onnxruntime as ort
    import tensorflow as tf
    from detreg_keras import export
    from detreg_keras.cpu import cpu_info, describe
    from detreg_runtime.embedder import Embedder

    print(f"cpu: {describe()}; TensorFlow oneDNN: {detreg_keras._backend.onednn_enabled()}", flush=True)
    keras.utils.set_random_seed(0)
    model = build_model(args)
    shape = export.image_shape(model)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_path = workdir / (f"{Path(args.model).stem}.onnx" if args.model else f"resnet50_{shape[0]}.onnx")
    t0 = time.perf_counter()
    reuse = onnx_path.exists() and export.read_onnx_metadata(onnx_path).get("model_hash") == export.model_hash(model)
    if not reuse:
        export.export_onnx(model, onnx_path, overwrite=True, check_batch_sizes=(1,))
    export_s = time.perf_counter() - t0
    ops = export.onnx_op_counts(onnx_path)
    print(f"ONNX {'reused' if reuse else 'exported'} in {export_s:.1f} s: {onnx_path} "
          f"(Conv {ops.get('Conv', 0)}, Transpose {ops.get('Transpose', 0)})", flush=True)

    quant_report = None
    if not args.no_int8:
        t0 = time.perf_counter()
        int8_path, quant_report = quantize_for_bench(args, onnx_path, shape)
        print(f"int8 copy in {time.perf_counter() - t0:.1f} s: {int8_path}", flush=True)

    spec = tf.TensorSpec([None, *shape], tf.float32, name="images")
    tf_fn = tf.function(lambda images: model(images, training=False), input_signature=[spec])
    default_session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    runners = {
        "tf": lambda x: tf_fn(x).numpy(),
        "ort_default": lambda x: default_session.run(["embeddings"], {"images": x})[0],
    }
    extra_config = dict(item.split("=", 1) for item in args.ort_config)
    files = {"ort": onnx_path} if args.no_int8 else {"ort": onnx_path, "int8": int8_path}
    for prefix, path in files.items():
        if prefix != "ort":
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            runners[f"{prefix}_default"] = lambda x, s=session: s.run(["embeddings"], {"images": x})[0]
        for threads in args.threads:
            embedder = Embedder(
                path, providers=["CPUExecutionProvider"], batch_size=max(args.batch_sizes), intra_op_num_threads=threads,
                optimized_model_cache=workdir / "ort_cache", session_config=extra_config,
            )
            runners[f"{prefix}_t{threads}"] = embedder.embed
    ort_names = [name for name in runners if name != "tf"]

    results = []
    for batch in args.batch_sizes:
        images = export.sample_images(batch, shape, seed=batch)
        outputs = {}
        for name, run in runners.items():
            for _ in range(args.warmup):
                outputs[name] = run(images)
        times = {name: [] for name in runners}
        cpu = {name: [] for name in runners}
        names = list(runners)
        for rep in range(reps[batch]):
            order = names[rep % len(names):] + names[: rep % len(names)]
            for name in order:
                c, t = time.process_time(), time.perf_counter()
                runners[name](images)
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        med = {name: float(np.median(v)) * 1e3 for name, v in times.items()}
        row = {
            "batch": batch, "reps": reps[batch], "median_ms": med,
            "ratio_tf_over": {name: med["tf"] / med[name] for name in ort_names},
            "paired_ratio_median": {
                name: float(np.median(np.array(times["tf"]) / np.array(times[name]))) for name in ort_names
            },
            "max_abs_diff": {name: float(np.max(np.abs(outputs[name] - outputs["tf"]))) for name in ort_names},
            "min_ms": {name: float(np.min(v)) * 1e3 for name, v in times.items()},
            "cpu_median_ms": {name: float(np.median(v)) * 1e3 for name, v in cpu.items()},
            "load_avg": os.getloadavg()[0],
        }
        results.append(row)
        print(f"batch {batch:>3} ({reps[batch]} reps, load {row['load_avg']:.1f}): tf {med['tf']:.1f} ms | "
              + " | ".join(f"{n} {med[n]:.1f} ms ({row['ratio_tf_over'][n]:.2f}x)" for n in ort_names), flush=True)

    print("\n| batch | runtime | median latency (ms) | TF / this (ratio of medians) | median of paired ratios | "
          "CPU time per call (ms) | max abs diff vs TF | load avg |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for name in runners:
            ratio = "1.00x" if name == "tf" else f"{r['ratio_tf_over'][name]:.2f}x"
            paired = "-" if name == "tf" else f"{r['paired_ratio_median'][name]:.2f}x"
            diff = "-" if name == "tf" else f"{r['max_abs_diff'][name]:.1e}"
            print(f"| {r['batch']} | {name} | {r['median_ms'][name]:.1f} | {ratio} | {paired} | "
                  f"{r['cpu_median_ms'][name]:.0f} | {diff} | {r['load_avg']:.1f} |")
    env = {
        "python": platform.python_version(), "tensorflow": tf.__version__,
        "tf_onednn": detreg_keras._backend.onednn_enabled(), "keras": keras.__version__,
        "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(), "machine": platform.machine(), "cpu": cpu_info(),
        "load_avg_end": os.getloadavg(), "ort_threads": args.threads, "total_s": time.perf_counter() - t_start,
        "onnx_ops": ops, "model": args.model or f"resnet50@{shape[0]} random weights", "quantization": quant_report,
    }
    print(f"\nenv: {json.dumps({k: v for k, v in env.items() if k != 'onnx_ops'})}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "env": env}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
