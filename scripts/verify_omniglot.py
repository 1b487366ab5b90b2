#!/usr/bin/env python
"""Verification ("same character?") on the unseen Omniglot alphabets of a run of scripts/train.py.

    python scripts/train.py --epochs 5 --output-dir /tmp/verif
    python scripts/verify_omniglot.py /tmp/verif/omniglot-realnvp-<time>

The 106 test characters (3 alphabets never seen in training) are split at
random into two halves of 53: the threshold is calibrated on the pairs of one
half (target FMR) and measured on the pairs of the other, for the trained
embedding and for raw pixels (mean-centred by the calibration half). Then an
open-set check with :meth:`EmbeddingIndex.match`: half of the evaluation
characters are enrolled (10 images each), and queries are their other 10
images ("known") and images of the characters not enrolled ("unknown").
Repeated over ``--seeds`` splits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np


def _rows(embeddings: np.ndarray, labels: np.ndarray, seed: int, fmrs: list[float]) -> dict[str, float]:
    from detreg_keras.retrieval import EmbeddingIndex  # noqa: PLC0415
    from detreg_keras.verification import (  # noqa: PLC0415
        UNKNOWN,
        calibrate_threshold,
        rates_at_threshold,
        verification_pairs,
        verification_report,
    )

    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    cal_classes, eval_classes = classes[: len(classes) // 2], classes[len(classes) // 2 :]
    cal, ev = np.isin(labels, cal_classes), np.isin(labels, eval_classes)
    pairs_cal = verification_pairs(embeddings[cal], labels[cal])
    pairs_ev = verification_pairs(embeddings[ev], labels[ev])
    out = {f"eval {k}": v for k, v in verification_report(pairs_ev.scores, pairs_ev.genuine, fmrs).items()}
    thresholds = {}
    for fmr in fmrs:
        c = calibrate_threshold(pairs_cal.scores, pairs_cal.genuine, target_fmr=fmr)
        r = rates_at_threshold(pairs_ev.scores, pairs_ev.genuine, c.threshold)
        thresholds[fmr] = c.threshold
        out[f"calibrated@{fmr:g}: threshold"] = c.threshold
        out[f"calibrated@{fmr:g}: eval FMR"] = r["fmr"]
        out[f"calibrated@{fmr:g}: eval TAR"] = r["tar"]
    # Open set: enrol half of the evaluation characters (10 images each), query the rest.
    known = eval_classes[: len(eval_classes) // 2]
    gallery, known_q, unknown_q = [], [], []
    for c in eval_classes:
        members = np.flatnonzero(labels == c)
        if c in known:
            gallery.extend(members[:10])
            known_q.extend(members[10:])
        else:
            unknown_q.extend(members[10:])
    index = EmbeddingIndex().build(embeddings[gallery], labels=labels[gallery])
    for fmr in fmrs:
        index.set_threshold(thresholds[fmr])
        mk, mu = index.match(embeddings[known_q]), index.match(embeddings[unknown_q])
        truth = labels[known_q]
        out[f"open set@{fmr:g}: known correct"] = float(np.mean([a == b for a, b in zip(mk.labels, truth)]))
        out[f"open set@{fmr:g}: known wrong label"] = float(
            np.mean([a != UNKNOWN and a != b for a, b in zip(mk.labels, truth)])
        )
        out[f"open set@{fmr:g}: unknown accepted"] = float(np.mean(mu.matched))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run folder of scripts/train.py (omniglot)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the character splits")
    parser.add_argument("--fmrs", type=float, nargs="+", default=[1e-2, 1e-3])
    args = parser.parse_args(argv)

    import keras  # noqa: PLC0415

    import detreg_keras  # noqa: F401, PLC0415
    from detreg_keras.training import (  # noqa: PLC0415
        embed_split,
        load_run_config,
        load_splits,
        pixel_vectors,
    )

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    splits, _ = load_splits(cfg)
    model = keras.models.load_model(run_dir / "model.keras")
    emb, labels = embed_split(model, splits.test, cfg, verbose=0)
    pixels, pixel_labels = pixel_vectors(splits.test, cfg)
    assert np.array_equal(labels, pixel_labels)
    print(f"{run_dir.name}: {len(labels)} test images of {len(np.unique(labels))} characters; seeds {args.seeds}")
    for name, x in (("trained", emb), ("raw pixels", pixels)):
        per_seed = []
        for seed in args.seeds:
            if name == "raw pixels":  # centre by the calibration half's mean image (as the seed splits it)
                classes = np.random.default_rng(seed).permutation(np.unique(labels))
                x_seed = x - x[np.isin(labels, classes[: len(classes) // 2])].mean(axis=0)
            else:
                x_seed = x
            x_seed = x_seed / np.linalg.norm(x_seed, axis=1, keepdims=True)  # the index takes unit vectors
            per_seed.append(_rows(x_seed, labels, seed, args.fmrs))
        print(f"\n{name}")
        for key in per_seed[0]:
            values = np.array([row[key] for row in per_seed], dtype=np.float64)
            scale = 1 if "threshold" in key or "num_" in key else 100
            shown = " ".join(f"{v * scale:8.2f}" if scale == 100 else f"{v:8.4f}" for v in values)
            print(f"  {key:38s} {shown}   mean {values.mean() * scale:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
