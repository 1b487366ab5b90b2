#!/usr/bin/env python
"""Verification ("same character?") on the unseen Omniglot alphabets of a run of scripts/train.py.

    python scripts/train.py --epochs 5 --val-classes 34 --output-dir /tmp/verif
    python scripts/verify_omniglot.py /tmp/verif/omniglot-realnvp-<time>

Default (``--calibration validation``, the project's protocol): the threshold
is calibrated (target FMR) on all pairs of the run's validation characters,
carved from the *training* alphabets (``val_classes`` / ``val_seed`` of its
config; the model never trained on them), and then fixed; ROC AUC and the
TAR / FNMR / FMR / precision at that threshold are measured on all pairs of
the 106 test characters (3 alphabets never seen in training). The same for
raw pixels, mean-centred by the validation images' mean. Then an open-set
check with :meth:`EmbeddingIndex.match` at those thresholds: half of the test
characters are enrolled (10 images each, a random half per ``--seeds``), and
queries are their other 10 images ("known") and images of the characters not
enrolled ("unknown").

``--calibration test-halves`` is the earlier study, kept for comparison only:
it calibrates on one random half of the *test* characters and measures on the
other half (the run needs no validation characters), which the protocol does
not allow for choosing a threshold.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

#: ``--calibration`` choices; the first is the default.
CALIBRATIONS = ("validation", "test-halves")
#: Images per character enrolled in the open-set gallery (the rest are queries).
ENROLLED_PER_CLASS = 10
#: Rows that are counts (printed whole); thresholds have 4 decimals, the other rows are rates (in %).
COUNT_KEYS = ("num_", "items", "queries")


def calibration_splits(cfg: Any) -> tuple[Any, Any]:
    """The validation characters (calibration) and the test characters of a run's config.

    Args:
        cfg: the run's :class:`~detreg_keras.training.TrainConfig`.

    Returns:
        ``(validation, test)`` sources of :func:`~detreg_keras.training.load_splits`:
        the ``cfg.val_classes`` characters carved from the training classes
        (seed ``cfg.val_seed``), and the test split.

    Raises:
        ValueError: the run has no validation classes, or was a tuning run
            (``evaluate_on="val"``, whose "test" split is the validation one).
    """
    from detreg_keras.training import load_splits  # noqa: PLC0415

    if cfg.evaluate_on != "test":
        raise ValueError(
            f"The run was trained with evaluate_on={cfg.evaluate_on!r}: it has no test split to verify on. "
            "Use a run of scripts/train.py without --evaluate-on val."
        )
    if not cfg.val_classes:
        raise ValueError(
            "The run has val_classes=0: there are no validation characters to calibrate the threshold on. "
            "Train it with --val-classes N (e.g. 34), or pass --calibration test-halves for the earlier "
            "study that calibrates on test characters (not the project's protocol)."
        )
    splits, validation = load_splits(cfg)
    return validation, splits.test


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # the index takes unit vectors


def calibrated_rows(
    cal_x: np.ndarray, cal_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, fmrs: list[float]
) -> tuple[dict[str, float], dict[float, float]]:
    """Thresholds calibrated on the pairs of ``cal_*``, measured on the pairs of ``test_*``.

    Returns:
        ``(rows, thresholds)``: the printed rows (``test *``: ROC AUC and the TAR
        at each FMR with the threshold chosen on the test pairs themselves, a
        reference only; ``calibrated@FMR: *``: the threshold, its FMR on the
        calibration pairs and its FMR / TAR / FNMR / precision on the test
        pairs) and ``{fmr: threshold}``.
    """
    from detreg_keras.verification import (  # noqa: PLC0415
        calibrate_threshold,
        rates_at_threshold,
        verification_pairs,
        verification_report,
    )

    pairs_cal = verification_pairs(cal_x, cal_y)
    pairs_test = verification_pairs(test_x, test_y)
    report = verification_report(pairs_test.scores, pairs_test.genuine, fmrs)
    rows = {f"test {k}": v for k, v in report.items() if not k.startswith("threshold")}
    rows["calibration num_genuine"] = pairs_cal.genuine.sum()
    rows["calibration num_impostor"] = (~pairs_cal.genuine).sum()
    thresholds = {}
    for fmr in fmrs:
        c = calibrate_threshold(pairs_cal.scores, pairs_cal.genuine, target_fmr=fmr)
        r = rates_at_threshold(pairs_test.scores, pairs_test.genuine, c.threshold)
        thresholds[fmr] = c.threshold
        rows[f"calibrated@{fmr:g}: threshold"] = c.threshold
        rows[f"calibrated@{fmr:g}: calibration FMR"] = c.fmr
        for key in ("fmr", "tar", "fnmr", "precision"):
            rows[f"calibrated@{fmr:g}: test {key.upper()}"] = r[key]
    return rows, thresholds


def open_set_rows(
    x: np.ndarray, labels: np.ndarray, classes: np.ndarray, thresholds: dict[float, float]
) -> dict[str, float]:
    """Open set with :meth:`EmbeddingIndex.match`: enrol the first half of ``classes``, query the rest.

    Args:
        x: unit vectors.
        labels: their labels.
        classes: the characters of the study, in random order (the first half is enrolled).
        thresholds: ``{pair FMR: threshold}`` to match at.
    """
    from detreg_keras.retrieval import EmbeddingIndex  # noqa: PLC0415
    from detreg_keras.verification import UNKNOWN  # noqa: PLC0415

    known = set(classes[: len(classes) // 2].tolist())
    gallery, known_q, unknown_q = [], [], []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if c in known:
            gallery.extend(members[:ENROLLED_PER_CLASS])
            known_q.extend(members[ENROLLED_PER_CLASS:])
        else:
            unknown_q.extend(members[ENROLLED_PER_CLASS:])
    index = EmbeddingIndex().build(x[gallery], labels=labels[gallery])
    truth = labels[known_q]
    rows = {
        "open set: enrolled items": len(gallery),
        "open set: known queries": len(known_q),
        "open set: unknown queries": len(unknown_q),
    }
    for fmr, threshold in thresholds.items():
        index.set_threshold(threshold)
        mk, mu = index.match(x[known_q]), index.match(x[unknown_q])
        rows[f"open set@{fmr:g}: known correct"] = float(np.mean([a == b for a, b in zip(mk.labels, truth)]))
        rows[f"open set@{fmr:g}: known wrong label"] = float(
            np.mean([a != UNKNOWN and a != b for a, b in zip(mk.labels, truth)])
        )
        rows[f"open set@{fmr:g}: unknown accepted"] = float(np.mean(mu.matched))
    return rows


def validation_study(
    cal: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], seeds: list[int], fmrs: list[float]
) -> list[dict[str, float]]:
    """The default study: thresholds from the validation characters, everything else on the test ones.

    The calibrated rows do not depend on the seed (one fixed validation split);
    the seeds draw the open set's enrolled half of the test characters.
    """
    (cal_x, cal_y), (test_x, test_y) = cal, test
    rows, thresholds = calibrated_rows(_unit(cal_x), cal_y, _unit(test_x), test_y, fmrs)
    orders = [np.random.default_rng(seed).permutation(np.unique(test_y)) for seed in seeds]
    return [{**rows, **open_set_rows(_unit(test_x), test_y, classes, thresholds)} for classes in orders]


def test_halves_study(
    test: tuple[np.ndarray, np.ndarray], seeds: list[int], fmrs: list[float], centre: bool
) -> list[dict[str, float]]:
    """The earlier study (not the protocol): calibrate on one random half of the test characters.

    Args:
        test: ``(vectors, labels)`` of the test split.
        seeds: seeds of the halves (the open set uses the evaluation half).
        fmrs: calibration targets.
        centre: subtract the calibration half's mean vector first (raw pixels).
    """
    x, labels = test
    per_seed = []
    for seed in seeds:
        classes = np.random.default_rng(seed).permutation(np.unique(labels))
        cal_classes, eval_classes = classes[: len(classes) // 2], classes[len(classes) // 2 :]
        cal, ev = np.isin(labels, cal_classes), np.isin(labels, eval_classes)
        x_seed = _unit(x - x[cal].mean(axis=0) if centre else x)
        rows, thresholds = calibrated_rows(x_seed[cal], labels[cal], x_seed[ev], labels[ev], fmrs)
        per_seed.append({**rows, **open_set_rows(x_seed, labels, eval_classes, thresholds)})
    return per_seed


def _cell(key: str, value: float) -> str:
    """A printed value: thresholds with 4 decimals, counts (:data:`COUNT_KEYS`) whole, rates in %."""
    if "threshold" in key:
        return f"{value:9.4f}"
    if any(word in key for word in COUNT_KEYS):
        return f"{value:9.0f}"
    return f"{value * 100:9.3f}"


def print_rows(name: str, per_seed: list[dict[str, float]]) -> None:
    """One line per key: the value of each seed and their mean."""
    print(f"\n{name}")
    for key in per_seed[0]:
        values = np.array([row[key] for row in per_seed], dtype=np.float64)
        shown = " ".join(_cell(key, v) for v in values)
        print(f"  {key:40s} {shown}   mean {_cell(key, values.mean())}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder of scripts/train.py (omniglot)")
    parser.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default=CALIBRATIONS[0],
        help="'validation' (default, the protocol): calibrate on the run's validation characters "
        "(needs --val-classes at training); 'test-halves': the earlier study, calibrating on half "
        "of the test characters (for comparison only)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seeds of the open set's enrolled half (test-halves: also of the calibration half)",
    )
    parser.add_argument("--fmrs", type=float, nargs="+", default=[1e-2, 1e-3])
    args = parser.parse_args(argv)

    import detreg_keras  # noqa: PLC0415
    from detreg_keras.training import embed_split, load_run_config, load_splits, pixel_vectors  # noqa: PLC0415

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    if args.calibration == "validation":
        try:
            val_split, test_split = calibration_splits(cfg)
        except ValueError as error:
            parser.error(f"{run_dir}: {error}")
    else:
        val_split, test_split = None, load_splits(cfg)[0].test
    model = detreg_keras.load_model(run_dir / "model.keras")
    test_emb, test_pix = embed_split(model, test_split, cfg, verbose=0), pixel_vectors(test_split, cfg)
    assert np.array_equal(test_emb[1], test_pix[1])
    labels = test_emb[1]
    print(
        f"{run_dir.name}: {len(labels)} test images of {len(np.unique(labels))} characters; "
        f"calibration: {args.calibration}; seeds {args.seeds}"
    )
    if val_split is None:
        print("NOTE: thresholds calibrated on test characters (earlier study, not the project's protocol)")
        studies = {
            "trained": test_halves_study(test_emb, args.seeds, args.fmrs, centre=False),
            "raw pixels": test_halves_study(test_pix, args.seeds, args.fmrs, centre=True),
        }
    else:
        val_emb, val_pix = embed_split(model, val_split, cfg, verbose=0), pixel_vectors(val_split, cfg)
        print(f"calibration: {len(val_emb[1])} validation images of {len(np.unique(val_emb[1]))} characters")
        mean = val_pix[0].mean(axis=0)  # raw pixels: centred by the calibration images' mean
        studies = {
            "trained": validation_study(val_emb, test_emb, args.seeds, args.fmrs),
            "raw pixels": validation_study(
                (val_pix[0] - mean, val_pix[1]), (test_pix[0] - mean, test_pix[1]), args.seeds, args.fmrs
            ),
        }
    for name, per_seed in studies.items():
        print_rows(name, per_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
