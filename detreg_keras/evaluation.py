"""Keras side of the evaluation: embedding a data set, a retrieval callback, plots.

The metric definitions live in :mod:`detreg_keras.metrics`; this module turns a
model and a data set into embeddings and wires the metrics into ``model.fit``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detreg_keras._backend import ensure_tensorflow_backend

ensure_tensorflow_backend()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from detreg_keras import metrics as _metrics  # noqa: E402

__all__ = ["embed", "evaluate_model", "RetrievalEvaluation", "plot_recall_at_k", "metric_keys"]

#: Data accepted by :func:`embed`: a ``tf.data.Dataset`` of ``(images, labels)``
#: or an ``(images, labels)`` tuple of arrays.
Data = tf.data.Dataset | tuple[Any, Any]

#: Metrics computed by the callback by default (NMI's k-means is left out
#: because it is the slowest; add ``"nmi"`` to ``metrics`` to get it).
DEFAULT_CALLBACK_METRICS = ("recall", "map@r", "r_precision", "precision@1")


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return np.asarray(keras.ops.convert_to_numpy(x))


def _check_embedding_batch(out: Any, n: int) -> np.ndarray:
    if isinstance(out, (dict, list, tuple)):
        raise TypeError(
            "the model returned a "
            f"{type(out).__name__}, not an embedding tensor; pass a function that picks "
            "the embedding, e.g. embed(lambda x: model(x, training=False)['embedding'], data)."
        )
    arr = _to_numpy(out)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(
            f"the model must map a batch of {n} inputs to [{n}, dim] embeddings, got shape "
            f"{arr.shape}."
        )
    return arr.astype(np.float32, copy=False)


def _flat_labels(y: Any) -> np.ndarray:
    arr = _to_numpy(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"labels must be class ids of shape [batch] or [batch, 1], got {arr.shape}.")
    return arr


def _is_unbatched(ds: tf.data.Dataset) -> bool:
    spec = ds.element_spec
    if not isinstance(spec, (tuple, list)) or len(spec) < 2:
        raise ValueError(
            "the dataset must yield (images, labels) pairs; got element_spec "
            f"{spec!r}."
        )
    label_spec = spec[1]
    shape = getattr(label_spec, "shape", None)
    return shape is not None and shape.rank == 0


def embed(
    model_or_fn: keras.Model | Callable[[Any], Any],
    data: Data,
    batch_size: int = 256,
    *,
    verbose: int = 0,
    steps: int | None = None,
    name: str = "embed",
) -> tuple[np.ndarray, np.ndarray]:
    """Embeds a data set and returns the embeddings with their labels.

    The data set is traversed exactly once, so embeddings and labels stay aligned
    even for a shuffled ``tf.data.Dataset``. This is the one embedding path of
    the package (training's test evaluation, the callback, the scripts).

    Args:
        model_or_fn: a Keras model (run in inference mode: ``predict`` for arrays,
            ``predict_on_batch`` for a dataset) or any callable mapping an input
            batch to a ``[batch, dim]`` embedding tensor/array.
        data: a ``tf.data.Dataset`` yielding ``(images, labels)`` (extra elements
            such as sample weights are ignored; an unbatched dataset, recognised
            by scalar labels, is batched with ``batch_size``), or an
            ``(images, labels)`` tuple of arrays.
        batch_size: batch size for arrays and unbatched datasets.
        verbose: 0 prints nothing; 1 a Keras progress bar; 2 one line when
            done, ``"{name}: N images embedded in T s"``.
        steps: the number of batches, for the progress bar's total (default:
            the dataset's cardinality when known).
        name: what is embedded, for the printed line.

    Returns:
        ``(embeddings, labels)``: float32 ``[N, dim]`` and ``[N]`` numpy arrays.

    Raises:
        ValueError: on a malformed ``data`` or model output, an empty data set
            or a ``verbose`` other than 0, 1, 2.
        TypeError: if the model returns several outputs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}.")
    start = time.perf_counter()
    if isinstance(data, tf.data.Dataset):
        emb, labels = _embed_dataset(model_or_fn, data, batch_size, verbose, steps)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        emb, labels = _embed_arrays(model_or_fn, data, batch_size, verbose)
    else:
        raise ValueError(
            "data must be a tf.data.Dataset of (images, labels) or an (images, labels) tuple, "
            f"got {type(data).__name__}."
        )
    if verbose == 2:
        print(f"{name}: {len(emb)} images embedded in {time.perf_counter() - start:.1f}s")
    return emb, labels


def _embed_dataset(
    model_or_fn: Any, data: tf.data.Dataset, batch_size: int, verbose: int, steps: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`embed` of a dataset: one ``predict_on_batch`` (or call) per batch."""
    is_keras = isinstance(model_or_fn, keras.Model)
    ds = data.batch(batch_size) if _is_unbatched(data) else data
    if steps is None and int(ds.cardinality()) >= 0:
        steps = int(ds.cardinality())
    bar = keras.utils.Progbar(steps, unit_name="batch") if verbose == 1 else None
    embs, labs = [], []
    for step, element in enumerate(ds, start=1):
        x, y = element[0], _flat_labels(element[1])
        out = model_or_fn.predict_on_batch(x) if is_keras else model_or_fn(x)
        embs.append(_check_embedding_batch(out, len(y)))
        labs.append(y)
        if bar is not None:
            bar.update(step)
    if not embs:
        raise ValueError("Nothing to embed: the dataset is empty.")
    return np.concatenate(embs), np.concatenate(labs)


def _embed_arrays(
    model_or_fn: Any, data: tuple[Any, Any], batch_size: int, verbose: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`embed` of ``(images, labels)`` arrays: ``model.predict`` or the callable per slice."""
    x, y = data
    labels = _flat_labels(y)
    n = len(labels)
    if n == 0:
        raise ValueError("Nothing to embed: the data set is empty.")
    if isinstance(model_or_fn, keras.Model):
        out = model_or_fn.predict(x, batch_size=batch_size, verbose=1 if verbose == 1 else 0)
        return _check_embedding_batch(out, n), labels
    x = _to_numpy(x)
    if len(x) != n:
        raise ValueError(f"got {len(x)} inputs but {n} labels.")
    chunks = [
        _check_embedding_batch(model_or_fn(x[i : i + batch_size]), len(x[i : i + batch_size]))
        for i in range(0, n, batch_size)
    ]
    return np.concatenate(chunks), labels


def evaluate_model(
    model: keras.Model | Callable[[Any], Any],
    data: Data,
    ks: Sequence[int] = (1, 2, 4, 8),
    query_data: Data | None = None,
    *,
    batch_size: int = 256,
    **kw: Any,
) -> dict[str, float]:
    """Embeds ``data`` (and ``query_data``) and computes the retrieval metrics.

    Args:
        model: see :func:`embed`.
        data: the evaluation set (all-vs-all), or the gallery when
            ``query_data`` is given (In-shop).
        ks: k values for Recall@k.
        query_data: optional query set for query/gallery evaluation.
        batch_size: see :func:`embed`.
        **kw: forwarded to :func:`detreg_keras.metrics.evaluate_embeddings`
            (``metrics``, ``normalize``, ``max_r``, ``chunk_size``, ...).

    Returns:
        The metric dict of :func:`detreg_keras.metrics.evaluate_embeddings`.
    """
    emb, labels = embed(model, data, batch_size=batch_size)
    q_emb = q_labels = None
    if query_data is not None:
        q_emb, q_labels = embed(model, query_data, batch_size=batch_size)
    return _metrics.evaluate_embeddings(
        emb, labels, ks, query_embeddings=q_emb, query_labels=q_labels, **kw
    )


def metric_keys(ks: Sequence[int], metrics: Sequence[str]) -> list[str]:
    """The keys :func:`~detreg_keras.metrics.evaluate_embeddings` returns.

    Args:
        ks: k values for Recall@k.
        metrics: metric groups (see ``detreg_keras.metrics.METRIC_NAMES``).

    Returns:
        The result keys, e.g. ``["recall@1", "recall@2", "map@r"]``.
    """
    return _metrics.metric_keys(ks, metrics)


class RetrievalEvaluation(keras.callbacks.Callback):
    """Computes retrieval metrics during ``fit`` and keeps the best checkpoint.

    Every ``every_n_epochs`` epochs (after epochs ``n, 2n, ...``, 1-based) the
    model embeds ``data`` (and ``query_data``) and the metrics of
    :func:`detreg_keras.metrics.evaluate_embeddings` are written into the epoch
    ``logs`` as ``prefix + key`` (``val_recall@1``, ``val_map@r``, ...). Keras
    passes one ``logs`` dict to all callbacks in list order and appends its own
    ``History`` and progress bar after the user's callbacks, so the values reach
    ``model.fit(...).history`` and the progress bar. Epochs without evaluation
    get no entry (the history list for a key then has one entry per evaluation).

    Ordering: callbacks that *read* the logs at epoch end --
    ``keras.callbacks.TensorBoard``, ``CSVLogger``, ``EarlyStopping``,
    ``ModelCheckpoint``, ``ReduceLROnPlateau`` -- must come **after** this
    callback in the ``callbacks`` list, e.g.
    ``callbacks=[RetrievalEvaluation(val_ds), keras.callbacks.TensorBoard(logdir)]``.
    TensorBoard writes ``val_``-prefixed keys to its ``validation`` run with the
    ``val_`` removed (tag ``epoch_recall@1``).

    Best checkpoint: when ``filepath`` is given, the model is saved with
    ``model.save(filepath)`` whenever ``monitor`` improves (strictly, per
    ``mode``). The best value persists across ``fit`` calls, like
    ``keras.callbacks.ModelCheckpoint``.

    Note on model selection: the DReg and Proxy Anchor papers report the best
    epoch chosen on the *test* split (there is no validation split in the
    standard CUB/Cars/SOP/In-shop protocols). This callback is meant for a
    held-out *validation* split (e.g. classes split off the training classes);
    selecting on the test split gives optimistic numbers.

    Args:
        data: evaluation data for :func:`embed` (the gallery in query/gallery
            mode).
        query_data: optional query data (In-shop style evaluation).
        ks: k values for Recall@k.
        metrics: metric groups, see :data:`detreg_keras.metrics.METRIC_NAMES`.
        every_n_epochs: evaluate after every n-th epoch.
        prefix: prefix of the log keys.
        monitor: log key used for the best checkpoint (including the prefix).
        mode: ``"max"`` or ``"min"``.
        filepath: where to save the best model (``.keras`` or ``.h5``); ``None``
            tracks the best value without saving.
        batch_size: batch size for embedding.
        verbose: 1 prints the metrics and checkpoint saves, 0 is silent.
        **eval_kwargs: forwarded to
            :func:`detreg_keras.metrics.evaluate_embeddings` (``max_r``,
            ``normalize``, ``chunk_size``, ``use_gpu``, ...).

    Attributes:
        best: best monitored value so far (``-inf``/``inf`` before any).
        best_epoch: 0-based epoch of ``best`` or ``None``.
        last_metrics: un-prefixed metrics of the last evaluation.
        results: ``{epoch: metrics}`` for every evaluation.
    """

    def __init__(
        self,
        data: Data,
        query_data: Data | None = None,
        *,
        ks: Sequence[int] = (1, 2, 4, 8),
        metrics: Sequence[str] = DEFAULT_CALLBACK_METRICS,
        every_n_epochs: int = 1,
        prefix: str = "val_",
        monitor: str | None = "val_recall@1",
        mode: str = "max",
        filepath: str | os.PathLike | None = None,
        batch_size: int = 256,
        verbose: int = 1,
        **eval_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(metrics, str):
            metrics = (metrics,)
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.data = data
        self.query_data = query_data
        self.ks = tuple(int(k) for k in ks)
        self.metrics = tuple(metrics)
        self.every_n_epochs = int(every_n_epochs)
        self.prefix = prefix
        self.monitor = monitor
        self.mode = mode
        self.filepath = None if filepath is None else os.fspath(filepath)
        self.batch_size = int(batch_size)
        self.verbose = int(verbose)
        self.eval_kwargs = dict(eval_kwargs)

        self.log_keys = [prefix + key for key in metric_keys(self.ks, self.metrics)]
        if monitor is not None and monitor not in self.log_keys:
            raise ValueError(
                f"monitor={monitor!r} is not one of the keys this callback writes: "
                f"{self.log_keys}."
            )
        if self.filepath is not None:
            if monitor is None:
                raise ValueError("filepath needs a monitor to choose the best model.")
            if not self.filepath.endswith((".keras", ".h5")):
                raise ValueError(
                    f"filepath must end in '.keras' (or legacy '.h5') for model.save, got "
                    f"{self.filepath!r}."
                )
        self.best = -math.inf if mode == "max" else math.inf
        self.best_epoch: int | None = None
        self.last_metrics: dict[str, float] = {}
        self.results: dict[int, dict[str, float]] = {}

    def _improved(self, value: float) -> bool:
        if value is None or math.isnan(value):
            return False
        return value > self.best if self.mode == "max" else value < self.best

    def evaluate(self) -> dict[str, float]:
        """Runs the evaluation now and returns the un-prefixed metrics."""
        return evaluate_model(
            self.model,
            self.data,
            self.ks,
            self.query_data,
            batch_size=self.batch_size,
            metrics=self.metrics,
            **self.eval_kwargs,
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Evaluates on schedule, updates ``logs`` in place, saves the best model."""
        if (epoch + 1) % self.every_n_epochs != 0:
            return
        results = self.evaluate()
        self.last_metrics = results
        self.results[epoch] = results
        prefixed = {self.prefix + k: float(v) for k, v in results.items()}
        if logs is not None:
            logs.update(prefixed)
        if self.verbose:
            shown = " - ".join(f"{k}: {v:.4f}" for k, v in prefixed.items())
            print(f"Epoch {epoch + 1}: retrieval {shown}")
        if self.monitor is None:
            return
        value = prefixed[self.monitor]
        if self._improved(value):
            previous = self.best
            self.best, self.best_epoch = value, epoch
            if self.filepath is not None:
                Path(self.filepath).parent.mkdir(parents=True, exist_ok=True)
                self.model.save(self.filepath)
                if self.verbose:
                    print(
                        f"Epoch {epoch + 1}: {self.monitor} improved from {previous:.5f} to "
                        f"{value:.5f}, saving model to {self.filepath}"
                    )


_RECALL_KEY = re.compile(r"(?:^|_)recall@(\d+)$")


def plot_recall_at_k(
    metrics_by_name: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    title: str = "Recall@K",
    percent: bool = True,
) -> Path:
    """Writes a PNG with one Recall@k curve per entry.

    Args:
        metrics_by_name: ``{curve name: metrics dict}``; the metrics dicts are
            those of :func:`evaluate_model` (keys ``recall@<k>``, possibly with a
            prefix such as ``val_recall@<k>``); other keys are ignored.
        path: output PNG path (parent folders are created).
        title: plot title.
        percent: plot recall in percent (as the papers' tables) instead of [0, 1].

    Returns:
        The written path.

    Raises:
        ValueError: if a curve has no ``recall@k`` entries or nothing to plot.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    if not metrics_by_name:
        raise ValueError("metrics_by_name is empty: nothing to plot.")
    fig = Figure(figsize=(5.0, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    all_ks: set[int] = set()
    scale = 100.0 if percent else 1.0
    for name, values in metrics_by_name.items():
        points = sorted(
            (int(m.group(1)), float(v))
            for key, v in values.items()
            if (m := _RECALL_KEY.search(key)) is not None
        )
        if not points:
            raise ValueError(f"{name!r} has no 'recall@k' entries (keys: {sorted(values)}).")
        ks = [k for k, _ in points]
        all_ks.update(ks)
        ax.plot(ks, [v * scale for _, v in points], marker="o", label=str(name))
    ax.set_xscale("log", base=2)
    ticks = sorted(all_ks)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(k) for k in ticks])
    ax.set_xlabel("k")
    ax.set_ylabel("Recall@k (%)" if percent else "Recall@k")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
