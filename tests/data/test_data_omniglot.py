"""Omniglot from the real zips in ../shared/data/omniglot (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detreg_keras.data import (
    OMNIGLOT_TEST_ALPHABETS,
    decode_image,
    load_omniglot,
    make_eval_dataset,
)

# tests/data/<this file> -> parents[2] is the repository root; the data sits
# next to it in shared/data/omniglot.
OMNIGLOT_ROOT = (
    Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "omniglot"
).resolve()
TRAIN_ALPHABETS = {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}


@pytest.fixture(scope="module")
def omniglot():
    if (
        not (OMNIGLOT_ROOT / "images_background_small1.zip").is_file()
        or not (OMNIGLOT_ROOT / "images_background_small2.zip").is_file()
    ):
        pytest.skip(f"Omniglot archives not found in {OMNIGLOT_ROOT}")
    return {split: load_omniglot(OMNIGLOT_ROOT, split) for split in ("train", "test")}


def test_train_split(omniglot):
    train = omniglot["train"]
    assert train.num_classes == 136
    assert len(train) == 136 * 20
    np.testing.assert_array_equal(train.class_counts(), np.full(136, 20))
    assert {name.split("/")[0] for name in train.class_names} == TRAIN_ALPHABETS
    assert all(len(name.split("/")) == 2 for name in train.class_names)
    assert train.skipped == 0 and train.in_memory


def test_test_split_is_class_disjoint(omniglot):
    test = omniglot["test"]
    assert test.num_classes == 106
    np.testing.assert_array_equal(test.class_counts(), np.full(106, 20))
    assert {name.split("/")[0] for name in test.class_names} == set(OMNIGLOT_TEST_ALPHABETS)
    assert not set(test.class_names) & set(omniglot["train"].class_names)
    np.testing.assert_array_equal(np.unique(test.labels), np.arange(106))


def test_images_decode_to_rgb_105(omniglot):
    train = omniglot["train"]
    for i in (0, 1234, len(train) - 1):
        image = decode_image(train.data[i]).numpy()
        assert image.shape == (105, 105, 3) and image.dtype == np.uint8
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
        assert set(np.unique(image)) <= {0, 255}  # binary strokes
    subset = omniglot["test"].subset(np.arange(0, 2120, 53))
    images, labels = next(iter(make_eval_dataset(subset, 64, 105, mode="resize")))
    assert images.shape == (40, 105, 105, 3) and images.dtype.name == "float32"
    assert float(images.numpy().min()) >= 0.0 and float(images.numpy().max()) <= 255.0
    np.testing.assert_array_equal(labels.numpy(), subset.labels)


def test_missing_root_names_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background_small1.zip"):
        load_omniglot(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_omniglot(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        load_omniglot(tmp_path, "val")
