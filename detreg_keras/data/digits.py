"""The embedded default dataset: scikit-learn's handwritten digits (8×8, 10 classes).

It ships inside scikit-learn (no download), so the main job and the tests run
on a fresh, offline machine. Open-set protocol: train on digits 0–4, retrieve
among the unseen digits 5–9 (1,797 images in all, about 180 per class).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def load_digits_split(
    train_classes: Sequence[int] = (0, 1, 2, 3, 4),
    test_classes: Sequence[int] = (5, 6, 7, 8, 9),
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Class-disjoint train/test split of the digits as raw-pixel images.

    Args:
        train_classes: digits used for training; their labels are remapped to
            ``0..len(train_classes)-1`` in the given order.
        test_classes: digits kept for retrieval; labels keep the digit value.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images ``[N, 8, 8, 1]``
        float32 in ``[0, 255]`` (the 0–16 intensities rescaled), labels int32.

    Raises:
        ValueError: overlapping or unknown class lists.
    """
    from sklearn.datasets import load_digits  # noqa: PLC0415  (keeps package import light)

    train_classes, test_classes = list(train_classes), list(test_classes)
    unknown = sorted(set(train_classes + test_classes) - set(range(10)))
    if unknown:
        raise ValueError(f"Digits classes are 0..9, got {unknown}.")
    overlap = sorted(set(train_classes) & set(test_classes))
    if overlap:
        raise ValueError(f"Train and test classes must be disjoint; both contain {overlap}.")
    if not train_classes or not test_classes:
        raise ValueError("Both train_classes and test_classes must be non-empty.")
    digits = load_digits()
    images = (digits.images.astype("float32") * (255.0 / 16.0))[..., None]
    targets = digits.target.astype("int32")
    train_mask = np.isin(targets, train_classes)
    test_mask = np.isin(targets, test_classes)
    remap = {c: i for i, c in enumerate(train_classes)}
    y_train = np.array([remap[t] for t in targets[train_mask]], dtype="int32")
    return (images[train_mask], y_train), (images[test_mask], targets[test_mask])
