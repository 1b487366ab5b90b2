"""What a run reports: test metrics of a model, the raw-pixel and untrained baselines, the table."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from detreg_keras import embedding_map
from detreg_keras.data import DecodeStats, ImageRecords
from detreg_keras.data.registry import DataSplits, Source
from detreg_keras.evaluation import embed
from detreg_keras.metrics import evaluate_embeddings
from detreg_keras.training.config import TrainConfig
from detreg_keras.training.inputs import make_evaluation_data, report_dropped


def embed_split(
    model: keras.Model, source: Source, cfg: TrainConfig, verbose: int | None = None, name: str = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Embeds one split through the evaluation pipeline of ``cfg`` (:func:`detreg_keras.evaluation.embed`).

    Args:
        model: the model to embed with (``predict_on_batch`` / ``predict``).
        source: the split.
        cfg: image size, channels, eval mode, batch size (and ``verbose`` if not given).
        verbose: 1 a progress bar, 2 one ``NAME: N images embedded in Ts`` line, 0 nothing.
        name: the split's name in the printed line and in the dropped-image warning.

    Returns:
        ``(embeddings [N, d] float32, labels [N])``.
    """
    verbose = cfg.verbose if verbose is None else verbose
    stats = DecodeStats()
    data, total = make_evaluation_data(source, cfg, stats)
    out = embed(model, data, batch_size=cfg.eval_batch_size, verbose=verbose, steps=total, name=name)
    report_dropped(stats, f"{name} images")
    return out


def evaluate_splits(model: keras.Model, splits: DataSplits, cfg: TrainConfig, verbose: int | None = None) -> dict[str, float]:
    """Test metrics of ``model``: all-vs-all on ``splits.test`` or query/gallery (In-shop)."""
    query = splits.query is not None
    emb, labels = embed_split(model, splits.test, cfg, verbose, "gallery" if query else "test")
    q_emb, q_labels = embed_split(model, splits.query, cfg, verbose, "query") if query else (None, None)
    return evaluate_embeddings(
        emb, labels, ks=tuple(cfg.ks), query_embeddings=q_emb, query_labels=q_labels, metrics=tuple(cfg.metrics)
    )


#: The embedding map shows at most this many test images (a seeded sample of larger sets).
MAX_MAP_POINTS = 10_000


def write_embedding_map(
    model: keras.Model, source: Source, cfg: TrainConfig, out_dir: str | os.PathLike
) -> dict[str, Any]:
    """The embedding maps of ``source`` in ``out_dir``: ``projector/`` (TensorBoard) and ``embedding_map.png``.

    The images go through the evaluation pipeline once (:func:`detreg_keras.evaluation.embed`),
    which keeps a 32-pixel thumbnail of each for the sprite and the plot. Sets of more than
    :data:`MAX_MAP_POINTS` images are sampled (seed ``cfg.seed``). t-SNE dominates the cost
    (about a minute for Omniglot's 2,120 test images on 2 busy CPU cores), hence
    ``cfg.embedding_map`` is off by default.

    Returns:
        ``{"projector": path, "png": path, "points": N, "seconds": wall time}``.
    """
    start = time.perf_counter()
    thumbs: list[np.ndarray] = []

    def predict_keeping_thumbnails(x: Any) -> Any:
        thumbs.append(embedding_map.to_thumbnails(np.asarray(x), 32))
        return model.predict_on_batch(x)

    data, total = make_evaluation_data(source, cfg)
    emb, labels = embed(predict_keeping_thumbnails, data, batch_size=cfg.eval_batch_size, steps=total)
    images = np.concatenate(thumbs)
    if len(emb) > MAX_MAP_POINTS:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(emb), MAX_MAP_POINTS, replace=False))
        emb, labels, images = emb[keep], labels[keep], images[keep]
    names = source.class_names if isinstance(source, ImageRecords) else None
    out = Path(out_dir)
    config = embedding_map.write_projector(out / "projector", emb, labels, images, names, tensor_name=cfg.dataset)
    png = embedding_map.plot_embedding_map(
        embedding_map.tsne_2d(emb, seed=cfg.seed), labels, out / "embedding_map.png", images,
        title=f"{cfg.dataset}: t-SNE of the test embeddings", seed=cfg.seed,
    )  # fmt: skip
    return {"projector": str(config), "png": str(png), "points": len(emb), "seconds": time.perf_counter() - start}


#: Pixel vectors longer than this get no raw-pixel row (a 224x224 RGB dataset would need GBs).
MAX_RAW_PIXEL_DIM = 16_384
#: metric key -> table column (the recall columns come first, one per k).
TABLE_COLUMNS = {"map@r": "MAP@R", "nmi": "NMI"}


def method_label(cfg: TrainConfig) -> str:
    """The name of a run's method in tables and plots: ``"DReg (realnvp)"`` or ``"Proxy Anchor"``."""
    return "Proxy Anchor" if cfg.flow == "none" else f"DReg ({cfg.flow})"


def pixel_vectors(source: Source, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation images of ``source`` as the network receives them, flattened.

    Returns:
        ``(pixels [N, image_size * image_size * channels] float32, labels [N])``.
    """
    data, _ = make_evaluation_data(source, cfg)
    if isinstance(data, tuple):
        images, labels = data
        return images.reshape(len(images), -1), np.asarray(labels)
    chunks = [(x.numpy().reshape(len(x), -1), y.numpy()) for x, y in data]
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def raw_pixel_metrics(splits: DataSplits, cfg: TrainConfig) -> dict[str, float] | None:
    """Retrieval on the raw pixels: the metrics of :func:`evaluate_splits` with each image's
    mean-centred pixel vector as its embedding (cosine similarity, as for the embeddings).

    Centring by the mean image of the evaluated set (its gallery, in query/gallery
    mode) makes the result the same whether ink is dark on light (Omniglot) or light
    on dark (digits). ``None`` when the pixel vectors are longer than
    :data:`MAX_RAW_PIXEL_DIM`.
    """
    if cfg.image_size * cfg.image_size * cfg.channels > MAX_RAW_PIXEL_DIM:
        return None
    gallery, labels = pixel_vectors(splits.test, cfg)
    mean = gallery.mean(axis=0)
    query = query_labels = None
    if splits.query is not None:
        query, query_labels = pixel_vectors(splits.query, cfg)
        query = query - mean
    return evaluate_embeddings(
        gallery - mean, labels, ks=tuple(cfg.ks), query_embeddings=query, query_labels=query_labels,
        metrics=tuple(cfg.metrics),
    )  # fmt: skip


def baseline_metrics(model: keras.Model, splits: DataSplits, cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """The reference rows of the main job's table, on the test split.

    Args:
        model: the run's model *before training* (its initial weights).
        splits: the run's splits.
        cfg: the run's configuration.

    Returns:
        ``{"raw pixels": ..., "untrained network": ...}`` (no raw-pixel row for
        images larger than :data:`MAX_RAW_PIXEL_DIM` values).
    """
    rows: dict[str, dict[str, float]] = {}
    raw = raw_pixel_metrics(splits, cfg)
    if raw is not None:
        rows["raw pixels"] = raw
    rows["untrained network"] = dict(evaluate_splits(model, splits, cfg, verbose=0))
    return rows


def format_table(rows: dict[str, dict[str, Any]], ks: Sequence[int]) -> str:
    """A plain-text table of retrieval metrics in percent, one row per method.

    Args:
        rows: ``{method: metrics}`` (keys ``recall@k``, ``map@r``, ``nmi``;
            missing ones print as ``-``).
        ks: the Recall@k columns.
    """
    columns = {f"recall@{k}": f"R@{k}" for k in ks} | TABLE_COLUMNS
    width = max(len("method"), *(len(name) for name in rows))
    lines = ["  ".join([f"{'method':<{width}}", *(f"{title:>6}" for title in columns.values())])]
    for name, metrics in rows.items():
        cells = [f"{100 * metrics[key]:6.2f}" if key in metrics else f"{'-':>6}" for key in columns]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)
