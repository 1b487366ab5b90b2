"""Class-disjoint split helpers and label maps (detreg_keras.data.splits)."""

from __future__ import annotations

import numpy as np
import pytest

from detreg_keras.data.splits import (
    ClassSplit,
    LabelMap,
    carve_validation_classes,
    remap_labels,
    split_classes,
)


def test_first_n_split_matches_benchmark_protocol():
    cub = split_classes(200, train=100)
    assert cub.train == tuple(range(100))
    assert cub.test == tuple(range(100, 200))
    cars = split_classes(196, train=98)
    assert cars.train == tuple(range(98)) and cars.test == tuple(range(98, 196))


def test_count_for_test_only_takes_last_classes_and_ids_are_sorted():
    split = split_classes([9, 3, 7, 1, 5], test=2)
    assert split.test == (7, 9)
    assert split.train == (1, 3, 5)


def test_fraction_and_explicit_lists():
    half = split_classes(10, train=0.5)
    assert half.train == (0, 1, 2, 3, 4) and half.test == (5, 6, 7, 8, 9)
    explicit = split_classes(range(10), train=[8, 2], test=[5])
    assert explicit.train == (2, 8) and explicit.test == (5,)
    rest = split_classes(range(6), test=[0, 5])
    assert rest.train == (1, 2, 3, 4)


def test_seeded_random_split_is_deterministic_disjoint_and_complete():
    a = split_classes(50, train=0.6, seed=3)
    b = split_classes(50, train=0.6, seed=3)
    c = split_classes(50, train=0.6, seed=4)
    assert a == b
    assert a != c
    assert len(a.train) == 30 and len(a.test) == 20
    assert not set(a.train) & set(a.test)
    assert set(a.train) | set(a.test) == set(range(50))
    assert list(a.train) == sorted(a.train)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train": [1, 2], "test": [2, 3]}, "overlap"),
        ({"train": 10}, "empty"),
        ({"train": 0}, "empty"),
        ({"train": 11}, "available"),
        ({"train": [1, 99]}, "unknown"),
        ({"train": 1.5}, r"\(0, 1\)"),
        ({}, "at least one"),
        ({"train": [1, 1]}, "more than once"),
    ],
)
def test_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        split_classes(10, **kwargs)


def test_class_split_validates_itself():
    with pytest.raises(ValueError, match="overlap"):
        ClassSplit(train=(1, 2), test=(2,))
    with pytest.raises(ValueError, match="empty"):
        ClassSplit(train=(), test=(2,))


def test_carve_validation_classes():
    train = list(range(100))
    rest, val = carve_validation_classes(train, 10, seed=0)
    assert len(val) == 10 and len(rest) == 90
    assert not set(rest) & set(val)
    assert set(rest) | set(val) == set(train)
    assert (rest, val) == carve_validation_classes(train, 10, seed=0)
    assert val != carve_validation_classes(train, 10, seed=1)[1]
    _, val_frac = carve_validation_classes(train, 0.25, seed=0)
    assert len(val_frac) == 25
    _, tiny = carve_validation_classes([4, 5, 6], 0.01, seed=0)
    assert len(tiny) == 1  # a fraction always gives at least one class


@pytest.mark.parametrize(("num", "match"), [(0, "empty"), (3, "no training"), (5, "available")])
def test_carve_validation_errors(num, match):
    with pytest.raises(ValueError, match=match):
        carve_validation_classes([1, 2, 3], num)


def test_label_map_roundtrip_and_errors():
    label_map = LabelMap.from_ids([100, 7, 42])
    assert label_map.num_classes == 3
    np.testing.assert_array_equal(label_map.encode([42, 100, 7, 7]), [2, 0, 1, 1])
    np.testing.assert_array_equal(label_map.decode([2, 0, 1]), [42, 100, 7])
    table = label_map.dense_table(200)
    assert table.shape == (200,) and table[100] == 0 and table[7] == 1 and table[42] == 2
    assert (np.delete(table, [7, 42, 100]) == -1).all()
    with pytest.raises(ValueError, match="not in this LabelMap"):
        label_map.encode([5])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        label_map.decode([3])
    with pytest.raises(ValueError, match="unique"):
        LabelMap.from_ids([1, 1])


def test_remap_labels_contiguous():
    labels = np.array([150, 100, 150, 199, 100])
    new, label_map = remap_labels(labels)
    np.testing.assert_array_equal(new, [1, 0, 1, 2, 0])
    assert label_map.class_ids == (100, 150, 199)
    np.testing.assert_array_equal(label_map.decode(new), labels)
    new2, _ = remap_labels(labels, class_ids=[199, 150, 100])
    np.testing.assert_array_equal(new2, [1, 2, 1, 0, 2])
