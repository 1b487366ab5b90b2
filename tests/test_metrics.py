"""Tests for detreg_keras.metrics against an independent brute-force reference.

The reference below is written from the metric definitions (full similarity
matrix + argsort, per-query Python loops); it never calls the code under test.

Ties: faiss and argsort may order (near-)tied similarities differently, so the
reference is tie-aware. It groups each query's sorted neighbours into blocks whose
similarities are within ``TIE_TOL`` and evaluates the metrics on the two extreme
orderings inside each block: same-class items last (pessimistic) and first
(optimistic). All metrics here are monotone in moving a same-class item forward,
so any valid tie order gives a value between the two. Where a data set has no
cross-class ties the two bounds coincide and the comparison is exact; the tests
assert the bounds are tight so they cannot pass vacuously.
"""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras import metrics as M
from detreg_keras.metrics import exact

TIE_TOL = 1e-6


# --------------------------------------------------------------------------- #
# Independent reference
# --------------------------------------------------------------------------- #
def _ref_normalize(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ref_rankings(q, ql, g, gl, same_source, normalize=True, tie_tol=TIE_TOL):
    """Per query: the match rows (True = same class) under the two tie orders."""
    if normalize:
        q, g = _ref_normalize(q), _ref_normalize(g)
    sims = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
    pess, opt = [], []
    for i in range(len(q)):
        s = sims[i].copy()
        ids = np.arange(len(g))
        if same_source:  # exclude the query by its index
            s, ids = np.delete(s, i), np.delete(ids, i)
        order = np.argsort(-s, kind="stable")
        s_sorted = s[order]
        match = gl[ids[order]] == ql[i]
        block = np.concatenate([[0], np.cumsum(-np.diff(s_sorted) > tie_tol)])
        # lexsort: last key is primary. Pessimistic = negatives first in a block.
        pess.append(match[np.lexsort((match, block))])
        opt.append(match[np.lexsort((~match, block))])
    return np.array(pess), np.array(opt)


def _ref_r(ql, gl, same_source):
    return np.array([np.sum(gl == lab) - (1 if same_source else 0) for lab in ql])


def _ref_query_metrics(rows, r, ks, max_r=None):
    """Mean metrics from per-query match rows, straight from the definitions."""
    recall = {k: [] for k in ks}
    p1, rp, ap = [], [], []
    for row, big_r in zip(rows, r):
        for k in ks:
            recall[k].append(1.0 if row[:k].any() else 0.0)
        if big_r == 0:
            continue  # lone query: left out (AccuracyCalculator)
        rr = big_r if max_r is None else min(big_r, max_r)
        p1.append(float(row[0]))
        rp.append(row[:rr].sum() / rr)
        total, hits = 0.0, 0
        for i in range(rr):
            if row[i]:
                hits += 1
                total += hits / (i + 1)
        ap.append(total / rr)
    out = {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()}
    out["precision@1"] = float(np.mean(p1)) if p1 else 0.0
    out["r_precision"] = float(np.mean(rp)) if rp else 0.0
    out["map@r"] = float(np.mean(ap)) if ap else 0.0
    return out


def _reference(
    q, ql, g=None, gl=None, ks=(1, 2, 4, 8), max_r=None, normalize=True, tie_tol=TIE_TOL
):
    same = g is None
    if same:
        g, gl = q, ql
    pess_rows, opt_rows = _ref_rankings(q, ql, g, gl, same, normalize, tie_tol)
    r = _ref_r(ql, gl, same)
    return (
        _ref_query_metrics(pess_rows, r, ks, max_r),
        _ref_query_metrics(opt_rows, r, ks, max_r),
        pess_rows,
        r,
    )


def _assert_within(result, lo, hi, max_gap=2e-3, exact_keys=()):
    for key, lo_v in lo.items():
        if key not in result:
            continue
        hi_v = hi[key]
        assert hi_v - lo_v <= max_gap, f"{key}: reference bounds too loose ({lo_v}, {hi_v})"
        assert lo_v - 1e-9 <= result[key] <= hi_v + 1e-9, (
            f"{key}={result[key]} outside reference [{lo_v}, {hi_v}]"
        )
    for key in exact_keys:
        assert lo[key] == pytest.approx(hi[key], abs=1e-12)


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def _skewed_labels(rng):
    """One big class, medium ones, pairs and singletons, shuffled."""
    sizes = [70, 25, 12, 12, 6, 5, 3, 2, 2, 2] + [1] * 8
    labels = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    return rng.permutation(labels)


def _clustered(rng, labels, dim=24, spread=0.9):
    centers = rng.normal(size=(labels.max() + 1, dim))
    return (centers[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32)


@pytest.fixture(scope="module")
def skewed():
    rng = np.random.default_rng(0)
    y = _skewed_labels(rng)
    x = _clustered(rng, y)
    # Deliberate exact duplicates (same label): ties with the query itself.
    dup_src = rng.choice(len(x), size=20, replace=False)
    x = np.concatenate([x, x[dup_src], x[dup_src[:5]]])
    y = np.concatenate([y, y[dup_src], y[dup_src[:5]]])
    perm = rng.permutation(len(x))
    return x[perm], y[perm]


# --------------------------------------------------------------------------- #
# kNN search
# --------------------------------------------------------------------------- #
def test_knn_search_matches_bruteforce(skewed):
    x, _ = skewed
    xn = M.l2_normalize(x)
    k = 15
    idx, sims = M.knn_search(xn, k=k)
    assert idx.shape == sims.shape == (len(x), k)
    assert idx.dtype == np.int64 and sims.dtype == np.float32
    full = xn.astype(np.float64) @ xn.astype(np.float64).T
    np.fill_diagonal(full, -np.inf)
    expected = -np.sort(-full, axis=1)[:, :k]
    np.testing.assert_allclose(sims, expected, atol=1e-5)
    # Returned ids are consistent with their similarities, distinct, never self.
    np.testing.assert_allclose(np.take_along_axis(full, idx, 1), sims, atol=1e-5)
    assert not (idx == np.arange(len(x))[:, None]).any()
    assert all(len(set(row)) == k for row in idx)
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_knn_search_excludes_self_by_id_with_many_duplicates():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 6)).astype(np.float32)
    x = np.repeat(base, [10, 4, 1], axis=0)  # 10 identical rows > k + 1
    k = 3
    idx, sims = M.knn_search(x, k=k)
    assert not (idx == np.arange(len(x))[:, None]).any()
    group = np.repeat([0, 1, 2], [10, 4, 1])
    # Rows of the 10-group and 4-group see only their own duplicates first.
    for i in range(14):
        assert (group[idx[i]] == group[i]).all()
        np.testing.assert_allclose(sims[i], np.sum(x[i] * x[i]), rtol=1e-5)


def test_knn_search_full_depth_returns_everyone_else():
    x = np.repeat(np.random.default_rng(2).normal(size=(4, 5)), 3, axis=0)
    idx, _ = M.knn_search(x, k=len(x) - 1)
    for i, row in enumerate(idx):
        assert sorted(row) == [j for j in range(len(x)) if j != i]


def test_knn_search_query_gallery_mode_keeps_everything():
    rng = np.random.default_rng(3)
    g = M.l2_normalize(rng.normal(size=(50, 8)))
    q = g[:10].copy()  # queries identical to gallery rows: must find them
    idx, sims = M.knn_search(q, g, k=50)
    assert (idx[:, 0] == np.arange(10)).all()
    np.testing.assert_allclose(sims[:, 0], np.sum(q * q, axis=1), rtol=1e-5)
    assert all(sorted(row) == list(range(50)) for row in idx)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_knn_search_chunked_equals_unchunked(skewed, chunk_size):
    x = M.l2_normalize(skewed[0])
    idx_full, sims_full = M.knn_search(x, k=9, chunk_size=100_000)
    idx_c, sims_c = M.knn_search(x, k=9, chunk_size=chunk_size)
    np.testing.assert_allclose(sims_c, sims_full, atol=1e-6)
    differ = idx_c != idx_full
    # Ids may only differ between neighbours of (numerically) equal similarity.
    full = x.astype(np.float64) @ x.astype(np.float64).T
    rows = np.nonzero(differ)[0]
    a = full[rows, idx_c[differ]]
    b = full[rows, idx_full[differ]]
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert differ.mean() < 0.01


def test_knn_search_chunked_query_gallery():
    rng = np.random.default_rng(4)
    g = rng.normal(size=(200, 8)).astype(np.float32)
    q = rng.normal(size=(33, 8)).astype(np.float32)
    a = M.knn_search(q, g, k=5, chunk_size=4)
    b = M.knn_search(q, g, k=5)
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    assert (a[0] == b[0]).mean() > 0.99


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(queries=np.zeros(5), k=1), "2-D"),
        (dict(queries=np.zeros((2, 3, 4)), k=1), "2-D"),
        (dict(queries=np.zeros((0, 3)), k=1), "non-empty"),
        (dict(queries=np.ones((5, 3)), gallery=np.ones((5, 4)), k=1), "dimension"),
        (dict(queries=np.array([[1.0, np.nan], [0.0, 1.0]]), k=1), "NaN or Inf"),
        (dict(queries=np.ones((3, 2)), gallery=np.array([[np.inf, 1.0]]), k=1), "NaN or Inf"),
        (dict(queries=np.ones((5, 3)), k=0), "k must be >= 1"),
        (dict(queries=np.ones((5, 3)), k=5), r"k=5 exceeds .*\(4: 5 items minus the query"),
        (dict(queries=np.ones((5, 3)), gallery=np.ones((4, 3)), k=5), r"k=5 exceeds .*\(4: 4 items\)"),
        (dict(queries=np.ones((5, 3)), k=2.5), "integer"),
        (dict(queries=np.ones((5, 3)), k=None), "integer"),
        (dict(queries=np.ones((5, 3)), k=1, chunk_size=0), "chunk_size"),
        (dict(queries=np.ones((5, 3)), k=1, use_gpu="yes"), "use_gpu"),
    ],
)
def test_knn_search_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        M.knn_search(**kwargs)


def test_knn_search_allows_k_equal_gallery_size_in_query_mode():
    idx, _ = M.knn_search(np.ones((2, 3)), np.eye(3), k=3)
    assert idx.shape == (2, 3)


# --------------------------------------------------------------------------- #
# Metrics vs reference
# --------------------------------------------------------------------------- #
def test_all_vs_all_metrics_match_reference(skewed):
    x, y = skewed
    ks = (1, 2, 4, 8, 16)
    lo, hi, _, r = _reference(x, y, ks=ks)
    assert (r == 0).sum() > 0, "data must contain lone queries"
    got = M.evaluate_embeddings(x, y, ks, metrics=("recall", "map@r", "r_precision", "precision@1"))
    assert set(got) == {*(f"recall@{k}" for k in ks), "map@r", "r_precision", "precision@1"}
    _assert_within(got, lo, hi)
    # Sanity: values are informative (neither trivial 0 nor 1).
    assert 0.2 < got["map@r"] < 0.95 and got["recall@1"] < got["precision@1"]


def test_individual_functions_agree_with_reference(skewed):
    x, y = skewed
    lo, hi, _, _ = _reference(x, y, ks=(1, 3))
    got = M.recall_at_k(x, y, (1, 3))
    got["precision@1"] = M.precision_at_1(x, y)
    got["r_precision"] = M.r_precision(x, y)
    got["map@r"] = M.map_at_r(x, y)
    _assert_within(got, lo, hi)
    assert got == pytest.approx(
        M.evaluate_embeddings(x, y, (1, 3), metrics=("recall", "map@r", "r_precision", "precision@1"))
    )


def test_max_r_cap_matches_reference(skewed):
    x, y = skewed
    lo, hi, _, r = _reference(x, y, ks=(1,), max_r=5)
    assert r.max() > 5
    got = M.evaluate_embeddings(x, y, (1,), metrics=("map@r", "r_precision"), max_r=5)
    _assert_within(got, lo, hi)
    # R stays capped when the search is deeper than max_r (large ks).
    deep = M.evaluate_embeddings(x, y, (1, 32), metrics=("recall", "map@r", "r_precision"), max_r=5)
    _assert_within(deep, lo, hi)
    assert M.map_at_r(x, y, max_r=5) == pytest.approx(got["map@r"], abs=1e-12)
    uncapped = M.evaluate_embeddings(x, y, (1,), metrics=("map@r",), max_r=None)
    assert abs(uncapped["map@r"] - got["map@r"]) > 1e-3  # the cap is not a no-op


def test_query_gallery_mode_matches_reference():
    rng = np.random.default_rng(5)
    gl = _skewed_labels(rng)
    g = _clustered(rng, gl)
    # Queries: some classes of the gallery, plus a class absent from it (lone).
    ql = np.concatenate([rng.choice(gl, 60), np.full(5, 999)])
    centers = np.zeros((1000, g.shape[1]))
    for c in np.unique(gl):
        centers[c] = g[gl == c].mean(0)
    centers[999] = rng.normal(size=g.shape[1])
    q = (centers[ql] + 0.9 * rng.normal(size=(len(ql), g.shape[1]))).astype(np.float32)
    q[:3] = g[np.flatnonzero(gl == ql[0])[:1]]  # exact copies of gallery rows
    ql[:3] = ql[0]
    ks = (1, 5, 10)
    lo, hi, _, r = _reference(q, ql, g, gl, ks=ks)
    got = M.evaluate_embeddings(g, gl, ks, query_embeddings=q, query_labels=ql)
    _assert_within(got, lo, hi)
    # An exact copy in the gallery is found: nothing is excluded in this mode.
    idx, _ = M.knn_search(M.l2_normalize(q[:1]), M.l2_normalize(g), k=1)
    assert gl[idx[0, 0]] == ql[0]
    assert (r[-5:] == 0).all()  # the absent class is lone


def test_exact_ties_across_classes_with_integer_embeddings():
    """Abundant exact ties (small integer vectors, raw inner product)."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 6, size=120)
    x = (rng.integers(-1, 2, size=(120, 6)) + 2 * np.eye(6)[y]).astype(np.float32)
    lo, hi, _, _ = _reference(x, y, normalize=False, ks=(1, 2, 4), tie_tol=0.5)
    got = M.evaluate_embeddings(
        x, y, (1, 2, 4), normalize=False,
        metrics=("recall", "map@r", "r_precision", "precision@1"),
    )
    _assert_within(got, lo, hi, max_gap=0.15)
    # Per query, the faiss ranking is a valid order of the exact similarity
    # levels: same number of same-class items at every similarity level.
    idx, sims = M.knn_search(x, k=len(x) - 1)
    full = x.astype(np.float64) @ x.astype(np.float64).T
    for i in range(len(x)):
        np.testing.assert_array_equal(sims[i], full[i, idx[i]])
        others = np.delete(np.arange(len(x)), i)
        for level in np.unique(full[i, others]):
            ref_ids = others[full[i, others] == level]
            got_ids = idx[i][sims[i] == level]
            assert sorted(got_ids) == sorted(ref_ids)
        assert (np.diff(sims[i]) <= 0).all()


def test_label_invariant_ties_are_exact():
    """Every tie is between exact duplicates of the same class -> one answer."""
    rng = np.random.default_rng(7)
    base_y = np.repeat(np.arange(8), 3)
    base = _clustered(rng, base_y, dim=16, spread=1.0)
    x = np.repeat(base, 3, axis=0)  # each vector three times, same label
    y = np.repeat(base_y, 3)
    lo, hi, _, _ = _reference(x, y, ks=(1, 2, 4, 8))
    assert lo == hi
    got = M.evaluate_embeddings(x, y, metrics=("recall", "map@r", "r_precision", "precision@1"))
    for key in got:
        assert got[key] == pytest.approx(lo[key], abs=1e-12), key


def test_calculate_layer_exact_on_given_rankings(skewed):
    """The knn-label layer against the reference on one fixed ordering."""
    x, y = skewed
    _, _, rows, r = _reference(x, y)
    depth = rows.shape[1]
    knn_labels = np.where(rows, y[:, None], -1)  # -1 never equals a class
    ref = _ref_query_metrics(rows, r, (1, 2, 8))
    assert M.calculate_recall_at_k(knn_labels, y, (1, 2, 8)) == pytest.approx(
        {k: ref[k] for k in ("recall@1", "recall@2", "recall@8")}, abs=1e-12
    )
    assert M.calculate_precision_at_1(knn_labels, y, r) == pytest.approx(ref["precision@1"], abs=1e-12)
    assert M.calculate_r_precision(knn_labels, y, r) == pytest.approx(ref["r_precision"], abs=1e-12)
    assert M.calculate_mean_average_precision_at_r(knn_labels, y, r) == pytest.approx(ref["map@r"], abs=1e-12)
    assert depth == len(x) - 1


def test_map_at_r_hand_example():
    # Musgrave et al.: R = 4, relevant at ranks 1, 3 -> (1 + 2/3) / 4.
    knn = np.array([[1, 0, 1, 0, 1]])
    assert M.calculate_mean_average_precision_at_r(knn, np.array([1]), np.array([4])) == pytest.approx(
        (1 + 2 / 3) / 4
    )
    assert M.calculate_r_precision(knn, np.array([1]), np.array([4])) == pytest.approx(0.5)


def test_all_lone_queries_give_zero_with_warning():
    x = np.eye(4, dtype=np.float32)
    y = np.arange(4)
    with pytest.warns(RuntimeWarning, match="No query"):
        got = M.evaluate_embeddings(x, y, (1,), metrics=("recall", "map@r", "r_precision", "precision@1"))
    assert got == {"recall@1": 0.0, "map@r": 0.0, "r_precision": 0.0, "precision@1": 0.0}


def test_normalization_and_label_dtype_invariance(skewed):
    x, y = skewed
    rng = np.random.default_rng(8)
    scaled = x * rng.uniform(0.1, 10.0, size=(len(x), 1)).astype(np.float32)
    names = np.array([f"class_{v:03d}" for v in y])
    kw = dict(metrics=("recall", "map@r", "r_precision", "precision@1"))
    base = M.evaluate_embeddings(x, y, **kw)
    assert M.evaluate_embeddings(scaled, names, **kw) == pytest.approx(base, abs=1e-9)
    assert M.evaluate_embeddings(x, y[:, None], **kw) == pytest.approx(base, abs=1e-12)
    # Without normalisation the raw inner product is used and the ranking changes.
    lo, hi, _, _ = _reference(scaled, y, normalize=False)
    _assert_within(M.evaluate_embeddings(scaled, y, normalize=False, **kw), lo, hi)
    assert M.evaluate_embeddings(scaled, y, normalize=False, **kw) != pytest.approx(base, abs=1e-3)


class _SpyKNN:
    """A knn_func that records the depths it is asked for and delegates to FaissKNN."""

    def __init__(self):
        self.calls = []
        self._knn = M.FaissKNN(use_gpu=False)

    def __call__(self, queries, gallery, k):
        self.calls.append(k)
        return self._knn(queries, gallery, k)


def test_single_knn_search_with_max_bin_depth(skewed):
    x, y = skewed
    spy = _SpyKNN()
    r_max = int(_ref_r(y, y, True).max())
    M.evaluate_embeddings(x, y, (1, 2, 4, 8), knn_func=spy)
    M.evaluate_embeddings(x, y, (1, 2, 4, 8), max_r=10, knn_func=spy)
    M.evaluate_embeddings(x, y, (1, 100), max_r=10, knn_func=spy)
    M.evaluate_embeddings(x, y, (1,), metrics=("nmi",), knn_func=spy)
    assert spy.calls == [max(8, r_max), 10, 100]


# --------------------------------------------------------------------------- #
# NMI
# --------------------------------------------------------------------------- #
def test_nmi_separable_clusters_is_one():
    rng = np.random.default_rng(9)
    y = np.repeat(np.arange(10), 30)
    centers = np.eye(10, 32) * 10
    x = centers[y] + 0.1 * rng.normal(size=(len(y), 32))
    assert M.nmi(x, y) == pytest.approx(1.0, abs=1e-6)
    assert M.evaluate_embeddings(x, y, metrics=("nmi",))["nmi"] == pytest.approx(1.0, abs=1e-6)


def test_nmi_random_labels_is_near_zero():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(3000, 16))
    y = rng.integers(0, 4, size=3000)
    assert 0.0 <= M.nmi(x, y) < 0.02


def test_nmi_is_deterministic_and_uses_queries_in_query_mode():
    rng = np.random.default_rng(11)
    y = np.repeat(np.arange(5), 20)
    x = np.eye(5, 8)[y] * 5 + rng.normal(size=(100, 8))
    assert M.nmi(x, y, seed=3) == M.nmi(x, y, seed=3)
    g = rng.normal(size=(40, 8))
    gl = rng.integers(0, 5, size=40)
    got = M.evaluate_embeddings(g, gl, (1,), query_embeddings=x, query_labels=y, metrics=("nmi",))
    assert got["nmi"] == pytest.approx(M.nmi(x, y))


def test_kmeans_cluster_bad_input():
    with pytest.raises(ValueError, match="num_clusters"):
        M.kmeans_cluster(np.ones((3, 2)), 4)
    with pytest.raises(ValueError, match="init"):
        M.kmeans_cluster(np.ones((3, 2)), 2, init="bogus")


# --------------------------------------------------------------------------- #
# evaluate_embeddings input validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(labels=np.zeros(9)), "labels has 9 entries but there are 10 embeddings"),
        (dict(labels=np.zeros((10, 2))), "1-D"),
        (dict(ks=()), "at least one k"),
        (dict(ks=(0, 1)), ">= 1"),
        (dict(ks=(1.5,)), "integer"),
        (dict(ks=(10,)), "only has 9 gallery items"),
        (dict(metrics=("recall", "auc")), "unknown metric"),
        (dict(metrics=()), "metrics is empty"),
        (dict(query_embeddings=np.ones((3, 4))), "given together"),
        (dict(query_embeddings=np.ones((3, 5)), query_labels=np.zeros(3)), "dimension"),
        (dict(query_embeddings=np.ones((3, 4)), query_labels=np.zeros(2)), "query_labels has 2"),
        (dict(max_r=0), "max_r"),
        (dict(embeddings=np.full((10, 4), np.nan)), "NaN or Inf"),
    ],
)
def test_evaluate_embeddings_bad_input(kwargs, match):
    args = dict(embeddings=np.random.default_rng(0).normal(size=(10, 4)), labels=np.repeat(np.arange(5), 2))
    args.update(kwargs)
    emb, lab = args.pop("embeddings"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        M.evaluate_embeddings(emb, lab, **args)


# --------------------------------------------------------------------------- #
# Exact Recall@k from first-positive ranks (recall_at_k_exact)
# --------------------------------------------------------------------------- #
MISS = np.iinfo(np.int64).max


def _ref_first_positive_ranks(q, ql, g=None, gl=None):
    """Brute force, float64, per query: (stable-sort, optimistic, pessimistic) ranks.

    Only exact for data whose similarities are exact in float32 (small integers,
    ``normalize=False``), where float32 and float64 agree bit for bit.
    """
    same = g is None
    if same:
        g, gl = q, ql
    sims = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
    out = np.full((3, len(q)), MISS, dtype=np.int64)
    for i in range(len(q)):
        ids = np.arange(len(g))
        s = sims[i]
        if same:  # drop the query itself, by index
            ids, s = np.delete(ids, i), np.delete(s, i)
        pos = gl[ids] == ql[i]
        if not pos.any():
            continue
        order = np.argsort(-s, kind="stable")
        out[0, i] = np.flatnonzero(pos[order])[0]
        p = s[pos].max()
        out[1, i] = np.sum(s > p)
        out[2, i] = np.sum(s >= p) - np.sum(pos & (s == p))
    return out


def _tied_integer_data(rng, n=260, dim=5):
    """Small integer vectors (exact float32 inner products, lots of exact ties),
    pairs/medium classes and singletons."""
    sizes = [12, 9, 6, 5, 4, 3, 3, 2, 2, 2] + [1] * 10
    y = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    y = rng.permutation(np.concatenate([y, rng.integers(0, 10, n - len(y))]))
    x = rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
    return x, y


def _knn_first_hits(x, y, depth, q=None, ql=None):
    """Per-query position of the first same-class item in the faiss kNN list."""
    if q is None:
        idx, _ = M.knn_search(x, k=depth)
        ql = y
    else:
        idx, _ = M.knn_search(q, x, k=depth)
    match = y[idx] == ql[:, None]
    return np.where(match.any(1), match.argmax(1), MISS)


@pytest.mark.parametrize("block_size", [None, 1, 7, 64, 259])
@pytest.mark.parametrize("num_threads", [1, 3])
def test_first_positive_ranks_exact_tie_rules(block_size, num_threads):
    rng = np.random.default_rng(20)
    x, y = _tied_integer_data(rng)
    ref = _ref_first_positive_ranks(x, y)
    for rule, expected in zip(("index", "optimistic", "pessimistic"), ref):
        got = M.first_positive_ranks(
            x, y, normalize=False, ties=rule, block_size=block_size, num_threads=num_threads
        )
        np.testing.assert_array_equal(got, expected, err_msg=rule)
    # Not vacuous: exact cross-class ties change many ranks; singletons are misses.
    assert (ref[1] != ref[2]).sum() > 20
    assert (ref[0] == MISS).sum() == 10


def test_first_positive_ranks_query_gallery_exact_ties():
    rng = np.random.default_rng(21)
    g, gl = _tied_integer_data(rng, n=200)
    q, ql = _tied_integer_data(rng, n=90)
    ql = np.where(ql == 0, 999, ql)  # a class absent from the gallery: lone
    q[:5] = g[:5]  # exact copies of gallery rows are not excluded here
    ql[:5] = gl[:5]
    ref = _ref_first_positive_ranks(q, ql, g, gl)
    for rule, expected in zip(("index", "optimistic", "pessimistic"), ref):
        got = M.first_positive_ranks(
            g, gl, query_embeddings=q, query_labels=ql, normalize=False, ties=rule, block_size=13
        )
        np.testing.assert_array_equal(got, expected, err_msg=rule)
    assert (ref[0][ql == 999] == MISS).all() and (ql == 999).any()


def test_recall_exact_tie_rules_are_the_reference_bounds():
    """optimistic / pessimistic = the tie-aware reference's two extreme orders."""
    rng = np.random.default_rng(6)
    y = rng.integers(0, 6, size=120)
    x = (rng.integers(-1, 2, size=(120, 6)) + 2 * np.eye(6)[y]).astype(np.float32)
    ks = (1, 2, 4, 8, 50)
    lo, hi, _, _ = _reference(x, y, normalize=False, ks=ks, tie_tol=0.5)
    kw = dict(normalize=False, block_size=17)
    pess = M.recall_at_k_exact(x, y, ks, ties="pessimistic", **kw)
    opt = M.recall_at_k_exact(x, y, ks, ties="optimistic", **kw)
    idx = M.recall_at_k_exact(x, y, ks, **kw)
    knn = M.recall_at_k(x, y, ks, normalize=False)
    for key in pess:
        assert pess[key] == lo[key] and opt[key] == hi[key], key
        assert pess[key] <= idx[key] <= opt[key] and pess[key] <= knn[key] <= opt[key], key
    assert any(lo[key] < hi[key] for key in lo if key.startswith("recall"))


def test_recall_exact_differs_from_faiss_only_on_exact_cross_class_ties():
    rng = np.random.default_rng(22)
    x, y = _tied_integer_data(rng, n=300)
    depth = 64
    hits_knn = _knn_first_hits(x, y, depth)
    ranks = M.first_positive_ranks(x, y, normalize=False)
    opt = M.first_positive_ranks(x, y, normalize=False, ties="optimistic")
    pess = M.first_positive_ranks(x, y, normalize=False, ties="pessimistic")
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    ks = np.arange(1, depth + 1)
    differ = ((hits_knn[:, None] < ks) != (ranks[:, None] < ks)).any(axis=1)
    assert differ.any(), "the data should exhibit the documented difference"
    for i in np.flatnonzero(differ):
        others = np.arange(len(x)) != i
        pos = others & (y == y[i])
        p = sims[i, pos].max()
        assert (others & ~pos & (sims[i] == p)).any(), i  # an exact cross-class tie
    # Wherever faiss finds the first positive within the depth, it lies between
    # the two extreme tie orders; rows without such ties agree exactly.
    seen = hits_knn < depth
    assert ((opt <= hits_knn) & (hits_knn <= pess))[seen].all()
    assert (pess[~seen] >= depth).all()  # a faiss miss is a pessimistic miss too
    no_tie = opt == pess
    assert (hits_knn[no_tie & seen] == ranks[no_tie & seen]).all()
    assert (ranks[no_tie & ~seen] >= depth).all()


@pytest.mark.parametrize("block_size", [None, 1, 10, 97])
def test_recall_exact_equals_knn_path_on_continuous_data(skewed, block_size):
    """No cross-class ties (duplicates share a label): identical to faiss."""
    x, y = skewed
    ks = (1, 2, 4, 8, 16, 100, len(x) - 1)
    expected = M.recall_at_k(x, y, ks)
    assert M.recall_at_k_exact(x, y, ks, block_size=block_size) == expected
    lo, hi, _, _ = _reference(x, y, ks=ks)
    _assert_within(expected, lo, hi)
    # Per query, the rank is the faiss position of the first positive.
    hits = _knn_first_hits(M.l2_normalize(x), y, len(x) - 1)
    ranks = M.first_positive_ranks(x, y, block_size=block_size)
    np.testing.assert_array_equal(ranks, hits)
    for rule in ("optimistic", "pessimistic"):
        np.testing.assert_array_equal(M.first_positive_ranks(x, y, ties=rule), hits)


def test_recall_exact_query_gallery_equals_knn_path():
    rng = np.random.default_rng(23)
    gl = _skewed_labels(rng)
    g = _clustered(rng, gl)
    ql = np.concatenate([rng.choice(gl, 70), np.full(4, 999)])  # 999: lone
    q = (g[rng.integers(0, len(g), len(ql))] + rng.normal(size=(len(ql), g.shape[1]))).astype(np.float32)
    q[:3] = g[:3]
    ql[:3] = gl[:3]
    ks = (1, 5, 10, 50, len(g))
    expected = M.recall_at_k(g, gl, ks, query_embeddings=q, query_labels=ql)
    for bs in (None, 3, 31):
        got = M.recall_at_k_exact(g, gl, ks, query_embeddings=q, query_labels=ql, block_size=bs)
        assert got == expected
    ranks = M.first_positive_ranks(g, gl, query_embeddings=q, query_labels=ql)
    assert (ranks[-4:] == MISS).all() and (ranks[:3] == 0).all()


def test_recall_exact_singletons_and_all_lone():
    # Singletons are misses in both paths (they count in the denominator).
    x = np.random.default_rng(24).normal(size=(40, 8)).astype(np.float32)
    y = np.concatenate([np.repeat(np.arange(10), 3), np.arange(100, 110)])
    got = M.recall_at_k_exact(x, y, (1, 39))
    assert got == M.recall_at_k(x, y, (1, 39))
    assert got["recall@39"] == pytest.approx(30 / 40)
    ones = M.evaluate_embeddings(np.eye(4), np.arange(4), (1, 3), metrics=("recall",), recall_method="exact")
    assert ones == {"recall@1": 0.0, "recall@3": 0.0}


def test_exact_block_rows_follow_memory_bound():
    n = 1000
    assert exact._resolve_block_rows(n, n, None, 4 * n * 3 + 5) == 3
    assert exact._resolve_block_rows(n, n, None, 1) == 1  # at least one row
    assert exact._resolve_block_rows(n, n, 2, 4 * n * 3) == 2  # block_size below the cap
    assert exact._resolve_block_rows(n, n, 50, 4 * n * 3) == 3  # capped by the bytes
    assert exact._resolve_block_rows(n, n, None, 1 << 40) == n
    assert exact._resolve_block_rows(10, n, None, 1 << 40) == 10


def test_exact_peak_memory_is_bounded():
    import tracemalloc

    rng = np.random.default_rng(25)
    n, bound = 4000, 4 * 4000 * 10  # ten rows of similarities: 160 kB
    x = M.l2_normalize(rng.normal(size=(n, 8)))
    codes = rng.integers(0, n // 4, n)
    full = n * n * 4  # 64 MB for N x N
    kw = dict(ties="index", block_size=None, num_threads=2)
    tracemalloc.start()
    try:
        small = exact._positive_ranks(x, x, codes, codes, True, max_block_bytes=bound, **kw)
        _, peak_small = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        big = exact._positive_ranks(x, x, codes, codes, True, max_block_bytes=1 << 30, **kw)
        _, peak_big = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(small, big)
    assert peak_small < bound + 80 * n  # block + O(N) bookkeeping
    assert peak_small < full / 50
    assert peak_big > full * 0.9  # the unbounded run does hold N x N


def test_evaluate_embeddings_recall_method(skewed):
    x, y = skewed
    spy = _SpyKNN()
    calls = spy.calls
    ks = (1, 2, 100)
    everything = ("recall", "map@r", "r_precision", "precision@1")
    base = M.evaluate_embeddings(x, y, ks, metrics=everything, knn_func=spy)
    assert calls == [100]
    exact_ = M.evaluate_embeddings(x, y, ks, metrics=everything, recall_method="exact", knn_func=spy)
    assert exact_ == base and list(exact_) == list(base)
    r_max = int(_ref_r(y, y, True).max())
    assert calls == [100, r_max]  # max(ks) no longer sets the search depth
    auto = M.evaluate_embeddings(x, y, ks, metrics=everything, recall_method="auto", knn_func=spy)
    assert auto == base and calls[-1] == 100  # other kNN metrics: one search
    calls.clear()
    only = M.evaluate_embeddings(x, y, ks, metrics=("recall",), recall_method="auto", knn_func=spy)
    assert calls == [] and only == {k: base[k] for k in only}
    assert M.evaluate_embeddings(x, y, ks, metrics=("recall",), recall_method="exact", max_block_bytes=1) == only


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ties="random"), "ties must be one of"),
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.5), "block_size"),
        (dict(max_block_bytes=0), "max_block_bytes"),
        (dict(num_threads=0), "num_threads"),
        (dict(ks=(10,)), "only has 9 gallery items"),
        (dict(ks=()), "at least one k"),
        (dict(labels=np.zeros(9)), "labels has 9 entries"),
    ],
)
def test_recall_at_k_exact_bad_input(kwargs, match):
    args = dict(embeddings=np.random.default_rng(0).normal(size=(10, 4)), labels=np.repeat(np.arange(5), 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        M.recall_at_k_exact(**args)


def test_evaluate_embeddings_bad_recall_method():
    with pytest.raises(ValueError, match="recall_method"):
        M.evaluate_embeddings(np.ones((4, 2)), np.arange(4) // 2, (1,), recall_method="fast")
    with pytest.raises(ValueError, match="only has 3 gallery items"):
        M.evaluate_embeddings(np.ones((4, 2)), np.arange(4) // 2, (4,), recall_method="exact")


# --------------------------------------------------------------------------- #
# Metric names: the name requested is the key returned
# --------------------------------------------------------------------------- #
def test_requested_name_is_the_result_key(skewed):
    x, y = skewed
    for name in M.METRIC_NAMES:
        got = M.evaluate_embeddings(x, y, (1, 4), metrics=(name,))
        assert list(got) == (["recall@1", "recall@4"] if name == "recall" else [name])
        assert list(got) == M.metric_keys((1, 4), (name,))
    everything = M.evaluate_embeddings(x, y, (1, 4))
    assert list(everything) == M.metric_keys((1, 4), M.METRIC_NAMES)


def test_old_metric_spellings_are_aliases(skewed):
    x, y = skewed
    new = M.evaluate_embeddings(x, y, (1,), metrics=("map@r", "precision@1"))
    old = M.evaluate_embeddings(x, y, (1,), metrics=("map_at_r", "precision_at_1"))
    assert old == new and list(old) == ["map@r", "precision@1"]
    assert M.resolve_metric_names(("map_at_r", "map@r", "nmi")) == ("map@r", "nmi")
    assert M.metric_keys((2,), ("recall", "precision_at_1")) == ["recall@2", "precision@1"]
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['auc'\].*old spellings"):
        M.metric_keys((1,), ("auc",))


def test_one_metric_shortcuts_refuse_a_metrics_argument(skewed):
    x, y = skewed
    for fn in (M.map_at_r, M.r_precision, M.precision_at_1):
        with pytest.raises(TypeError, match="evaluate_embeddings"):
            fn(x, y, metrics=("nmi",))
    with pytest.raises(TypeError, match="evaluate_embeddings"):
        M.recall_at_k(x, y, metrics=("nmi",))


# --------------------------------------------------------------------------- #
# Backends passed in (knn_func / kmeans_func)
# --------------------------------------------------------------------------- #
def _numpy_knn(queries, gallery, k):
    """Brute-force float64 kNN (stable argsort), the query excluded by index when gallery is None."""
    g = queries if gallery is None else gallery
    sims = np.asarray(queries, np.float64) @ np.asarray(g, np.float64).T
    if gallery is None:
        np.fill_diagonal(sims, -np.inf)
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sims, idx, axis=1)


def test_knn_func_backend_is_used_and_matches_reference(skewed):
    x, y = skewed
    lo, hi, _, _ = _reference(x, y, ks=(1, 2, 4, 8))
    got = M.evaluate_embeddings(x, y, (1, 2, 4, 8), metrics=("recall", "map@r", "precision@1"), knn_func=_numpy_knn)
    _assert_within(got, lo, hi)
    faiss_got = M.evaluate_embeddings(x, y, (1, 2, 4, 8), metrics=("recall", "map@r", "precision@1"))
    assert got == pytest.approx(faiss_got, abs=2e-3)


def test_kmeans_func_backend_is_used():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 6, size=120)
    x = rng.normal(size=(120, 8))  # no cluster structure at all
    seen = []

    def oracle(vectors, num_clusters):
        seen.append((vectors.shape, num_clusters))
        return y  # a perfect clustering, whatever the vectors

    got = M.evaluate_embeddings(x, y, metrics=("nmi",), kmeans_func=oracle)
    assert got == {"nmi": pytest.approx(1.0)} and seen == [((120, 8), 6)]


# --------------------------------------------------------------------------- #
# The faiss wrapper (shared with EmbeddingIndex)
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def unit_vectors():
    rng = np.random.default_rng(30)
    return M.l2_normalize(rng.normal(size=(2000, 16))), M.l2_normalize(rng.normal(size=(50, 16)))


def test_flat_index_is_exact_top_k(unit_vectors):
    g, q = unit_vectors
    index, params = M.build_faiss_index(g, "flat")
    scores, pos = M.search_faiss_index(index, q, 10, chunk_size=7)
    ref = np.sort(np.asarray(q, np.float64) @ np.asarray(g, np.float64).T, axis=1)[:, ::-1][:, :10]
    assert params == {} and pos.shape == (50, 10)
    np.testing.assert_allclose(scores, ref, atol=1e-5)
    np.testing.assert_allclose(np.einsum("qd,qkd->qk", q, g[pos]), scores, atol=1e-5)


def test_ivf_with_all_lists_probed_is_exact_and_hnsw_is_close(unit_vectors):
    g, q = unit_vectors
    _, exact_pos = M.search_faiss_index(M.build_faiss_index(g)[0], q, 10)
    ivf, params = M.build_faiss_index(g, "ivf", nlist=16)
    assert params == {"nlist": 16, "nprobe": 1, "train_size": 800, "niter": 10}
    _, ivf_pos = M.search_faiss_index(ivf, q, 10, kind="ivf", params=params, nprobe=16)
    np.testing.assert_array_equal(ivf_pos, exact_pos)
    hnsw, hparams = M.build_faiss_index(g, "hnsw", M=16)
    assert hparams == {"m": 16, "ef_construction": 40, "ef_search": 128}
    _, h_pos = M.search_faiss_index(hnsw, q, 10, kind="hnsw", params=hparams)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(h_pos, exact_pos)])
    assert overlap > 0.95


@pytest.mark.parametrize(
    ("kind", "params", "match"),
    [
        ("annoy", {}, "Unknown index kind 'annoy'"),
        ("flat", {"nlist": 4}, "Unknown parameter 'nlist' for kind='flat'"),
        ("ivf", {"nlist": 0}, "nlist must be >= 1"),
        ("ivf", {"nlist": 11}, "needs at least nlist=11 embeddings"),
        ("ivf", {"nlist": 5, "train_size": 3}, "train_size=3 must be >= nlist=5"),
    ],
)
def test_index_params_bad_input(kind, params, match):
    with pytest.raises(ValueError, match=match):
        M.resolve_index_params(kind, 10, **params)


def test_search_params_only_for_their_kind(unit_vectors):
    g, q = unit_vectors
    index, _ = M.build_faiss_index(g)
    with pytest.raises(ValueError, match="nprobe applies to kind='ivf'"):
        M.search_faiss_index(index, q, 3, nprobe=4)
    with pytest.raises(ValueError, match="use_gpu"):
        M.build_faiss_index(g, use_gpu="maybe")


def test_default_callback_metrics_use_the_canonical_names():
    """The callback's default request is spelt with METRIC_NAMES (no old aliases) and gives the documented keys."""
    from detreg_keras.evaluation import DEFAULT_CALLBACK_METRICS

    assert set(DEFAULT_CALLBACK_METRICS) <= set(M.METRIC_NAMES)
    assert not set(DEFAULT_CALLBACK_METRICS) & set(M.METRIC_ALIASES)
    assert M.metric_keys([1, 4], DEFAULT_CALLBACK_METRICS) == ["recall@1", "recall@4", "map@r", "r_precision",
                                                              "precision@1"]  # fmt: skip


def test_runtime_search_is_the_metrics_search():
    """detreg_keras.metrics.search re-exports the one TensorFlow-free faiss wrapper (same objects)."""
    from detreg_keras.metrics import search as metrics_search
    from detreg_runtime import arrays, search

    assert metrics_search.__all__ == search.__all__
    assert all(getattr(metrics_search, name) is getattr(search, name) for name in search.__all__)
    assert M.l2_normalize is arrays.l2_normalize
    with pytest.raises(ValueError, match="Unknown index kind 'lsh'"):
        search.check_index_kind("lsh")
