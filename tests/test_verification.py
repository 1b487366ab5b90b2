"""Verification: pairs, ROC AUC, TAR/FNMR at FMR, calibration (vs scikit-learn and brute force) and index matching."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from detreg_keras.retrieval import EmbeddingIndex
from detreg_keras.verification import (
    UNKNOWN,
    Calibration,
    _triangle_pair,
    calibrate_threshold,
    check_threshold,
    fnmr_at_fmr,
    match_labels,
    operating_points,
    rates_at_threshold,
    roc_auc,
    tar_at_fmr,
    verification_pairs,
    verification_report,
)


def _clustered(n_classes=6, per_class=7, dim=8, noise=0.6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _scored(seed=0, n=400, ties=True):
    """Random scores in [-1, 1], genuine pairs higher on average; rounded to create ties."""
    rng = np.random.default_rng(seed)
    genuine = rng.random(n) < 0.3
    scores = np.clip(np.where(genuine, 0.4, 0.0) + 0.3 * rng.normal(size=n), -1, 1)
    return (np.round(scores, 2) if ties else scores), genuine


def _brute_rates(scores, genuine, t):
    tp = sum(1 for s, g in zip(scores, genuine) if g and s >= t)
    fp = sum(1 for s, g in zip(scores, genuine) if not g and s >= t)
    n_pos = sum(1 for g in genuine if g)
    return fp / (len(genuine) - n_pos), tp / n_pos, (tp / (tp + fp) if tp + fp else float("nan"))


# -------------------------------------------------------------------- pairs
def test_pairs_match_a_brute_force_double_loop():
    x, labels = _clustered()
    labels = np.array([f"c{v}" for v in labels])  # string labels work too
    pairs = verification_pairs(x, labels)
    expected = {}
    for i, j in itertools.combinations(range(len(x)), 2):
        expected[(i, j)] = (float(np.dot(x[i], x[j])), labels[i] == labels[j])
    rows = zip(pairs.first, pairs.second, pairs.scores, pairs.genuine)
    got = {(int(i), int(j)): (float(s), bool(g)) for i, j, s, g in rows}
    assert got.keys() == expected.keys() and len(pairs.scores) == len(expected)
    for key, (score, genuine) in expected.items():
        assert got[key][1] == genuine
        assert got[key][0] == pytest.approx(score, abs=1e-6)
    assert pairs.num_genuine == 6 * 21 and pairs.num_impostor == len(expected) - 6 * 21


def test_pairs_normalise_the_embeddings():
    x, labels = _clustered()
    scaled = x * np.linspace(0.5, 3.0, len(x))[:, None]
    np.testing.assert_allclose(verification_pairs(scaled, labels).scores, verification_pairs(x, labels).scores,
                               atol=1e-6)  # fmt: skip


def test_triangle_index_inverts_triu_indices():
    for n in (2, 3, 7, 50):
        i, j = np.triu_indices(n, k=1)
        gi, gj = _triangle_pair(np.arange(len(i)), n)
        np.testing.assert_array_equal(gi, i)
        np.testing.assert_array_equal(gj, j)
    n = 200_003  # large n: the float closed form is corrected to exact integers
    k = np.array([0, 1, n - 2, n - 1, n * (n - 1) // 2 - 1, n * (n - 1) // 6 + 12_345])
    i, j = _triangle_pair(k, n)
    row_start = n * (n - 1) // 2 - (n - i) * (n - i - 1) // 2
    assert np.all((0 <= i) & (i < j) & (j < n))
    np.testing.assert_array_equal(row_start + (j - i - 1), k)


def test_sampled_pairs_are_distinct_seeded_subsets():
    x, labels = _clustered(n_classes=10, per_class=12)
    full = verification_pairs(x, labels)
    sample = verification_pairs(x, labels, max_genuine=50, max_impostor=300, seed=3)
    assert sample.num_genuine == 50 and sample.num_impostor == 300
    all_pairs = {(int(i), int(j)): bool(g) for i, j, g in zip(full.first, full.second, full.genuine)}
    drawn = list(zip(sample.first.tolist(), sample.second.tolist()))
    assert len(set(drawn)) == len(drawn)  # without replacement
    assert all(all_pairs[p] == g for p, g in zip(drawn, sample.genuine))  # real pairs, right flag
    again = verification_pairs(x, labels, max_genuine=50, max_impostor=300, seed=3)
    np.testing.assert_array_equal(again.first, sample.first)
    other = verification_pairs(x, labels, max_genuine=50, max_impostor=300, seed=4)
    assert not np.array_equal(other.first, sample.first)
    # Larger than the population: everything.
    big = verification_pairs(x, labels, max_genuine=10**6, max_impostor=10**6)
    assert big.num_genuine == full.num_genuine and big.num_impostor == full.num_impostor


def test_impostor_sample_is_roughly_uniform():
    """Each impostor pair of a 3-class set is drawn with probability count / total."""
    labels = np.array([0] * 6 + [1] * 6 + [2] * 2)
    x = np.random.default_rng(0).normal(size=(len(labels), 4))
    hits = {}
    for seed in range(300):
        p = verification_pairs(x, labels, max_impostor=10, seed=seed)
        for i, j, g in zip(p.first, p.second, p.genuine):
            if not g:
                hits[(i, j)] = hits.get((i, j), 0) + 1
    num_impostor = 36 + 12 + 12
    assert len(hits) == num_impostor
    counts = np.array(list(hits.values()))
    expected = 300 * 10 / num_impostor  # 50 draws each
    assert counts.sum() == 3000 and np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


@pytest.mark.parametrize(
    "labels, message",
    [(np.zeros(6, int), "same label"), (np.arange(6), "no genuine"), (np.zeros(5, int), "length 6")],
)
def test_pairs_need_both_kinds(labels, message):
    with pytest.raises(ValueError, match=message):
        verification_pairs(np.eye(6), labels)


def test_pairs_refuse_bad_embeddings():
    with pytest.raises(ValueError, match="all-zero"):
        verification_pairs(np.zeros((4, 3)), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="NaN"):
        verification_pairs(np.full((4, 3), np.nan), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="max_impostor"):
        verification_pairs(np.eye(4), [0, 0, 1, 1], max_impostor=0)


def test_too_many_pairs_need_a_sample(monkeypatch):
    from detreg_keras import verification

    monkeypatch.setattr(verification, "MAX_ALL_PAIRS", 100)
    x, labels = _clustered(n_classes=3, per_class=6)  # 153 pairs
    with pytest.raises(ValueError, match="pass max_impostor="):
        verification_pairs(x, labels)
    assert verification_pairs(x, labels, max_impostor=40).num_impostor == 40


# ------------------------------------------------------------------ metrics
@pytest.mark.parametrize("seed, ties", [(0, True), (1, False), (2, True)])
def test_roc_auc_equals_sklearn(seed, ties):
    scores, genuine = _scored(seed, ties=ties)
    assert roc_auc(scores, genuine) == pytest.approx(roc_auc_score(genuine, scores), abs=1e-12)


def test_roc_auc_brute_force_with_ties():
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.5, 0.2])
    genuine = np.array([True, True, False, False, True, False])
    pos, neg = scores[genuine], scores[~genuine]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])
    assert roc_auc(scores, genuine) == pytest.approx(expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fmr", [0.0, 0.001, 0.01, 0.05, 0.2, 1.0])
def test_tar_at_fmr_equals_sklearn_roc_curve(seed, fmr):
    scores, genuine = _scored(seed)
    fpr, tpr, _ = roc_curve(genuine, scores, drop_intermediate=False)  # also score >= threshold
    expected = tpr[fpr <= fmr].max()
    assert tar_at_fmr(scores, genuine, fmr) == pytest.approx(expected, abs=1e-12)
    assert fnmr_at_fmr(scores, genuine, fmr) == pytest.approx(1 - expected, abs=1e-12)


def test_operating_points_equal_sklearn_and_brute_force():
    scores, genuine = _scored(5)
    points = operating_points(scores, genuine)
    fpr, tpr, thresholds = roc_curve(genuine, scores, drop_intermediate=False)
    np.testing.assert_allclose(points.thresholds, thresholds[1:])  # sklearn prepends +inf
    np.testing.assert_allclose(points.fmr, fpr[1:])
    np.testing.assert_allclose(points.tar, tpr[1:])
    for t, f, r, p in list(zip(points.thresholds, points.fmr, points.tar, points.precision))[::7]:
        bf, br, bp = _brute_rates(scores, genuine, t)
        assert (f, r) == pytest.approx((bf, br)) and p == pytest.approx(bp)


def test_top_impostor_gets_a_zero_fmr_point():
    scores = np.array([0.9, 0.8, 0.3])
    genuine = np.array([False, True, False])
    points = operating_points(scores, genuine)
    assert points.thresholds[0] > 0.9 and points.fmr[0] == 0 and points.tar[0] == 0
    assert tar_at_fmr(scores, genuine, 0.0) == 0.0 and tar_at_fmr(scores, genuine, 0.5) == 1.0


# -------------------------------------------------------------- calibration
def _brute_calibration(scores, genuine, target_fmr=None, target_precision=None):
    """Smallest distinct score meeting the target, by looping over every candidate."""
    best = None
    for t in sorted(set(scores.tolist())):
        fmr, tar, precision = _brute_rates(scores, genuine, t)
        ok = fmr <= target_fmr if target_fmr is not None else (precision == precision and precision >= target_precision)
        if ok:
            best = (t, fmr, tar, precision)
            break  # the smallest feasible threshold has the largest TAR
    return best


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("target", [0.01, 0.05, 0.3])
def test_calibrate_for_fmr_equals_brute_force(seed, target):
    scores, genuine = _scored(seed)
    cal = calibrate_threshold(scores, genuine, target_fmr=target)
    t, fmr, tar, precision = _brute_calibration(scores, genuine, target_fmr=target)
    assert cal.threshold == pytest.approx(t) and cal.fmr == pytest.approx(fmr) and cal.tar == pytest.approx(tar)
    assert cal.precision == pytest.approx(precision) and cal.fmr <= target
    assert cal.num_genuine == genuine.sum() and cal.num_impostor == (~genuine).sum()
    assert cal.target_fmr == target and cal.target_precision is None and cal.fnmr == pytest.approx(1 - tar)
    assert rates_at_threshold(scores, genuine, cal.threshold)["fmr"] == pytest.approx(cal.fmr)
    lower = np.max(scores[scores < cal.threshold])  # the next candidate down misses the target
    assert rates_at_threshold(scores, genuine, lower)["fmr"] > target


@pytest.mark.parametrize("target", [0.6, 0.8, 0.95])
def test_calibrate_for_precision_equals_brute_force(target):
    scores, genuine = _scored(1)
    cal = calibrate_threshold(scores, genuine, target_precision=target)
    t, fmr, tar, precision = _brute_calibration(scores, genuine, target_precision=target)
    assert (cal.threshold, cal.fmr, cal.tar, cal.precision) == pytest.approx((t, fmr, tar, precision))
    assert cal.precision >= target and cal.target_precision == target


def test_calibration_errors_and_warnings():
    scores, genuine = _scored(0)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_threshold(scores, genuine)
    with pytest.raises(ValueError, match="exactly one"):
        calibrate_threshold(scores, genuine, target_fmr=0.1, target_precision=0.9)
    with pytest.raises(ValueError, match=r"target_fmr must lie in \[0, 1\]"):
        calibrate_threshold(scores, genuine, target_fmr=1.5)
    with pytest.raises(ValueError, match="all genuine"):
        calibrate_threshold(scores, np.ones_like(genuine), target_fmr=0.1)
    with pytest.raises(ValueError, match="all impostor"):
        calibrate_threshold(scores, np.zeros_like(genuine), target_fmr=0.1)
    with pytest.raises(ValueError, match="No threshold reaches precision"):
        calibrate_threshold(np.array([0.5, 0.5, 0.1]), np.array([True, False, False]), target_precision=0.9)
    with pytest.warns(UserWarning, match="cannot measure"):
        cal = calibrate_threshold(scores, genuine, target_fmr=1e-6)
    assert cal.fmr == 0.0
    with pytest.raises(ValueError, match="above cosine 1"), pytest.warns(UserWarning):  # impostor at cosine 1
        calibrate_threshold(np.array([1.0000001, 0.5]), np.array([False, True]), target_fmr=0.0)
    with pytest.warns(UserWarning, match="cannot measure"):
        cal = calibrate_threshold(np.array([1.0000001, 0.5]), np.array([True, False]), target_fmr=0.5)
    assert cal.threshold == 1.0 and cal.tar == 1.0 and cal.fmr == 0.0  # a genuine score above 1 is clipped


@pytest.mark.parametrize("bad", [1.5, -1.01, float("nan"), float("inf"), "0.5", True, None])
def test_threshold_outside_minus_one_one_is_refused(bad):
    with pytest.raises(ValueError, match="threshold must"):
        check_threshold(bad)


def test_report_and_match_labels():
    scores, genuine = _scored(2)
    report = verification_report(scores, genuine, fmrs=(0.01, 0.1))
    assert report["roc_auc"] == pytest.approx(roc_auc_score(genuine, scores))
    assert report["tar@fmr=0.1"] == pytest.approx(tar_at_fmr(scores, genuine, 0.1))
    assert report["fnmr@fmr=0.01"] == pytest.approx(1 - tar_at_fmr(scores, genuine, 0.01))
    assert report["threshold@fmr=0.1"] == calibrate_threshold(scores, genuine, target_fmr=0.1).threshold
    assert match_labels(["a", "b", "c"], [0.5, 0.49, 0.9], 0.5) == ["a", UNKNOWN, "c"]  # ties match
    with pytest.raises(ValueError, match="threshold must"):
        match_labels(["a"], [0.5], 2.0)


# ------------------------------------------------------------ index matching
@pytest.fixture()
def gallery():
    x, labels = _clustered(n_classes=5, per_class=6, noise=0.3, seed=1)
    names = np.array([f"char{v}" for v in labels])
    return x, names


def test_index_match_brute_force(gallery):
    x, names = gallery
    index = EmbeddingIndex(model_hash="m").build(x, labels=names)
    rng = np.random.default_rng(2)
    queries = rng.normal(size=(20, x.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    threshold = 0.3
    result = index.match(queries, threshold=threshold)
    sims = queries @ x.T
    for q in range(len(queries)):
        best = int(np.argmax(sims[q]))
        expected = names[best] if sims[q, best] >= threshold else UNKNOWN
        assert result.labels[q] == expected and result.ids[q] == best
        assert result.scores[q] == pytest.approx(sims[q, best], abs=1e-5)
    assert result.threshold == threshold and result.matched.tolist() == [lab != UNKNOWN for lab in result.labels]
    assert 0 < result.matched.sum() < len(queries)  # both outcomes occur
    with pytest.raises(ValueError, match="No match threshold"):
        index.match(queries)
    with pytest.raises(ValueError, match="threshold must"):
        index.match(queries, threshold=1.2)
    with pytest.raises(ValueError, match="has none"):
        EmbeddingIndex().build(x).match(queries, threshold=0.5)


def test_index_calibrate_save_load_round_trip(gallery, tmp_path):
    x, names = gallery
    index = EmbeddingIndex(model_hash="m").build(x, labels=names)
    held_out, held_labels = _clustered(n_classes=8, per_class=5, noise=0.3, seed=9)
    cal = index.calibrate(held_out, held_labels, target_fmr=0.01)
    pairs = verification_pairs(held_out, held_labels)
    assert cal == calibrate_threshold(pairs.scores, pairs.genuine, target_fmr=0.01)
    assert index.threshold == cal.threshold
    saved = index.save(tmp_path / "idx")
    meta = json.loads((saved / "metadata.json").read_text())
    assert meta["format_version"] == 2 and meta["verification"]["threshold"] == cal.threshold
    assert meta["verification"]["calibration"]["target_fmr"] == 0.01
    loaded = EmbeddingIndex.load(saved, expected_model_hash="m")
    assert loaded.threshold == cal.threshold and loaded.calibration == cal.to_dict()
    assert loaded.match(x[:5]).labels == list(names[:5])  # the stored threshold is used
    with pytest.raises(ValueError, match="same label"):
        index.calibrate(held_out, np.zeros(len(held_out)), target_fmr=0.01)  # calibration pairs of one class
    assert index.threshold == cal.threshold  # a failed calibration keeps the threshold


def test_index_threshold_set_clear_and_old_or_bad_metadata(gallery, tmp_path):
    x, names = gallery
    index = EmbeddingIndex(model_hash="m").build(x, labels=names)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        index.set_threshold(1.5)
    assert index.set_threshold(0.25).threshold == 0.25 and index.calibration is None
    saved = index.save(tmp_path / "idx")
    assert EmbeddingIndex.load(saved, expected_model_hash="m").threshold == 0.25
    index.set_threshold(None).save(tmp_path / "none")
    assert EmbeddingIndex.load(tmp_path / "none", expected_model_hash="m").threshold is None
    meta_path = saved / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["verification"]  # an index saved before thresholds existed
    meta_path.write_text(json.dumps(meta))
    assert EmbeddingIndex.load(saved, expected_model_hash="m").threshold is None
    meta["verification"] = {"threshold": 7.0}
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"metadata.json: The threshold must lie in \[-1, 1\]"):
        EmbeddingIndex.load(saved, expected_model_hash="m")


def test_calibration_to_dict_is_json():
    cal = Calibration(0.5, 0.0, 0.0, float("nan"), 1, 2, target_fmr=0.0)
    assert json.loads(json.dumps(cal.to_dict()))["precision"] is None


def test_verify_omniglot_script_rows_against_numpy():
    """scripts/verify_omniglot.py's test-halves split, transfer and open-set numbers, recomputed with plain numpy."""
    from tests.conftest import load_script

    script = load_script("verify_omniglot")
    x, labels = _clustered(n_classes=8, per_class=20, noise=0.9, seed=4)
    row = script.test_halves_study((x, labels), seeds=[1], fmrs=[0.05], centre=False)[0]
    classes = np.random.default_rng(1).permutation(np.unique(labels))
    cal_classes, ev_classes = classes[:4], classes[4:]
    ev = np.isin(labels, ev_classes)
    pe = verification_pairs(x[ev], labels[ev])
    assert row["test roc_auc"] == pytest.approx(roc_auc_score(pe.genuine, pe.scores))
    cal = np.isin(labels, cal_classes)
    pc = verification_pairs(x[cal], labels[cal])
    threshold = _brute_calibration(pc.scores.astype(np.float64), pc.genuine, target_fmr=0.05)[0]
    assert row["calibrated@0.05: threshold"] == pytest.approx(threshold)
    assert row["calibrated@0.05: test FMR"] == pytest.approx(_brute_rates(pe.scores, pe.genuine, threshold)[0])
    known = ev_classes[:2]
    gallery = np.concatenate([np.flatnonzero(labels == c)[:10] for c in known])
    unknown_q = np.concatenate([np.flatnonzero(labels == c)[10:] for c in ev_classes[2:]])
    top1 = (x[unknown_q] @ x[gallery].T).max(axis=1)
    assert row["open set@0.05: unknown accepted"] == pytest.approx(np.mean(top1 >= threshold))
