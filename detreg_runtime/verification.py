"""Verification ("is this the same item?"): pairs, ROC AUC, TAR/FNMR at a false-match rate, thresholds.

Pure numpy. Conventions, used throughout:

* A **pair** is two different items ``i < j`` (each unordered pair once); it is
  **genuine** when the two have the same label, an **impostor** pair otherwise.
  Its score is the cosine similarity of the two (L2-normalised) embeddings.
* A pair **matches** at threshold ``t`` when ``score >= t`` (ties match).
  ``FMR(t)`` (false-match rate) = share of impostor pairs that match;
  ``TAR(t)`` (true-accept rate) = share of genuine pairs that match;
  ``FNMR(t) = 1 - TAR(t)``; ``precision(t)`` = genuine share of the matching pairs.
* The thresholds considered are the distinct pair scores (plus one just above
  the highest impostor score, where FMR = 0): between two consecutive distinct
  scores every rate is constant, so nothing else can do better.
* :func:`tar_at_fmr` is the largest TAR over thresholds with ``FMR <= target``
  (the smallest such threshold); :func:`calibrate_threshold` returns that
  threshold (or, for a target precision, the smallest threshold whose precision
  reaches the target, which maximises TAR among them).
* :func:`roc_auc` is the probability that a random genuine pair scores above a
  random impostor pair, ties counted 1/2 (the area under the ROC curve,
  equal to scikit-learn's ``roc_auc_score``).

Example::

    pairs = verification_pairs(val_embeddings, val_labels)
    calibration = calibrate_threshold(pairs.scores, pairs.genuine, target_fmr=1e-3)
    index.set_threshold(calibration)            # stored in the index's metadata.json
    matches = index.match(query_embeddings)     # label, or "unknown" below the threshold
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from detreg_runtime.arrays import l2_normalize

#: Label :meth:`detreg_runtime.index.EmbeddingIndex.match` returns for a query below the threshold.
UNKNOWN = "unknown"
_SCORE_CHUNK = 1 << 16  # pairs scored at once (bounded memory for sampled pairs)
#: Most impostor pairs :func:`verification_pairs` enumerates without ``max_impostor``.
MAX_ALL_PAIRS = 50_000_000


# --------------------------------------------------------------- validation
def check_threshold(threshold: Any) -> float:
    """A cosine threshold as a float in ``[-1, 1]``.

    Raises:
        ValueError: not a real number, not finite, or outside ``[-1, 1]``.
    """
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise ValueError(f"The threshold must be a number in [-1, 1] (a cosine similarity), got {threshold!r}.")
    value = float(threshold)
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise ValueError(f"The threshold must lie in [-1, 1] (a cosine similarity), got {value!r}.")
    return value


def _check_rate(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}.")
    return value


def _check_pairs(scores: Any, genuine: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(scores float64 [P], genuine bool [P])``, with both kinds of pair present.

    Raises:
        ValueError: shapes differ, non-finite scores, non-boolean flags, or only
            genuine / only impostor pairs.
    """
    s = np.asarray(scores)
    g = np.asarray(genuine)
    if s.ndim != 1 or g.shape != s.shape:
        raise ValueError(f"scores and genuine must be 1-D arrays of the same length, got {s.shape} and {g.shape}.")
    if not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}.")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values.")
    if g.dtype != bool:
        if not np.issubdtype(g.dtype, np.integer) or not np.isin(g, (0, 1)).all():
            raise ValueError(f"genuine must be booleans (True: same label), got dtype {g.dtype}.")
        g = g.astype(bool)
    num_genuine = int(g.sum())
    if num_genuine == 0 or num_genuine == len(g):
        kind = "impostor (different-label)" if num_genuine == 0 else "genuine (same-label)"
        raise ValueError(
            f"The pairs are all {kind} ({len(g)} pairs): verification needs both genuine and impostor pairs, "
            "i.e. at least two items of one label and items of at least two labels."
        )
    return s, g


# -------------------------------------------------------------------- pairs
@dataclasses.dataclass(frozen=True)
class Pairs:
    """Scored pairs of items: ``first[p] < second[p]`` index the items, ``genuine[p]``: same label."""

    first: np.ndarray
    second: np.ndarray
    scores: np.ndarray
    genuine: np.ndarray

    @property
    def num_genuine(self) -> int:
        return int(self.genuine.sum())

    @property
    def num_impostor(self) -> int:
        return int(len(self.genuine) - self.genuine.sum())


def _unit_rows(embeddings: Any) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"embeddings must be a numeric 2-D array [N, D], got shape {x.shape} dtype {x.dtype}.")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or infinite values.")
    if not np.any(x, axis=1).all():
        raise ValueError("embeddings contain an all-zero row (no direction, no cosine similarity).")
    return l2_normalize(x)


def _triangle_pair(k: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(i, j)``, ``i < j``, of the ``k``-th pair of the row-major upper triangle of an ``n x n`` matrix."""
    k = k.astype(np.int64)
    total = n * (n - 1) // 2

    def row_start(i):  # index of pair (i, i + 1)
        return total - (n - i) * (n - i - 1) // 2

    i = (n - 2 - np.floor(np.sqrt(np.maximum(4.0 * n * (n - 1) - 8.0 * k - 7.0, 0.0)) / 2.0 - 0.5)).astype(np.int64)
    i = np.clip(i, 0, n - 2)
    for _ in range(3):  # correct float round-off of the closed form
        i = np.where(row_start(i) > k, i - 1, i)
        i = np.where(row_start(i + 1) <= k, i + 1, i)
    return i, k - row_start(i) + i + 1


def _genuine_index_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All same-label pairs ``i < j``."""
    firsts, seconds = [], []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        a, b = np.triu_indices(len(members), k=1)
        firsts.append(members[a])
        seconds.append(members[b])
    first, second = np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)
    order = np.lexsort((second, first))
    return first[order], second[order]


def _sample_impostor_pairs(
    labels: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` different-label pairs drawn uniformly without replacement."""
    n = len(labels)
    total = n * (n - 1) // 2
    _, class_sizes = np.unique(labels, return_counts=True)
    impostor_share = 1.0 - float(np.sum(class_sizes * (class_sizes - 1) // 2)) / total
    draw = min(total, int(count / impostor_share * 1.05) + 64)
    while True:
        i, j = _triangle_pair(rng.choice(total, size=draw, replace=False), n)
        keep = labels[i] != labels[j]
        if keep.sum() >= count or draw == total:
            # A uniform random subset in random order: its first `count` impostors are a uniform sample.
            i, j = i[keep][:count], j[keep][:count]
            order = np.lexsort((j, i))
            return i[order], j[order]
        draw = min(total, 2 * draw)


def _pair_scores(x: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    out = np.empty(len(first), np.float32)
    for start in range(0, len(first), _SCORE_CHUNK):
        sl = slice(start, start + _SCORE_CHUNK)
        out[sl] = np.einsum("pd,pd->p", x[first[sl]], x[second[sl]])
    return out


def verification_pairs(
    embeddings: Any,
    labels: Any,
    max_genuine: int | None = None,
    max_impostor: int | None = None,
    seed: int = 0,
) -> Pairs:
    """Genuine and impostor pairs of a labelled set, scored by cosine similarity.

    Args:
        embeddings: ``[N, D]`` (normalised here; zero rows are refused).
        labels: ``N`` labels (integers or strings).
        max_genuine: keep at most this many genuine pairs (a seeded uniform
            sample without replacement); ``None``: all of them.
        max_impostor: likewise for impostor pairs; ``None``: all ``O(N^2)``
            of them (set it for large sets: the sample is drawn without
            enumerating the others).
        seed: seed of the samples.

    Returns:
        :class:`Pairs` (``scores`` float32, sorted by ``(first, second)`` within
        the genuine pairs, then within the impostor pairs).

    Raises:
        ValueError: bad shapes, non-finite or zero embeddings, or a set without
            genuine pairs (no label with two items) or without impostor pairs (one label).
    """
    x = _unit_rows(embeddings)
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"labels must be a 1-D array of length {len(x)}, got shape {y.shape}.")
    n = len(x)
    if len(np.unique(y)) < 2:
        raise ValueError(
            f"All {n} items have the same label: there are no impostor (different-label) pairs to calibrate on."
        )
    g_first, g_second = _genuine_index_pairs(y)
    if len(g_first) == 0:
        raise ValueError(f"No label has two items among the {n}: there are no genuine (same-label) pairs.")
    rng = np.random.default_rng(seed)
    for name, limit in (("max_genuine", max_genuine), ("max_impostor", max_impostor)):
        if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {limit!r}.")
    num_impostor = n * (n - 1) // 2 - len(g_first)
    if max_genuine is not None and len(g_first) > max_genuine:
        keep = np.sort(rng.choice(len(g_first), size=int(max_genuine), replace=False))
        g_first, g_second = g_first[keep], g_second[keep]
    if max_impostor is not None and num_impostor > max_impostor:
        i_first, i_second = _sample_impostor_pairs(y, int(max_impostor), rng)
    elif n * (n - 1) // 2 > MAX_ALL_PAIRS:
        raise ValueError(
            f"{n} items make {n * (n - 1) // 2:,} pairs, more than {MAX_ALL_PAIRS:,} to enumerate: "
            "pass max_impostor= (e.g. 1_000_000) to sample the impostor pairs."
        )
    else:
        i_first, i_second = np.triu_indices(n, k=1)
        different = y[i_first] != y[i_second]
        i_first, i_second = i_first[different].astype(np.int64), i_second[different].astype(np.int64)
    first = np.concatenate([g_first, i_first])
    second = np.concatenate([g_second, i_second])
    genuine = np.concatenate([np.ones(len(g_first), bool), np.zeros(len(i_first), bool)])
    return Pairs(first, second, _pair_scores(x, first, second), genuine)


# ------------------------------------------------------------------ metrics
def roc_auc(scores: Any, genuine: Any) -> float:
    """Area under the ROC curve: P(genuine score > impostor score) + P(tie) / 2 (Mann-Whitney U).

    Raises:
        ValueError: bad inputs, or pairs of one kind only.
    """
    s, g = _check_pairs(scores, genuine)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid_ranks = ends - (counts - 1) / 2.0  # average 1-based rank of each distinct value
    ranks = mid_ranks[inverse]
    n_pos = int(g.sum())
    n_neg = len(g) - n_pos
    u = ranks[g].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclasses.dataclass(frozen=True)
class OperatingPoints:
    """Rates at every candidate threshold, thresholds decreasing (``score >= threshold`` matches)."""

    thresholds: np.ndarray
    fmr: np.ndarray
    tar: np.ndarray
    true_matches: np.ndarray
    false_matches: np.ndarray
    num_genuine: int
    num_impostor: int

    @property
    def precision(self) -> np.ndarray:
        """Genuine share of the matching pairs (NaN where nothing matches)."""
        matched = self.true_matches + self.false_matches
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(matched > 0, self.true_matches / np.maximum(matched, 1), np.nan)


def operating_points(scores: Any, genuine: Any) -> OperatingPoints:
    """FMR and TAR at each distinct score taken as the threshold (and just above the top score if it is an impostor's).

    Raises:
        ValueError: bad inputs, or pairs of one kind only.
    """
    s, g = _check_pairs(scores, genuine)
    order = np.argsort(-s, kind="stable")
    s_sorted, g_sorted = s[order], g[order]
    last_of_value = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # last position of each distinct score
    tp = np.cumsum(g_sorted)[last_of_value]
    fp = np.cumsum(~g_sorted)[last_of_value]
    thresholds = s_sorted[last_of_value]
    if fp[0] > 0:  # the top score is an impostor's: FMR = 0 needs a threshold above every score
        thresholds = np.r_[np.nextafter(thresholds[0], np.inf), thresholds]
        tp, fp = np.r_[0, tp], np.r_[0, fp]
    n_pos, n_neg = int(g.sum()), int((~g).sum())
    return OperatingPoints(thresholds, fp / n_neg, tp / n_pos, tp, fp, n_pos, n_neg)


def tar_at_fmr(scores: Any, genuine: Any, fmr: float) -> float:
    """Largest TAR over thresholds whose FMR is at most ``fmr``.

    Raises:
        ValueError: ``fmr`` outside [0, 1], bad inputs, or pairs of one kind only.
    """
    target = _check_rate(fmr, "fmr")
    points = operating_points(scores, genuine)
    return float(points.tar[points.fmr <= target].max())


def fnmr_at_fmr(scores: Any, genuine: Any, fmr: float) -> float:
    """``1 - tar_at_fmr``: share of genuine pairs rejected at the threshold that keeps FMR <= ``fmr``."""
    return 1.0 - tar_at_fmr(scores, genuine, fmr)


# -------------------------------------------------------------- calibration
@dataclasses.dataclass(frozen=True)
class Calibration:
    """A threshold chosen on held-out pairs and its rates on those pairs.

    Attributes:
        threshold: cosine threshold in [-1, 1]; ``score >= threshold`` matches.
        fmr, tar, precision: achieved on the calibration pairs (``precision``
            NaN when nothing matches).
        num_genuine, num_impostor: calibration pair counts.
        target_fmr, target_precision: the target given (the other is ``None``).
    """

    threshold: float
    fmr: float
    tar: float
    precision: float
    num_genuine: int
    num_impostor: int
    target_fmr: float | None = None
    target_precision: float | None = None

    @property
    def fnmr(self) -> float:
        return 1.0 - self.tar

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN precision as ``None``)."""
        out = dataclasses.asdict(self)
        if isinstance(out["precision"], float) and math.isnan(out["precision"]):
            out["precision"] = None
        return out


def calibrate_threshold(
    scores: Any,
    genuine: Any,
    target_fmr: float | None = None,
    target_precision: float | None = None,
) -> Calibration:
    """The threshold of highest TAR with FMR <= ``target_fmr`` (or precision >= ``target_precision``).

    The threshold is the smallest candidate (see the module docstring) meeting
    the target; on other pairs the achieved rates vary, and an FMR target below
    ``1 / num_impostor`` is below what the pairs can measure (a ``UserWarning``
    says so).

    Args:
        scores: pair scores ``[P]`` (cosines, e.g. :attr:`Pairs.scores`).
        genuine: ``[P]`` booleans, True for same-label pairs.
        target_fmr: largest false-match rate allowed, in [0, 1].
        target_precision: smallest precision allowed, in [0, 1] (pass exactly one target).

    Returns:
        :class:`Calibration`: the threshold and the rates it achieves on these pairs.

    Raises:
        ValueError: no target or both, a target outside [0, 1], pairs of one kind
            only, or a target no threshold in [-1, 1] reaches (e.g. a precision
            above the best achievable, or FMR 0 with an impostor pair at cosine 1).
    """
    if (target_fmr is None) == (target_precision is None):
        raise ValueError("Pass exactly one of target_fmr or target_precision.")
    points = operating_points(scores, genuine)
    if target_fmr is not None:
        target = _check_rate(target_fmr, "target_fmr")
        if target * points.num_impostor < 1:
            warnings.warn(
                f"target_fmr={target:g} is below 1 / {points.num_impostor} impostor pairs: the calibration pairs "
                "cannot measure it (the threshold reaches FMR 0 on them); use more impostor pairs.",
                UserWarning,
                stacklevel=2,
            )
        feasible = np.flatnonzero(points.fmr <= target)
    else:
        target = _check_rate(target_precision, "target_precision")
        precision = points.precision
        feasible = np.flatnonzero(np.nan_to_num(precision, nan=-1.0) >= target)
        if len(feasible) == 0:
            raise ValueError(
                f"No threshold reaches precision {target:g} on these pairs (best {np.nanmax(precision):.4g})."
            )
    best = int(feasible.max())  # thresholds decrease: the last feasible one is the smallest
    threshold = float(points.thresholds[best])
    rates = {"fmr": points.fmr[best], "tar": points.tar[best], "precision": points.precision[best]}
    if not -1.0 <= threshold <= 1.0:  # float32 round-off of a cosine: clip, and check the target still holds
        threshold = min(max(threshold, -1.0), 1.0)
        rates = rates_at_threshold(scores, genuine, threshold)
        missed = rates["fmr"] > target if target_fmr is not None else not rates["precision"] >= target
        if missed:
            raise ValueError(
                "The target needs a threshold above cosine 1 (outside [-1, 1]): some impostor pairs score 1, "
                "i.e. are identical in embedding space."
            )
    return Calibration(
        threshold=threshold,
        fmr=float(rates["fmr"]),
        tar=float(rates["tar"]),
        precision=float(rates["precision"]),
        num_genuine=points.num_genuine,
        num_impostor=points.num_impostor,
        target_fmr=None if target_fmr is None else target,
        target_precision=None if target_precision is None else target,
    )


def rates_at_threshold(scores: Any, genuine: Any, threshold: float) -> dict[str, float]:
    """FMR, TAR, FNMR and precision of pairs at a given threshold (``score >= threshold`` matches)."""
    t = check_threshold(threshold)
    s, g = _check_pairs(scores, genuine)
    matched = s >= t
    tp, fp = int(np.sum(matched & g)), int(np.sum(matched & ~g))
    tar = tp / int(g.sum())
    return {
        "fmr": fp / int((~g).sum()),
        "tar": tar,
        "fnmr": 1.0 - tar,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
    }


def verification_report(
    scores: Any, genuine: Any, fmrs: Sequence[float] = (1e-2, 1e-3)
) -> dict[str, Any]:
    """ROC AUC, and TAR / FNMR / threshold at each FMR in ``fmrs``, of scored pairs."""
    points = operating_points(scores, genuine)
    report: dict[str, Any] = {
        "roc_auc": roc_auc(scores, genuine),
        "num_genuine": points.num_genuine,
        "num_impostor": points.num_impostor,
    }
    for fmr in fmrs:
        target = _check_rate(fmr, "fmr")
        best = int(np.flatnonzero(points.fmr <= target).max())
        report[f"tar@fmr={fmr:g}"] = float(points.tar[best])
        report[f"fnmr@fmr={fmr:g}"] = 1.0 - float(points.tar[best])
        report[f"threshold@fmr={fmr:g}"] = float(points.thresholds[best])
    return report


def match_labels(
    labels: Sequence[Any], scores: Any, threshold: float, unknown: Any = UNKNOWN
) -> list[Any]:
    """Each label where its score is ``>= threshold``, else ``unknown``."""
    t = check_threshold(threshold)
    s = np.asarray(scores, dtype=np.float64)
    return [label if score >= t else unknown for label, score in zip(labels, s)]


__all__ = [
    "MAX_ALL_PAIRS",
    "UNKNOWN",
    "Calibration",
    "OperatingPoints",
    "Pairs",
    "calibrate_threshold",
    "check_threshold",
    "fnmr_at_fmr",
    "match_labels",
    "operating_points",
    "rates_at_threshold",
    "roc_auc",
    "tar_at_fmr",
    "verification_pairs",
    "verification_report",
]
