"""A faiss index of embeddings with ids and labels: exact or approximate cosine search, save/load without pickle.

:class:`EmbeddingIndex` stores embeddings with their ids and labels in a faiss
index: exact inner product (``"flat"``, ``IndexFlatIP``) or approximate
(``"ivf"``: IVF-Flat with ``nlist``/``nprobe``; ``"hnsw"``: HNSW with
``M``/``ef_search``). Embeddings are unit vectors, so inner product is cosine
similarity. ``save``/``load`` use faiss's own ``write_index``/``read_index``,
``.npy`` arrays loaded with ``allow_pickle=False`` and a JSON metadata file —
no pickle anywhere; the metadata stores the sha256 of each file, and ``load``
refuses files that changed since ``save``, an index built by another model
(model hash) or of another dimension. No TensorFlow: numpy and faiss only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detreg_runtime._version import detreg_version
from detreg_runtime.search import INDEX_KINDS, build_faiss_index, check_index_kind, search_faiss_index

INDEX_FORMAT = "detreg-embedding-index"
INDEX_FORMAT_VERSION = 2  # 2: sha256 checksums of the files in the metadata
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
METADATA_FILE = "metadata.json"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Matches:
    """Result of :meth:`EmbeddingIndex.match`, one entry per query.

    Attributes:
        labels: the top-1 neighbour's label where its cosine is ``>= threshold``, else ``"unknown"``.
        ids: the top-1 neighbour's id (whether matched or not).
        scores: the top-1 cosine similarity (float32; ``-inf`` when an approximate index found none).
        matched: ``scores >= threshold``.
        threshold: the threshold used.
    """

    labels: list
    ids: np.ndarray
    scores: np.ndarray
    matched: np.ndarray
    threshold: float



def _as_matrix(x, what: str, dim: int | None = None) -> np.ndarray:
    array = np.asarray(x)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what} must be a numeric array, got dtype {array.dtype}.")
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [N, D], got shape {array.shape}.")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} have dimension {array.shape[1]}, the index has dimension {dim}.")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contain NaN or infinite values.")
    return array


def _as_column(values, n: int, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object:
        if all(isinstance(v, str) for v in array.ravel()):
            array = array.astype(str)
        else:
            raise ValueError(f"{what} must be integers or strings.")
    if array.ndim != 1 or len(array) != n:
        raise ValueError(f"{what} must be a 1-D array of length {n}, got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        return array.astype(np.int64)
    if array.dtype.kind == "U":
        return array
    if array.dtype.kind == "S":
        return array.astype(str)
    raise ValueError(f"{what} must be integers or strings, got dtype {array.dtype}.")


def _missing_value(array: np.ndarray):
    return "" if array.dtype.kind == "U" else -1


def _read_index_metadata(directory: Path) -> dict[str, Any]:
    """The parsed ``metadata.json`` of an index folder, checked to be a detreg index this code can read."""
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not an index folder (no {METADATA_FILE}).")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err}); rebuild the index.") from err
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{meta_path} is not a {INDEX_FORMAT} metadata file.")
    if int(meta.get("format_version", -1)) > INDEX_FORMAT_VERSION:
        raise ValueError(f"{directory} has index format version {meta['format_version']}; this code reads "
                         f"<= {INDEX_FORMAT_VERSION}. Upgrade detreg-keras.")
    return meta


def _index_member(directory: Path, name: Any, role: str) -> Path:
    """``directory / name`` for a file named in the metadata, refusing any path that leaves the folder."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(
            f"{directory / METADATA_FILE}: files.{role} must be a plain file name inside the index folder, "
            f"got {name!r}."
        )
    path = directory / name
    if path.is_symlink() or path.resolve().parent != directory.resolve():
        raise ValueError(f"{directory / METADATA_FILE}: files.{role} {name!r} points outside the index folder.")
    if not path.is_file():
        raise FileNotFoundError(f"Index {directory} lacks its {role} file {name!r}; rebuild the index.")
    return path


def _verify_checksums(directory: Path, meta: dict[str, Any], paths: Sequence[Path]) -> None:
    """Compare each file with the sha256 stored at save time (format 2); warn for format-1 indexes without any."""
    checksums = meta.get("checksums")
    if not checksums:
        warnings.warn(
            f"Index {directory} has no checksums (format version {meta.get('format_version')}): a replaced or "
            "reordered index.faiss / ids.npy cannot be detected. Rebuild it with this version to add them.",
            UserWarning,
            stacklevel=3,
        )
        return
    for path in paths:
        expected = checksums.get(path.name)
        if expected is None:
            raise ValueError(f"{directory / METADATA_FILE} has no checksum for {path.name}; rebuild the index.")
        if file_sha256(path) != expected:
            raise ValueError(
                f"{path} does not match the checksum in {METADATA_FILE}: the file was modified, replaced or "
                "truncated after the index was saved. Rebuild the index (scripts/detreg_index.py build)."
            )


def _load_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy array (truncated, corrupt or pickled): {err}") from err


class EmbeddingIndex:
    """A faiss index of embeddings with ids and labels (inner product = cosine for unit vectors).

    Example::

        index = EmbeddingIndex(model_hash=embedder.model_hash).build(emb, ids=paths, labels=classes, kind="hnsw")
        ids, labels, scores = index.search(embedder.embed(queries), k=5)
        index.save("index_dir")
        index = EmbeddingIndex.load("index_dir", expected_model_hash=embedder.model_hash)

    Args:
        model_hash: hash of the model that produced the embeddings
            (:attr:`Embedder.model_hash`); ``load`` checks it.
    """

    def __init__(self, model_hash: str | None = None):
        self.model_hash = model_hash
        self.index = None
        self.kind: str | None = None
        self.params: dict[str, int] = {}
        self.ids: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.extra: dict[str, Any] = {}
        self.threshold: float | None = None
        self.calibration: dict[str, Any] | None = None

    # ---------------------------------------------------------- properties
    @property
    def dimension(self) -> int | None:
        return None if self.index is None else int(self.index.d)

    @property
    def count(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex(kind={self.kind!r}, count={self.count}, dimension={self.dimension}, "
            f"params={self.params})"
        )

    # --------------------------------------------------------------- build
    def build(
        self,
        embeddings: np.ndarray,
        ids: Sequence | np.ndarray | None = None,
        labels: Sequence | np.ndarray | None = None,
        kind: str = "flat",
        **params,
    ) -> EmbeddingIndex:
        """Index ``embeddings [N, D]`` (replacing any previous content); returns ``self``.

        Args:
            embeddings: float array ``[N, D]`` (unit vectors for cosine similarity).
            ids: one id per row, integers or strings (unique); default ``0..N-1``.
            labels: optional label per row, integers or strings (e.g. class names).
            kind: ``"flat"`` (exact, ``IndexFlatIP``), ``"ivf"`` (IVF-Flat) or ``"hnsw"``.
            **params: the kind's parameters (``nlist``, ``nprobe``, ``train_size``, ``niter``
                for ``"ivf"``; ``M``/``m``, ``ef_search``, ``ef_construction`` for ``"hnsw"``)
                and their defaults: :func:`~detreg_runtime.search.resolve_index_params`.

        Raises:
            ValueError: bad shapes, non-finite values, duplicate ids, unknown kind/params,
                or fewer embeddings than IVF lists.
        """
        kind = check_index_kind(str(kind).lower())
        x = _as_matrix(embeddings, "Embeddings")
        n = x.shape[0]
        if n == 0:
            raise ValueError("Cannot build an index from 0 embeddings.")
        ids_arr = np.arange(n, dtype=np.int64) if ids is None else _as_column(ids, n, "ids")
        if len(np.unique(ids_arr)) != n:
            raise ValueError("ids must be unique.")
        labels_arr = None if labels is None else _as_column(labels, n, "labels")
        index, params = build_faiss_index(x, kind, **params)
        self.index, self.kind, self.params = index, kind, params
        self.ids, self.labels = ids_arr, labels_arr
        return self

    def add(self, embeddings: np.ndarray, ids=None, labels=None) -> EmbeddingIndex:
        """Append embeddings to a built index (ids default to ``max(ids) + 1, ...`` for integer ids)."""
        if self.index is None:
            raise ValueError("Build the index before adding to it.")
        x = _as_matrix(embeddings, "Embeddings", self.dimension)
        n = len(x)
        if ids is None:
            if self.ids.dtype.kind == "U":
                raise ValueError("This index has string ids: pass ids= to add().")
            start = int(self.ids.max()) + 1 if len(self.ids) else 0
            new_ids = np.arange(start, start + n, dtype=np.int64)
        else:
            new_ids = _as_column(ids, n, "ids")
        if new_ids.dtype.kind != self.ids.dtype.kind:
            raise ValueError(f"ids must have the same type as the index's ids ({self.ids.dtype}), got {new_ids.dtype}.")
        if len(np.unique(np.concatenate([self.ids, new_ids]))) != len(self.ids) + n:
            raise ValueError("ids must be unique (some new ids are duplicated or already in the index).")
        if (labels is None) != (self.labels is None):
            raise ValueError("Pass labels to add() exactly when the index has labels.")
        new_labels = None if labels is None else _as_column(labels, n, "labels")
        if new_labels is not None and new_labels.dtype.kind != self.labels.dtype.kind:
            raise ValueError(f"labels must have the same type as the index's labels ({self.labels.dtype}).")
        self.index.add(x)
        self.ids = np.concatenate([self.ids, new_ids])
        if new_labels is not None:
            self.labels = np.concatenate([self.labels, new_labels])
        return self

    # -------------------------------------------------------------- search
    def search(
        self, queries: np.ndarray, k: int = 10, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The ``k`` most similar indexed items of each query.

        Args:
            queries: ``[Q, D]`` (or one ``[D]`` vector).
            k: neighbours per query (at most the index size).
            nprobe: IVF lists probed (overrides the index default for this call).
            ef_search: HNSW search breadth (overrides the default for this call).

        Returns:
            ``(ids [Q, k], labels [Q, k] or None, scores [Q, k] float32)``, best
            first. Slots an approximate index could not fill hold id/label ``-1``
            (``""`` for string ids/labels) and score ``-inf``.

        Raises:
            ValueError: empty index, bad query shape/dimension or ``k < 1``.
        """
        if self.index is None or self.count == 0:
            raise ValueError("The index is empty: build() or load() it first.")
        q = _as_matrix(queries, "Queries", self.dimension)
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        k = min(int(k), self.count)
        scores, positions = search_faiss_index(
            self.index, q, k, kind=self.kind, params=self.params, nprobe=nprobe, ef_search=ef_search
        )
        missing = positions < 0
        safe = np.where(missing, 0, positions)
        ids = self.ids[safe]
        labels = None if self.labels is None else self.labels[safe]
        if missing.any():
            ids = np.where(missing, _missing_value(self.ids), ids)
            if labels is not None:
                labels = np.where(missing, _missing_value(self.labels), labels)
            scores = np.where(missing, -np.inf, scores)
        return ids, labels, scores.astype(np.float32, copy=False)

    # --------------------------------------------------------- verification
    def set_threshold(self, threshold) -> EmbeddingIndex:
        """Set (or with ``None`` clear) the cosine threshold :meth:`match` uses; saved in ``metadata.json``.

        Args:
            threshold: a float in ``[-1, 1]``, a :class:`~detreg_runtime.verification.Calibration`
                (its threshold and rates are stored) or ``None``.

        Raises:
            ValueError: a threshold outside ``[-1, 1]`` or not a number.
        """
        from detreg_runtime.verification import Calibration, check_threshold  # noqa: PLC0415

        if threshold is None:
            self.threshold, self.calibration = None, None
        elif isinstance(threshold, Calibration):
            self.threshold, self.calibration = check_threshold(threshold.threshold), threshold.to_dict()
        else:
            self.threshold, self.calibration = check_threshold(threshold), None
        return self

    def calibrate(
        self,
        embeddings: np.ndarray,
        labels: Sequence | np.ndarray,
        target_fmr: float | None = None,
        target_precision: float | None = None,
        max_genuine: int | None = None,
        max_impostor: int | None = None,
        seed: int = 0,
    ):
        """Calibrate the threshold on held-out labelled embeddings (not the indexed ones) and set it.

        The pairs of ``embeddings`` are scored by cosine; the threshold is
        :func:`~detreg_runtime.verification.calibrate_threshold`'s for the target.
        It is a *pair* threshold: :meth:`match` compares it with the top-1
        neighbour's cosine, whose false-match rate grows with the index size.

        Returns:
            The :class:`~detreg_runtime.verification.Calibration` (also stored in ``metadata.json``).

        Raises:
            ValueError: pairs of one kind only (one label, or no label with two items), bad targets.
        """
        from detreg_runtime.verification import calibrate_threshold, verification_pairs  # noqa: PLC0415

        pairs = verification_pairs(embeddings, labels, max_genuine=max_genuine, max_impostor=max_impostor, seed=seed)
        calibration = calibrate_threshold(
            pairs.scores, pairs.genuine, target_fmr=target_fmr, target_precision=target_precision
        )
        self.set_threshold(calibration)
        return calibration

    def match(
        self,
        queries: np.ndarray,
        threshold: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Matches:
        """The label of each query's nearest indexed item if its cosine is ``>= threshold``, else ``"unknown"``.

        Args:
            queries: ``[Q, D]`` embeddings (or one ``[D]`` vector).
            threshold: cosine threshold in ``[-1, 1]``; ``None``: the index's
                (:meth:`set_threshold` / :meth:`calibrate`, saved with the index).
            nprobe, ef_search: as in :meth:`search`.

        Raises:
            ValueError: the index has no labels, no threshold is set or given, a
                threshold outside ``[-1, 1]``, or bad queries.
        """
        from detreg_runtime.verification import UNKNOWN, check_threshold  # noqa: PLC0415

        if threshold is None:
            if self.threshold is None:
                raise ValueError(
                    "No match threshold: pass threshold=, or set one with calibrate() / set_threshold() "
                    "(saved with the index)."
                )
            threshold = self.threshold
        threshold = check_threshold(threshold)
        if self.index is not None and self.labels is None:
            raise ValueError("match() returns labels, but this index has none: build it with labels=.")
        ids, labels, scores = self.search(queries, k=1, nprobe=nprobe, ef_search=ef_search)
        scores = scores[:, 0]
        matched = scores >= threshold
        out = [labels[q, 0].item() if matched[q] else UNKNOWN for q in range(len(scores))]
        return Matches(out, ids[:, 0], scores, matched, threshold)

    # ------------------------------------------------------------ save/load
    def metadata(self, checksums: dict[str, str] | None = None) -> dict[str, Any]:
        """The ``metadata.json`` content; ``checksums`` maps each written file name to its sha256."""
        import faiss  # noqa: PLC0415

        return {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "dimension": self.dimension,
            "kind": self.kind,
            "params": dict(self.params),
            "metric": "inner_product",
            "model_hash": self.model_hash,
            "count": self.count,
            "ids_dtype": None if self.ids is None else self.ids.dtype.str,
            "labels_dtype": None if self.labels is None else self.labels.dtype.str,
            "detreg_version": detreg_version(),
            "faiss_version": faiss.__version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {"index": INDEX_FILE, "ids": IDS_FILE, "labels": LABELS_FILE if self.labels is not None else None},
            "checksums": dict(checksums or {}),
            "extra": self.extra,
            "verification": None
            if self.threshold is None
            else {"threshold": self.threshold, "rule": "score >= threshold", "calibration": self.calibration},
        }

    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``index.faiss`` (faiss ``write_index``), ``ids.npy``, ``labels.npy`` and ``metadata.json``.

        The folder is written next to its final place and renamed when complete.

        Raises:
            FileExistsError: ``directory`` exists and is not empty, and ``overwrite`` is False.
            ValueError: the index is empty.
        """
        import faiss  # noqa: PLC0415

        if self.index is None:
            raise ValueError("Nothing to save: build() the index first.")
        directory = Path(directory)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty; pass overwrite=True (CLI: --overwrite).")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            os.chmod(tmp, 0o755)
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            np.save(tmp / IDS_FILE, self.ids, allow_pickle=False)
            if self.labels is not None:
                np.save(tmp / LABELS_FILE, self.labels, allow_pickle=False)
            checksums = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
            (tmp / METADATA_FILE).write_text(json.dumps(self.metadata(checksums), indent=2, sort_keys=True))
            if directory.exists():
                if directory.is_dir():
                    shutil.rmtree(directory)
                else:
                    directory.unlink()
            os.rename(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        expected_model_hash: str | None = None,
        expected_dimension: int | None = None,
    ) -> EmbeddingIndex:
        """Load an index written by :meth:`save` (no pickle: faiss ``read_index``, ``.npy``, JSON).

        Args:
            directory: the index folder.
            expected_model_hash: refuse the index unless it was built from this
                model's embeddings (:attr:`Embedder.model_hash`); without it the
                index loads with a ``UserWarning`` (nothing ties it to the query model).
            expected_dimension: refuse the index unless it has this dimension.

        Every file is checked against the sha256 stored in ``metadata.json`` at
        save time (a replaced, reordered or truncated ``index.faiss`` /
        ``ids.npy`` / ``labels.npy`` is refused); format-1 indexes, written
        before checksums existed, load with a ``UserWarning``. File names in the
        metadata must be plain names inside ``directory``.

        Raises:
            FileNotFoundError: missing folder or files.
            ValueError: not a detreg index, a checksum mismatch, unreadable or
                inconsistent files, a file outside the folder, model hash or dimension mismatch.
        """
        import faiss  # noqa: PLC0415

        directory = Path(directory)
        meta = _read_index_metadata(directory)
        stored_hash = meta.get("model_hash")
        if expected_model_hash is None:
            warnings.warn(
                f"EmbeddingIndex.load({str(directory)!r}) without expected_model_hash: the index (model "
                f"{stored_hash!r}) is not checked against the model that embeds the queries, and an index of "
                "another model returns meaningless neighbours. Pass expected_model_hash=embedder.model_hash.",
                UserWarning,
                stacklevel=2,
            )
        elif stored_hash != expected_model_hash:
            raise ValueError(
                f"Index {directory} was built with embeddings of model {stored_hash!r}, not of the model in use "
                f"({expected_model_hash!r}); its similarities would be meaningless. Rebuild the index with this model."
            )
        dimension = int(meta["dimension"])
        if expected_dimension is not None and dimension != int(expected_dimension):
            raise ValueError(
                f"Index {directory} has dimension {dimension}, expected {expected_dimension} (embedding dimension)."
            )
        kind = meta.get("kind")
        try:
            check_index_kind(kind)
        except ValueError as err:
            raise ValueError(f"{directory / METADATA_FILE}: {err}") from err
        files = meta.get("files") or {}
        index_path = _index_member(directory, files.get("index", INDEX_FILE), "index")
        ids_path = _index_member(directory, files.get("ids", IDS_FILE), "ids")
        labels_path = _index_member(directory, files["labels"], "labels") if files.get("labels") else None
        _verify_checksums(directory, meta, [p for p in (index_path, ids_path, labels_path) if p is not None])
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as err:
            detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ValueError(f"{index_path} is not a readable faiss index (truncated or corrupt?): {detail}") from err
        ids = _load_array(ids_path)
        labels = _load_array(labels_path) if labels_path is not None else None
        count = int(meta["count"])
        if int(index.d) != dimension:
            raise ValueError(f"{directory}: faiss index dimension {index.d} != metadata dimension {dimension}.")
        if int(index.ntotal) != count or len(ids) != count or (labels is not None and len(labels) != count):
            raise ValueError(
                f"{directory}: inconsistent sizes (faiss {index.ntotal}, ids {len(ids)}, "
                f"labels {None if labels is None else len(labels)}, metadata {count})."
            )
        out = cls(model_hash=stored_hash)
        out.index, out.kind, out.ids, out.labels = index, kind, ids, labels
        out.params = {k: int(v) for k, v in (meta.get("params") or {}).items()}
        out.extra = dict(meta.get("extra") or {})
        _load_verification(out, meta.get("verification"), directory)
        return out


def _load_verification(index: EmbeddingIndex, stored: Any, directory: Path) -> None:
    """Restore the match threshold saved in ``metadata.json`` (absent in indexes saved before it existed)."""
    if stored is None:
        return
    if not isinstance(stored, dict) or "threshold" not in stored:
        raise ValueError(f"{directory / METADATA_FILE}: 'verification' must be an object with a 'threshold'.")
    try:
        index.set_threshold(stored["threshold"])
    except ValueError as err:
        raise ValueError(f"{directory / METADATA_FILE}: {err}") from err
    calibration = stored.get("calibration")
    index.calibration = dict(calibration) if isinstance(calibration, dict) else None


def recall_against_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of the exact top-k found by an approximate search (recall@k of the index)."""
    approx_ids, exact_ids = np.asarray(approx_ids), np.asarray(exact_ids)
    if approx_ids.shape != exact_ids.shape:
        raise ValueError(f"Shapes differ: {approx_ids.shape} vs {exact_ids.shape}.")
    hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx_ids, exact_ids))
    return hits / exact_ids.size if exact_ids.size else 1.0


__all__ = [
    "INDEX_KINDS",
    "EmbeddingIndex",
    "Matches",
    "file_sha256",
    "recall_against_exact",
]
