"""tfds benchmark loaders on mocked data (detreg_keras.data.tfds_loaders).

``tfds.testing.mock_data`` builds the real tfds builders (so feature names are
checked against the installed tensorflow_datasets) and generates random
examples; the ``as_dataset_fn`` variant injects known examples per tfds split
to check the class-disjoint DML split over the union of tfds' splits.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from detreg_keras.data import (
    decode_image,
    load_cars196,
    load_cub200,
    load_sop,
    make_train_dataset,
)


def _pairs(ds: tf.data.Dataset) -> tuple[list, np.ndarray]:
    images, labels = [], []
    for image, label in ds.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    return images, np.asarray(labels)


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _fake_splits(label_key: str, per_split: dict[str, list[int]]):
    """An ``as_dataset_fn`` whose images are filled with 1 (train) or 2 (test)."""

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
        del self, read_config, shuffle_files, kwargs
        labels = per_split[str(split)]
        marker = {"train": 1, "test": 2}[str(split)]
        skip = isinstance(decoders, tfds.decode.PartialDecoding) and isinstance(
            (decoders.decoders or {}).get("image"), tfds.decode.SkipDecoding
        )
        if skip:
            images = tf.constant([_png(marker)] * len(labels))
        else:
            images = tf.fill([len(labels), 4, 6, 3], tf.constant(marker, tf.uint8))
        return tf.data.Dataset.from_tensor_slices(
            {"image": images, label_key: tf.constant(labels, tf.int64)}
        )

    return as_dataset


@pytest.mark.parametrize(
    ("loader", "num_train", "num_classes"),
    [(load_cub200, 100, 200), (load_cars196, 98, 196)],
)
def test_random_mock_uses_both_splits_and_dml_ranges(loader, num_train, num_classes):
    with tfds.testing.mock_data(num_examples=12):
        result = loader()
        train_images, train_labels = _pairs(result.train)
        test_images, test_labels = _pairs(result.test)
    assert len(train_labels) + len(test_labels) == 24  # 12 per tfds split, both read
    assert ((0 <= train_labels) & (train_labels < num_train)).all()
    assert ((num_train <= test_labels) & (test_labels < num_classes)).all()
    assert result.num_train_classes == num_train
    assert result.num_test_classes == num_classes - num_train
    for image in train_images[:2] + test_images[:2]:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert result.train.element_spec[1].dtype == tf.int64


def test_union_of_tfds_splits_and_remapping():
    per_split = {"train": [0, 150, 99, 100, 7], "test": [1, 199, 98, 120]}
    with tfds.testing.mock_data(as_dataset_fn=_fake_splits("label", per_split)):
        result = load_cub200()
        train_images, train_labels = _pairs(result.train)
        _, test_labels = _pairs(result.test)
        remapped = load_cub200(remap_test=True)
        _, test_remapped = _pairs(remapped.test)
        custom = load_cub200(train_classes=[150, 7, 1], test_classes=[0, 99])
        _, custom_train = _pairs(custom.train)
        _, custom_test = _pairs(custom.test)
    # Training classes 0-99 come from *both* tfds splits.
    assert sorted(train_labels.tolist()) == [0, 1, 7, 98, 99]
    markers = {int(img.flat[0]) for img in train_images}
    assert markers == {1, 2}
    assert sorted(test_labels.tolist()) == [100, 120, 150, 199]
    assert sorted(test_remapped.tolist()) == [0, 20, 50, 99]
    # Custom classes: labels follow the order of train_classes.
    assert custom_train.tolist() == [0, 1, 2]  # 150 -> 0, 7 -> 1, 1 -> 2 (file order)
    assert custom.train_classes.decode(custom_train).tolist() == [150, 7, 1]
    assert sorted(custom_test.tolist()) == [0, 99]


def test_encoded_output_decodes():
    per_split = {"train": [3, 4], "test": [5, 150]}
    with tfds.testing.mock_data(as_dataset_fn=_fake_splits("label", per_split)):
        result = load_cars196(decode=False)
        encoded, labels = _pairs(result.train)
        batch = next(iter(make_train_dataset(result.train, 2, 8, seed=0)))
    assert result.train.element_spec[0].dtype == tf.string
    assert sorted(labels.tolist()) == [3, 4, 5]
    assert decode_image(encoded[0]).shape.as_list() == [4, 6, 3]
    assert batch[0].shape == (2, 8, 8, 3)


def test_encoded_output_with_random_mock():
    with tfds.testing.mock_data(num_examples=3):
        image, _ = next(iter(load_cub200(decode=False).train.concatenate(
            load_cub200(decode=False).test)))  # fmt: skip
    assert decode_image(image).shape[-1] == 3


def test_sop_keeps_official_split():
    per_split = {"train": [0, 5, 11317, 5], "test": [11318, 22633, 20000]}
    with tfds.testing.mock_data(as_dataset_fn=_fake_splits("class_id", per_split)):
        result = load_sop()
        train_images, train_labels = _pairs(result.train)
        _, test_labels = _pairs(result.test)
        _, test_remapped = _pairs(load_sop(remap_test=True).test)
    assert train_labels.tolist() == [0, 5, 11317, 5]
    assert {int(img.flat[0]) for img in train_images} == {1}  # only tfds' train split
    assert test_labels.tolist() == [11318, 22633, 20000]
    assert test_remapped.tolist() == [0, 11315, 8682]
    assert result.num_train_classes == 11318 and result.num_test_classes == 11316


def test_sop_random_mock_feature_names():
    with tfds.testing.mock_data(num_examples=8):
        result = load_sop()
        _, train_labels = _pairs(result.train)
        _, test_labels = _pairs(result.test)
    assert (train_labels < 11318).all() and (test_labels >= 11318).all()


def test_class_errors_and_unprepared_dataset(tmp_path):
    with pytest.raises(ValueError, match="overlap"):
        load_cub200(train_classes=[1, 2], test_classes=[2])
    with pytest.raises(ValueError, match=r"\[0, 196\)"):
        load_cars196(train_classes=[200])
    with pytest.raises(FileNotFoundError, match="not prepared"):
        load_cub200(data_dir=str(tmp_path))
