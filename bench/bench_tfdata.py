#!/usr/bin/env python
"""tf.data decode + augment throughput per core of the training input pipeline, on CUB-sized JPEGs.

Data: ``--num-images`` synthetic but realistic JPEGs written to a temporary
class-per-folder tree (``--classes`` folders): CUB-200-2011 sizes (long side 500,
short side 300-400, two thirds landscape), natural-ish content (multi-octave
smooth noise, filled shapes, a slight blur and sensor-like noise), encoded by
Pillow at quality 90, which gives CUB-like files of about 30-60 KB.

Contenders, interleaved (a fresh iterator per timed sample, ``--warmup-batches``
untimed batches first, the order rotating every round), **each in its own worker
process** (``--isolation process``, the default): pipelines sharing one process
disturbed one another's timings by up to 1.6x here (``--isolation none`` keeps
that mode for comparison):

* ``library``: the training input pipeline of :func:`detreg_keras.training.run_training`
  for a folder dataset with the paper recipe (``cub200`` preset): ``load_image_folder``
  records read from disk, ``make_train_dataset(records, batch, 224, sampler="random",
  scale=(0.08, 1), flip=True)`` -- a ``from_generator`` sampler, file reads,
  ``decode_train_transform`` (``extract_jpeg_shape`` + ``decode_and_crop_jpeg`` of the
  RandomResizedCrop box, antialiased bilinear resize to 224, random flip) in a parallel
  ``map``, ``ignore_errors``, ``batch``, ``prefetch``;
* ``library_m_per_class``: the same with ``sampler="m_per_class"`` (4 per class; the
  batch is decoded by a ``tf.map_fn`` inside one map call);
* ``bare_transform``: in-memory bytes -> ``map(decode_train_transform)`` -> batch ->
  prefetch, i.e. the library's per-image function without the pipeline around it
  (what the pipeline's bookkeeping costs);
* ``old_from_generator`` (PREVIOUS DESIGN, not the library): ``library`` with a local
  copy of the random-sampler source the library used until 2026-11-23: a
  ``Dataset.from_generator`` yielding the epoch plan in chunks of 256 (sources, labels,
  seeds), ``unbatch``-ed in the graph. Same sampler, seeds, decode/augment function,
  ``ignore_errors`` / batch / prefetch: the same batches (the first two are compared bit
  for bit). It shows what the ``numpy_function`` + ``from_tensor_slices`` source of
  :func:`detreg_keras.data.sampling.plan_dataset` gains: ``from_generator`` roughly
  halved the images decoded per CPU-second of the whole pipeline;
* ``alt_aa_downscale_only`` (ALTERNATIVE, not the library): ``library`` with a local copy
  of ``decode_train_transform`` whose resize runs the antialiased kernel
  (``ScaleAndTranslate``) only when the crop is larger than the output and plain
  bilinear otherwise -- the same output up to float rounding (antialiasing changes
  nothing when upscaling; the max abs difference is measured and reported);
* ``alt_no_antialias`` (ALTERNATIVE, reference only): ``library`` with a plain bilinear
  resize -- NOT equivalent to torchvision/PIL's antialiased downscale; it shows what
  the antialiased resize costs.

Each contender runs under each ``--threads`` mode: ``1`` (``tf.data.Options``:
``threading.private_threadpool_size=1``, ``threading.max_intra_op_parallelism=1``,
``autotune.cpu_budget=1``: the map functions run on one thread) and ``all`` (default
options, every core). Reported: wall-clock images/s, images/s per core (wall / cores
of the mode) and images per process CPU-second, medians over rounds. The last one is
the most honest per-core number: even in mode ``1`` the process uses a little more
than one core (the ``from_generator`` Python thread, tf.data's own runner threads,
the consumer), and it is less sensitive to other processes' load. The Markdown table
goes to stdout, ``--json`` writes every sample.

Duration on the project's 2-core VM with the defaults: about 4 min (512 JPEGs
made in ~20 s, 6 contenders x 2 modes x 7 rounds of 16 + 2 batches of 32).

    python bench/bench_tfdata.py                                    # 512 images, threads 1 and all
    python bench/bench_tfdata.py --reps 9 --batches 24 --json tfdata.json
    python bench/bench_tfdata.py --num-images 64 --reps 2 --batches 2 --batch-size 8    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

TARGET_PER_CORE = 450.0
CONTENDERS = (
    "library", "library_m_per_class", "bare_transform",
    "old_from_generator", "alt_aa_downscale_only", "alt_no_antialias",
)
SAMPLES_PER_CLASS = 4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=16, help="timed batches per sample")
    p.add_argument("--warmup-batches", type=int, default=2, help="untimed batches of each fresh iterator")
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds")
    p.add_argument("--threads", nargs="+", default=["1", "all"], choices=["1", "all"])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the synthetic images")
    p.add_argument("--image-dir", default=None, help="write (or reuse) the JPEGs here instead of a temp folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isolation", choices=["process", "none"], default="process",
                   help="process: one worker process per contender (default); none: all in this process")
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A natural-ish JPEG: smooth multi-octave noise, filled shapes, blur and sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    img = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 90.0), (12, 45.0), (40, 20.0)):
        grid = rng.uniform(0, 255, (max(cells * height // width, 1) + 2, cells + 2, 3)).astype(np.uint8)
        up = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), np.float32)
        img += (up / 127.5 - 1.0) * amplitude
    img += rng.uniform(60, 190, 3).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2)), y0 + int(rng.integers(20, height // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        else:
            draw.polygon([(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(4)], fill=color)
    pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    sigma = float(rng.uniform(2, 6))
    noisy = np.asarray(pil, np.float32) + sigma * rng.standard_normal((height, width, 3), dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_dataset(root: Path, num_images: int, classes: int, seed: int, quality: int) -> dict[str, Any]:
    """Writes ``num_images`` JPEGs into ``classes`` folders under ``root`` (reused if already there)."""
    existing = sorted(root.glob("*/*.jpg"))
    if len(existing) >= num_images:
        sizes = [p.stat().st_size for p in existing[:num_images]]
        return {"written": 0, "reused": len(existing), "kb_mean": np.mean(sizes) / 1024,
                "kb_min": min(sizes) / 1024, "kb_max": max(sizes) / 1024}
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(num_images):
        short = int(rng.integers(300, 401))
        width, height = (500, short) if rng.uniform() < 2 / 3 else (short, 500)
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        data = synthetic_jpeg(rng, width, height, quality)
        (folder / f"img_{i:05d}.jpg").write_bytes(data)
        sizes.append(len(data))
    return {"written": num_images, "reused": 0, "kb_mean": float(np.mean(sizes)) / 1024,
            "kb_min": min(sizes) / 1024, "kb_max": max(sizes) / 1024}


# ----------------------------------------------------------------------------- alternatives


def make_alt_decode_train_transform(antialias: str) -> Callable[..., Any]:
    """A local copy of :func:`detreg_keras.data.pipeline.decode_train_transform` with another resize.

    Args:
        antialias: ``"downscale_only"``: antialiased (``ScaleAndTranslate``) resize only
            when the crop is larger than the output in some dimension, plain bilinear
            otherwise (the same output up to rounding: antialiasing is a no-op when
            upscaling); ``"never"``: plain bilinear always (NOT equivalent).
    """
    import tensorflow as tf

    from detreg_keras.data import pipeline as P

    def resize(crop: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
        if antialias == "never":
            out = tf.image.resize(crop, size, method="bilinear")
        else:
            shape = tf.shape(crop)
            down = tf.logical_or(shape[0] > size[0], shape[1] > size[1])
            out = tf.cond(
                down,
                lambda: tf.image.resize(crop, size, method="bilinear", antialias=True),
                lambda: tf.image.resize(crop, size, method="bilinear"),
            )
        return tf.clip_by_value(out, 0.0, 255.0)

    def decode_train_transform(data, image_size=224, *, scale=P.DEFAULT_SCALE, ratio=P.DEFAULT_RATIO,
                               flip=True, seed=None):
        size = P._hw(image_size)
        crop_seed, flip_seed = P._seeds(seed)

        def jpeg() -> tf.Tensor:
            shape = tf.image.extract_jpeg_shape(data)
            box = P.random_resized_crop_box(shape[0], shape[1], crop_seed, scale, ratio)
            return tf.image.decode_and_crop_jpeg(data, tf.stack(box), channels=3)

        def other() -> tf.Tensor:
            image = P.decode_image(data)
            shape = tf.shape(image)
            top, left, h, w = P.random_resized_crop_box(shape[0], shape[1], crop_seed, scale, ratio)
            return tf.slice(image, tf.stack([top, left, 0]), tf.stack([h, w, 3]))

        crop = tf.cond(tf.io.is_jpeg(data), jpeg, other)
        crop.set_shape([None, None, 3])
        out = resize(crop, size)
        if flip:
            out = tf.image.stateless_random_flip_left_right(out, seed=flip_seed)
        out.set_shape([size[0], size[1], 3])
        return out

    return decode_train_transform


@contextlib.contextmanager
def patched_transform(fn: Callable[..., Any] | None) -> Iterator[None]:
    """Temporarily replaces ``pipeline.decode_train_transform`` (traced when the map is built)."""
    from detreg_keras.data import pipeline as P

    original = P.decode_train_transform
    if fn is not None:
        P.decode_train_transform = fn
    try:
        yield
    finally:
        P.decode_train_transform = original


def max_abs_diff(alt: Callable[..., Any], blobs: list[bytes], image_size: int) -> float:
    """Largest |alt - library| pixel difference over ``blobs`` (same per-image seeds)."""
    import tensorflow as tf

    from detreg_keras.data import pipeline as P

    worst = 0.0
    for i, blob in enumerate(blobs):
        seed = tf.constant([i, 17], tf.int64)
        a = P.decode_train_transform(tf.constant(blob), image_size, seed=seed)
        b = alt(tf.constant(blob), image_size, seed=seed)
        worst = max(worst, float(tf.reduce_max(tf.abs(a - b))))
    return worst


def make_train_dataset_from_generator(records, batch_size: int, image_size: int = 224, *, seed: int = 0,
                                      scale=(0.08, 1.0), flip: bool = True, repeat: bool = False,
                                      num_parallel_calls: int | None = None):
    """A local copy of the previous ``make_train_dataset(records, sampler="random")`` (``from_generator``).

    The generator yields each epoch's plan in chunks of 256 ``(sources, labels,
    seeds)``, unbatched in the graph; the rest (per-example decode/augment,
    ``ignore_errors``, batch, prefetch) is the library's. Same sampler, same
    per-example seeds: the same batches as the library.
    """
    import tensorflow as tf

    from detreg_keras.data import pipeline as P
    from detreg_keras.data.sampling import RandomSampler, iter_epochs

    stats = P.DecodeStats()
    in_memory = records.in_memory
    sources = records.data if in_memory else records.paths
    labels = records.labels
    sampler = RandomSampler(len(records), seed=seed)
    state = {"epoch": 0}
    chunk = 256

    def generate():
        for _, indices, seeds in iter_epochs(sampler, repeat, state):
            for start in range(0, len(indices), chunk):
                rows = indices[start : start + chunk]
                items = np.empty(len(rows), dtype=object)
                items[:] = [sources[i] for i in rows]
                yield items, labels[rows], seeds[start : start + chunk]

    signature = (tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int64), tf.TensorSpec([None, 2], tf.int64))
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature).unbatch()

    def load_element(src: tf.Tensor, label: tf.Tensor, seed_: tf.Tensor):
        def run() -> tf.Tensor:
            return P.decode_train_transform(P._read(src, in_memory), image_size, scale=scale, flip=flip, seed=seed_)

        return stats._track(1, run), label

    ds = ds.map(load_element, num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def first_batches_diff(a, b, batches: int = 2) -> float:
    """Max abs difference of the images of the first ``batches`` batches (inf if labels differ)."""
    worst = 0.0
    iter_a, iter_b = iter(a), iter(b)
    first_a = [next(iter_a) for _ in range(batches)]
    first_b = [next(iter_b) for _ in range(batches)]
    del iter_a, iter_b
    for (xa, ya), (xb, yb) in zip(first_a, first_b, strict=True):
        if not np.array_equal(ya.numpy(), yb.numpy()):
            return float("inf")
        worst = max(worst, float(np.max(np.abs(xa.numpy() - xb.numpy()))))
    return worst


# ----------------------------------------------------------------------------- pipelines


def thread_options(mode: str):
    """``tf.data.Options`` of a ``--threads`` mode."""
    import tensorflow as tf

    options = tf.data.Options()
    if mode == "1":
        options.threading.private_threadpool_size = 1
        options.threading.max_intra_op_parallelism = 1
        options.autotune.cpu_budget = 1
    return options


def build_pipeline(name: str, records, blobs: list[bytes], args: argparse.Namespace):
    """The endless batched dataset of contender ``name`` (library functions, or patched copies).

    The library contenders get the arguments :func:`detreg_keras.training.make_training_data`
    passes for a folder dataset with the ``cub200`` preset (random batches, crop scale
    (0.08, 1), flips), with ``repeat=True``.
    """
    import tensorflow as tf

    from detreg_keras.data import make_train_dataset
    from detreg_keras.data.pipeline import DEFAULT_RATIO, decode_train_transform
    from detreg_keras.training import resolve_config

    cfg = resolve_config("cub200", dataset="folder", image_size=args.image_size, batch_size=args.batch_size,
                         seed=args.seed)
    size, scale, flip = cfg.image_size, (cfg.crop_scale_min, 1.0), cfg.flip
    common = {"image_size": size, "seed": cfg.seed, "scale": scale, "flip": flip, "repeat": True}
    if name == "bare_transform":

        def bare_load(data, seed):
            return decode_train_transform(data, size, scale=scale, ratio=DEFAULT_RATIO, flip=flip, seed=seed)

        images = tf.data.Dataset.from_tensor_slices(blobs).repeat()
        seeds = tf.data.Dataset.random(seed=cfg.seed).batch(2)
        ds = tf.data.Dataset.zip((images, seeds)).map(bare_load, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(cfg.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    transform = None
    if name.endswith("aa_downscale_only"):
        transform = make_alt_decode_train_transform("downscale_only")
    elif name == "alt_no_antialias":
        transform = make_alt_decode_train_transform("never")
    with patched_transform(transform):
        if name == "old_from_generator":
            return make_train_dataset_from_generator(records, cfg.batch_size, **common)
        if name == "library_m_per_class":
            return make_train_dataset(records, cfg.batch_size, sampler="m_per_class",
                                      samples_per_class=SAMPLES_PER_CLASS, **common)
        return make_train_dataset(records, cfg.batch_size, sampler=cfg.sampler, **common)


def output_diffs(records, blobs: list[bytes], args: argparse.Namespace) -> dict[str, float | None]:
    """Max abs difference of each contender's output from the library's.

    The per-image alternatives are compared image by image on the same seeds; the
    ``old_from_generator`` one on its first two batches against fresh ``library``
    pipelines (labels must match too, else ``inf``). ``library_m_per_class`` samples
    other batches: ``None``.
    """
    out: dict[str, float | None] = {"library": 0.0, "bare_transform": 0.0, "library_m_per_class": None}
    per_image = {"alt_aa_downscale_only": "downscale_only", "alt_no_antialias": "never"}
    for name in args.contenders:
        if name in per_image:
            out[name] = max_abs_diff(make_alt_decode_train_transform(per_image[name]), blobs[:8], args.image_size)
        elif name == "old_from_generator":
            library = build_pipeline("library", records, blobs, args)
            out[name] = first_batches_diff(library, build_pipeline(name, records, blobs, args))
    return out


def time_sample(ds, batches: int, warmup: int) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` for ``batches`` batches of a fresh iterator."""
    iterator = iter(ds)
    for _ in itertools.islice(iterator, warmup):
        pass
    c, t = time.process_time(), time.perf_counter()
    count = sum(1 for _ in itertools.islice(iterator, batches))
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    del iterator
    if count != batches:
        raise RuntimeError(f"the pipeline ended after {count} of {batches} batches")
    return wall, cpu


class InProcessSamplers:
    """Every contender's pipeline in this process (``--isolation none``).

    Measured here, pipelines disturb one another: after another pipeline has run
    in the same process, the next one decoded up to 1.6x fewer images per
    CPU-second than when it ran alone, and a ``from_generator`` pipeline in the
    mix made it worse. Kept for comparison only.
    """

    def __init__(self, keys, records, blobs, root: Path, args: argparse.Namespace) -> None:
        pipelines = {name: build_pipeline(name, records, blobs, args) for _, name in keys}
        self.runs = {(mode, name): pipelines[name].with_options(thread_options(mode)) for mode, name in keys}
        self.args = args
        for key in keys:  # trace / start each once
            time_sample(self.runs[key], 1, 1)

    def sample(self, key) -> tuple[float, float]:
        return time_sample(self.runs[key], self.args.batches, self.args.warmup_batches)

    def close(self) -> None:
        self.runs.clear()


class ProcessSamplers:
    """One worker process per ``(threads, contender)`` (``--isolation process``, the default).

    Each worker imports TensorFlow, builds its pipeline once and then times one
    sample (a fresh iterator) per request, measuring its own process CPU time;
    the parent interleaves the requests with a rotating order, so every
    contender sees the same machine load, and no contender shares a process
    (allocator, thread pools, tf.data runtime) with another.
    """

    def __init__(self, keys, records, blobs, root: Path, args: argparse.Namespace) -> None:
        import subprocess

        self.args = args
        self.workers = {}
        for mode, name in keys:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{mode}:{name}", "--image-dir", str(root),
                   "--num-images", str(args.num_images), "--classes", str(args.classes),
                   "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                   "--batches", str(args.batches), "--warmup-batches", str(args.warmup_batches),
                   "--seed", str(args.seed)]  # fmt: skip
            self.workers[(mode, name)] = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            )  # fmt: skip
        for key in keys:  # wait until every worker has built and traced its pipeline
            self._read(key)

    def _read(self, key) -> dict[str, Any]:
        line = self.workers[key].stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker {key} exited (code {self.workers[key].poll()})")
        return json.loads(line)

    def sample(self, key) -> tuple[float, float]:
        worker = self.workers[key]
        worker.stdin.write("sample\n")
        worker.stdin.flush()
        out = self._read(key)
        return out["wall"], out["cpu"]

    def close(self) -> None:
        for worker in self.workers.values():
            if worker.poll() is None:
                worker.stdin.close()
                worker.wait(timeout=60)


def worker_main(args: argparse.Namespace) -> int:
    """``--worker MODE:NAME``: build one pipeline, then time one sample per ``sample`` line on stdin."""
    logging.getLogger("detreg_keras.data.pipeline").setLevel(logging.ERROR)
    import gc

    from detreg_keras.data import load_image_folder

    mode, name = args.worker.split(":", 1)
    records = load_image_folder(Path(args.image_dir))
    if len(records) > args.num_images:
        records = records.subset(range(args.num_images))
    blobs = [Path(p).read_bytes() for p in records.paths]
    ds = build_pipeline(name, records, blobs, args).with_options(thread_options(mode))
    time_sample(ds, 1, 1)
    print(json.dumps({"ready": args.worker}), flush=True)
    for line in sys.stdin:
        if line.strip() != "sample":
            continue
        wall, cpu = time_sample(ds, args.batches, args.warmup_batches)
        gc.collect()
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns 0 (prints a table, optionally writes ``--json``)."""
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.batch_size % SAMPLES_PER_CLASS or args.batch_size // SAMPLES_PER_CLASS > args.classes:
        raise SystemExit(f"--batch-size must be a multiple of {SAMPLES_PER_CLASS} with at most --classes classes.")
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    import tensorflow as tf

    from detreg_keras.cpu import cpu_info
    from detreg_keras.data import load_image_folder

    # Every timed sample abandons its iterator with images in flight, which a later epoch start of the
    # same (repeat=True) pipeline may count as dropped: silence those warnings; the JPEGs are all valid.
    pipeline_logger = logging.getLogger("detreg_keras.data.pipeline")
    logger_level = pipeline_logger.level
    pipeline_logger.setLevel(logging.ERROR)
    tmp = None
    root = Path(args.image_dir) if args.image_dir else Path(tmp := tempfile.mkdtemp(prefix="bench_tfdata_"))
    try:
        t0 = time.perf_counter()
        data_info = write_dataset(root, args.num_images, args.classes, args.seed, args.quality)
        data_info["seconds"] = time.perf_counter() - t0
        records = load_image_folder(root)  # validates (reads) every file: the page cache is warm
        if len(records) > args.num_images:
            records = records.subset(range(args.num_images))
        blobs = [Path(p).read_bytes() for p in records.paths]
        print(f"{len(records)} JPEGs in {root} ({data_info['kb_mean']:.0f} KB mean, {data_info['kb_min']:.0f}-"
              f"{data_info['kb_max']:.0f} KB; made in {data_info['seconds']:.1f} s), load {os.getloadavg()[0]:.1f}",
              flush=True)
        diffs = output_diffs(records, blobs, args)
        cores = {"1": 1, "all": os.cpu_count() or 1}
        keys = [(mode, name) for mode in args.threads for name in args.contenders]
        samplers = (ProcessSamplers if args.isolation == "process" else InProcessSamplers)(keys, records, blobs,
                                                                                          root, args)
        images = args.batches * args.batch_size
        wall = {k: [] for k in keys}
        cpu = {k: [] for k in keys}
        loads = []
        try:
            for rep in range(args.reps):
                order = keys[rep % len(keys):] + keys[: rep % len(keys)]
                for key in order:
                    w, c = samplers.sample(key)
                    wall[key].append(w)
                    cpu[key].append(c)
                loads.append(os.getloadavg()[0])
                print(f"round {rep + 1}/{args.reps}: "
                      + " | ".join(f"{m}:{n} {images / wall[(m, n)][-1]:.0f}" for m, n in keys)
                      + f" img/s | load {loads[-1]:.1f}", flush=True)
        finally:
            samplers.close()
    finally:
        pipeline_logger.setLevel(logger_level)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    results = []
    for mode, name in keys:
        w = float(np.median(wall[(mode, name)]))
        c = float(np.median(cpu[(mode, name)]))
        lib = (mode, "library")
        row = {
            "threads": mode, "cores": cores[mode], "contender": name,
            "img_per_s": images / w,
            "img_per_s_per_core": images / w / cores[mode],
            "img_per_cpu_s": images / c if c > 0 else float("nan"),
            "max_img_per_s": images / float(np.min(wall[(mode, name)])),
            "cpu_utilisation": c / w,
            "vs_library_paired_median": (
                float(np.median(np.array(wall[lib]) / np.array(wall[(mode, name)]))) if lib in wall else None
            ),
            "max_abs_diff_vs_library": diffs.get(name),
            "wall_s": wall[(mode, name)], "cpu_s": cpu[(mode, name)],
        }
        row["meets_target"] = bool(row["img_per_s_per_core"] >= TARGET_PER_CORE)
        results.append(row)

    print(f"\nImages {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.batches} timed batches "
          f"({images} images) per sample, {args.reps} rounds; target >= {TARGET_PER_CORE:g} img/s/core.\n")
    print("| threads | contender | img/s (median) | img/s per core | img per CPU-second | CPU use (cores) | "
          "speed vs library (paired median) | max abs diff vs library | target met | load avg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    load_med = float(np.median(loads)) if loads else float("nan")
    for r in results:
        diff = "-" if r["max_abs_diff_vs_library"] is None else f"{r['max_abs_diff_vs_library']:.2g}"
        vs = "-" if r["vs_library_paired_median"] is None else f"{r['vs_library_paired_median']:.2f}x"
        print(f"| {r['threads']} | {r['contender']} | {r['img_per_s']:.0f} | {r['img_per_s_per_core']:.0f} | "
              f"{r['img_per_cpu_s']:.0f} | {r['cpu_utilisation']:.2f} | {vs} | {diff} | "
              f"{'yes' if r['meets_target'] else 'NO'} | {load_med:.1f} |")
    env = {
        "python": platform.python_version(), "tensorflow": tf.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "cpu": cpu_info(), "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(), "load_avg_median": load_med, "total_s": time.perf_counter() - t_start,
        "data": data_info, "argv": list(sys.argv[1:] if argv is None else argv),
    }
    print(f"\nenv: {json.dumps(env)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "env": env, "target_per_core": TARGET_PER_CORE},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
