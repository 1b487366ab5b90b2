"""The one place faiss indexes are built and searched: evaluation and :class:`~detreg_runtime.index.EmbeddingIndex`.

numpy and faiss only (no TensorFlow), so the serving runtime uses it as is;
:mod:`detreg_keras.metrics.search` re-exports it for the metrics.

* :func:`build_faiss_index` builds an inner-product index of kind ``"flat"``
  (exact ``IndexFlatIP``), ``"ivf"`` (``IndexIVFFlat``) or ``"hnsw"``
  (``IndexHNSWFlat``), on the GPU when asked and supported (flat only);
  :func:`resolve_index_params` checks and completes its parameters.
* :func:`search_faiss_index` searches any such index in query chunks, with
  per-call ``nprobe`` / ``ef_search``.
* :class:`FaissKNN` is the kNN backend of the retrieval metrics (the
  ``knn_func`` of :func:`~detreg_keras.metrics.evaluate_embeddings`): it
  builds a flat index on the gallery and, in all-vs-all mode, removes each
  query from its own result *by id*. :func:`knn_search` is a call of it.

faiss is imported lazily, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from detreg_runtime.arrays import ArrayLike, UseGpu, as_matrix, check_positive_int, is_int

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "INDEX_KINDS",
    "FaissKNN",
    "build_faiss_index",
    "check_index_kind",
    "gpu_available",
    "knn_search",
    "resolve_index_params",
    "resolve_use_gpu",
    "search_faiss_index",
]

logger = logging.getLogger(__name__)

#: Queries searched per faiss call. Each call holds ``chunk_size * (k + 1)``
#: similarities (float32) and ids (int64), i.e. ``chunk_size * (k + 1) * 12``
#: bytes: 4096 queries with k = 1000 is about 49 MB.
DEFAULT_CHUNK_SIZE = 4096
#: Index kinds :func:`build_faiss_index` builds.
INDEX_KINDS = ("flat", "ivf", "hnsw")
#: Largest k the faiss GPU brute-force search supports; larger k runs on CPU.
_GPU_MAX_K = 2048
_PARAM_ALIASES = {
    "M": "m",
    "efSearch": "ef_search",
    "efsearch": "ef_search",
    "efConstruction": "ef_construction",
    "efconstruction": "ef_construction",
}
_KIND_PARAMS = {
    "flat": set(),
    "ivf": {"nlist", "nprobe", "train_size", "niter"},
    "hnsw": {"m", "ef_search", "ef_construction"},
}
_GPU_RESOURCES: Any = None


def gpu_available() -> bool:
    """True when faiss has GPU support and sees at least one GPU."""
    try:
        import faiss  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_use_gpu(use_gpu: UseGpu) -> bool:
    """``"auto"``/``True``/``False`` -> whether to use the GPU.

    Raises:
        ValueError: on another value, or ``True`` without GPU faiss.
    """
    if use_gpu not in ("auto", True, False):
        raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}.")
    if use_gpu == "auto":
        return gpu_available()
    if use_gpu and not gpu_available():
        raise ValueError(
            "use_gpu=True but faiss has no GPU support here (install faiss-gpu and "
            "check faiss.get_num_gpus() > 0), or pass use_gpu='auto'."
        )
    return bool(use_gpu)


def check_index_kind(kind: Any) -> str:
    """Returns ``kind`` if it is one of :data:`INDEX_KINDS`.

    Raises:
        ValueError: naming the unknown kind and the valid ones.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"Unknown index kind {kind!r}; expected one of {INDEX_KINDS}.")
    return kind


def resolve_index_params(kind: str, num_items: int, **params: Any) -> dict[str, int]:
    """Checks the parameters of an index kind and fills in the defaults.

    Args:
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"``.
        num_items: number of vectors the index is built from.
        **params: for ``"ivf"``: ``nlist`` (default ``≈4·sqrt(N)``, at most
            ``N // 39``), ``nprobe`` (default ``max(1, nlist // 16)``),
            ``train_size`` (k-means sample, default ``min(N, 50·nlist)``) and
            ``niter`` (k-means iterations, 10 as in faiss); for ``"hnsw"``:
            ``m``/``M`` (32), ``ef_search``/``efSearch`` (128) and
            ``ef_construction``/``efConstruction`` (40). ``None`` values are
            ignored.

    Returns:
        The complete parameters, canonical names, integer values.

    Raises:
        ValueError: unknown kind or parameter, a value ``< 1``, or an IVF
            index with more lists than training vectors.
    """
    check_index_kind(kind)
    out: dict[str, int] = {}
    for key, value in params.items():
        if value is None:
            continue
        key = _PARAM_ALIASES.get(key, key)
        if key not in _KIND_PARAMS[kind]:
            raise ValueError(f"Unknown parameter {key!r} for kind={kind!r}; expected {sorted(_KIND_PARAMS[kind])}.")
        if int(value) < 1:
            raise ValueError(f"{key} must be >= 1, got {value}.")
        out[key] = int(value)
    if kind == "ivf":
        nlist = out.setdefault("nlist", max(1, min(round(4 * np.sqrt(num_items)), num_items // 39)))
        if nlist > num_items:
            raise ValueError(f"kind='ivf' needs at least nlist={nlist} embeddings to train, got {num_items}.")
        out.setdefault("nprobe", max(1, nlist // 16))
        if min(num_items, out.setdefault("train_size", min(num_items, 50 * nlist))) < nlist:
            raise ValueError(f"train_size={out['train_size']} must be >= nlist={nlist}.")
        out.setdefault("niter", 10)
    elif kind == "hnsw":
        out.setdefault("m", 32)
        out.setdefault("ef_construction", 40)
        out.setdefault("ef_search", 128)
    return out


def _ivf_index(x: np.ndarray, params: dict[str, int]) -> Any:
    import faiss  # noqa: PLC0415

    n, dim = x.shape
    nlist, train_size = params["nlist"], min(n, params["train_size"])
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = params["niter"]
    index.cp.max_points_per_centroid = max(1, -(-train_size // nlist))
    sample = x if train_size >= n else x[np.sort(np.random.default_rng(0).choice(n, train_size, replace=False))]
    index.train(sample)
    index.nprobe = params["nprobe"]
    return index


def _hnsw_index(dim: int, params: dict[str, int]) -> Any:
    import faiss  # noqa: PLC0415

    index = faiss.IndexHNSWFlat(dim, params["m"], faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params["ef_construction"]
    index.hnsw.efSearch = params["ef_search"]
    return index


def _flat_index(dim: int, use_gpu: bool) -> Any:
    import faiss  # noqa: PLC0415

    global _GPU_RESOURCES
    index = faiss.IndexFlatIP(dim)
    if use_gpu:
        if _GPU_RESOURCES is None:
            _GPU_RESOURCES = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index)
    return index


def build_faiss_index(
    vectors: ArrayLike, kind: str = "flat", *, use_gpu: UseGpu = False, **params: Any
) -> tuple[Any, dict[str, int]]:
    """Builds an inner-product faiss index holding ``vectors`` (in row order).

    Args:
        vectors: [N, D] float vectors (unit vectors for cosine similarity).
        kind: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"``.
        use_gpu: ``"auto"``, ``True`` or ``False`` (default): put a flat index
            on the GPU (see :class:`FaissKNN`). Approximate kinds stay on CPU.
        **params: the kind's parameters, see :func:`resolve_index_params`.

    Returns:
        ``(index, params)``: the faiss index and its complete parameters.

    Raises:
        ValueError: on bad vectors, kind or parameters.
    """
    x = as_matrix(vectors, "vectors")
    kind = str(kind).lower()
    params = resolve_index_params(kind, x.shape[0], **params)
    gpu = resolve_use_gpu(use_gpu)
    if kind == "ivf":
        index = _ivf_index(x, params)
    elif kind == "hnsw":
        index = _hnsw_index(x.shape[1], params)
    else:
        index = _flat_index(x.shape[1], gpu)
    index.add(x)
    return index, params


def _search_params(kind: str, params: dict[str, int], k: int, nprobe: int | None, ef_search: int | None) -> Any:
    import faiss  # noqa: PLC0415

    if kind == "ivf":
        return faiss.SearchParametersIVF(nprobe=int(nprobe or params["nprobe"]))
    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=max(int(ef_search or params["ef_search"]), k))
    if nprobe is not None or ef_search is not None:
        raise ValueError("nprobe applies to kind='ivf' and ef_search to kind='hnsw' only.")
    return None


def search_faiss_index(
    index: Any,
    queries: np.ndarray,
    k: int,
    *,
    kind: str = "flat",
    params: dict[str, int] | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest inner products of each query in a :func:`build_faiss_index` index.

    Args:
        index: the faiss index.
        queries: float32 C-contiguous [Q, D] (already validated).
        k: neighbours per query (``>= 1``).
        kind: the index kind (selects the per-call search parameters).
        params: the index parameters returned by :func:`build_faiss_index`.
        nprobe: IVF lists probed (overrides ``params`` for this call).
        ef_search: HNSW search breadth (overrides ``params``; at least ``k``).
        chunk_size: queries per faiss call (bounds the intermediate results).

    Returns:
        ``(scores [Q, k] float32, positions [Q, k] int64)``, best first; an
        approximate index pads unfilled slots with position ``-1``.
    """
    search_params = _search_params(kind, params or {}, k, nprobe, ef_search)
    n = queries.shape[0]
    scores = np.empty((n, k), dtype=np.float32)
    positions = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, int(chunk_size)):
        stop = min(start + int(chunk_size), n)
        scores[start:stop], positions[start:stop] = index.search(queries[start:stop], k, params=search_params)
    return scores, positions


def _drop_self(ids: np.ndarray, sims: np.ndarray, start: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Removes each query's own id (rows ``start, start+1, ...``) from its k+1 results.

    Rows whose own id is not among the k+1 results (more than k exact ties
    with the query itself) drop their last neighbour instead.
    """
    keep = ids != np.arange(start, start + ids.shape[0], dtype=np.int64)[:, None]
    keep[keep.all(axis=1), -1] = False
    return ids[keep].reshape(-1, k), sims[keep].reshape(-1, k)


class FaissKNN:
    """Exact maximum-inner-product kNN with faiss ``IndexFlatIP``: the metrics' search backend.

    Call it as ``knn(queries, gallery, k, exclude_self=True)``. The vectors are
    used as given (normalise them first for cosine similarity). With
    ``gallery=None`` the search is all-vs-all: the queries are also the gallery
    and, when ``exclude_self`` is true, each query's own index is removed from
    its result *by id*: the search asks for ``k + 1`` neighbours and drops the
    query's own id if present, otherwise the last (k+1-th) neighbour. This
    stays correct when exact duplicates tie with the query itself.

    Memory: besides the gallery index (``N_gallery * D * 4`` bytes, on the GPU
    when used) and the returned arrays (``N_queries * k * 12`` bytes), a call
    holds at most ``chunk_size * (k + 1) * 12`` bytes of intermediate results
    plus faiss's fixed-size internal distance tiles.

    Args:
        use_gpu: ``"auto"`` uses GPU faiss when it is installed and
            ``faiss.get_num_gpus() > 0``; ``True`` requires it; ``False`` forces
            CPU. GPU search is limited to k <= 2048 and falls back to CPU above.
        chunk_size: number of queries per faiss search call (>= 1).

    Raises:
        ValueError: on a bad ``use_gpu`` or ``chunk_size``.
    """

    def __init__(self, use_gpu: UseGpu = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        resolve_use_gpu(use_gpu)
        self.use_gpu = use_gpu
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")

    def __repr__(self) -> str:
        return f"FaissKNN(use_gpu={self.use_gpu!r}, chunk_size={self.chunk_size})"

    def __call__(
        self, queries: ArrayLike, gallery: ArrayLike | None, k: int, exclude_self: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(indices int64 [Nq, k], similarities float32 [Nq, k])``, best first.

        Raises:
            ValueError: on non-2-D, empty, non-finite or dimension-mismatched
                inputs, or ``k`` outside ``[1, available gallery size]``.
        """
        q = as_matrix(queries, "queries")
        g = q if gallery is None else as_matrix(gallery, "gallery")
        if g.shape[1] != q.shape[1]:
            raise ValueError(
                f"gallery has dimension {g.shape[1]} but queries have dimension {q.shape[1]}; "
                "both must come from the same embedding space."
            )
        drop_self = gallery is None and exclude_self
        k = self._check_k(k, g.shape[0], drop_self)
        k_search = k + 1 if drop_self else k
        gpu = resolve_use_gpu(self.use_gpu)
        if gpu and k_search > _GPU_MAX_K:
            logger.info("k=%d exceeds the faiss GPU limit (%d); searching on CPU.", k_search, _GPU_MAX_K)
            gpu = False
        index, _ = build_faiss_index(g, "flat", use_gpu=gpu)
        ids = np.empty((q.shape[0], k), dtype=np.int64)
        sims = np.empty((q.shape[0], k), dtype=np.float32)
        for start in range(0, q.shape[0], self.chunk_size):
            stop = min(start + self.chunk_size, q.shape[0])
            s_chunk, i_chunk = search_faiss_index(index, q[start:stop], k_search, chunk_size=self.chunk_size)
            if drop_self:
                i_chunk, s_chunk = _drop_self(i_chunk, s_chunk, start, k)
            ids[start:stop], sims[start:stop] = i_chunk, s_chunk
        if (ids < 0).any():  # pragma: no cover - faiss pads with -1 only if k > Ng
            raise RuntimeError("faiss returned fewer neighbours than requested.")
        return ids, sims

    @staticmethod
    def _check_k(k: Any, num_gallery: int, drop_self: bool) -> int:
        if not is_int(k):
            raise ValueError(f"k must be an integer number of neighbours, got {k!r}.")
        available = num_gallery - (1 if drop_self else 0)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        if k > available:
            detail = f"{num_gallery} items minus the query itself" if drop_self else f"{num_gallery} items"
            raise ValueError(
                f"k={k} exceeds the number of gallery items available per query ({available}: {detail})."
            )
        return int(k)


def knn_search(
    queries: ArrayLike,
    gallery: ArrayLike | None = None,
    k: int | None = None,
    *,
    exclude_self: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    use_gpu: UseGpu = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product kNN search: ``FaissKNN(use_gpu, chunk_size)(queries, gallery, k)``.

    Args:
        queries: [Nq, D] query vectors.
        gallery: [Ng, D] gallery vectors, or ``None`` for all-vs-all.
        k: number of neighbours per query (required), ``1 <= k <= Ng`` (``<= Nq - 1`` in
            all-vs-all mode with ``exclude_self``).
        exclude_self: in all-vs-all mode, drop each query from its own result.
            Ignored when a separate ``gallery`` is given.
        chunk_size: number of queries per faiss search call (>= 1).
        use_gpu: see :class:`FaissKNN`.

    Returns:
        ``(indices, similarities)``: int64 [Nq, k] gallery indices and float32
        [Nq, k] inner products, sorted by decreasing similarity per row.

    Raises:
        ValueError: see :class:`FaissKNN`.
    """
    return FaissKNN(use_gpu=use_gpu, chunk_size=chunk_size)(queries, gallery, k, exclude_self=exclude_self)
