"""Batch samplers (detreg_keras.data.sampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detreg_keras.data.sampling import (
    MPerClassSampler,
    RandomSampler,
    index_dataset,
    m_per_class_steps,
)


def _check_epoch(labels: np.ndarray, batches: np.ndarray, p: int, m: int) -> None:
    assert batches.ndim == 2 and batches.shape[1] == p * m
    for row in batches:
        batch_labels = labels[row]
        classes, counts = np.unique(batch_labels, return_counts=True)
        assert len(classes) == p, "each batch holds P distinct classes"
        assert (counts == m).all(), "each class appears exactly m times in its batch"
        # Class blocks are contiguous: m entries per class.
        assert (batch_labels.reshape(p, m) == batch_labels.reshape(p, m)[:, :1]).all()
    seen = np.unique(batches)
    np.testing.assert_array_equal(seen, np.arange(len(labels)))  # every image, every class
    assert set(np.unique(labels[batches])) == set(np.unique(labels))


@pytest.mark.parametrize(
    ("counts", "p", "m"),
    [
        ([4] * 10, 5, 4),  # balanced, divisible
        ([7, 3, 9, 1, 4, 5, 2, 8], 3, 4),  # odd counts, classes smaller than m
        ([30, 2, 2, 2], 2, 3),  # one dominant class: epoch length set by it
        ([1, 1, 1], 3, 2),  # every class smaller than m (with replacement)
    ],
)
def test_m_per_class_batches_exact_and_cover_everything(counts, p, m):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(counts)) * 10 + 3, counts)  # non-contiguous ids
    labels = labels[rng.permutation(len(labels))]
    sampler = MPerClassSampler(labels, p, m, seed=1)
    chunks = [math.ceil(c / m) for c in counts]
    expected = max(math.ceil(sum(chunks) / p), max(chunks))
    assert len(sampler) == expected == m_per_class_steps(labels, p, m)
    for epoch in range(3):
        batches = sampler.epoch_indices(epoch)
        assert batches.shape[0] == expected
        _check_epoch(labels, batches, p, m)


def test_m_per_class_is_deterministic_and_changes_per_epoch():
    labels = np.repeat(np.arange(12), 6)
    a = MPerClassSampler(labels, 4, 3, seed=7)
    b = MPerClassSampler(labels, 4, 3, seed=7)
    c = MPerClassSampler(labels, 4, 3, seed=8)
    np.testing.assert_array_equal(a.epoch_indices(0), b.epoch_indices(0))
    np.testing.assert_array_equal(a.epoch_indices(5), b.epoch_indices(5))
    assert not np.array_equal(a.epoch_indices(0), a.epoch_indices(1))
    assert not np.array_equal(a.epoch_indices(0), c.epoch_indices(0))


def test_m_per_class_small_class_sampled_with_replacement():
    labels = np.array([0] * 10 + [1])
    batches = MPerClassSampler(labels, 2, 4, seed=0).epoch_indices(0)
    for row in batches:
        assert (row[labels[row] == 1] == 10).all()  # the single image, repeated 4 times


def test_m_per_class_random_sampling_is_not_degenerate():
    labels = np.repeat(np.arange(50), 8)
    batches = MPerClassSampler(labels, 10, 2, seed=0).epoch_indices(0)
    first_classes = {tuple(sorted(set(labels[row]))) for row in batches[:5]}
    assert len(first_classes) == 5


def test_m_per_class_errors():
    with pytest.raises(ValueError, match="at least classes_per_batch"):
        MPerClassSampler([0, 1, 1], 3, 2)
    with pytest.raises(ValueError, match=">= 1"):
        MPerClassSampler([0, 1], 0, 2)


def test_random_sampler_permutations():
    sampler = RandomSampler(20, seed=3)
    e0, e1 = sampler.epoch_indices(0), sampler.epoch_indices(1)
    np.testing.assert_array_equal(np.sort(e0), np.arange(20))
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, RandomSampler(20, seed=3).epoch_indices(0))
    assert len(sampler) == 20


def test_index_dataset_advances_epochs_and_repeats():
    labels = np.repeat(np.arange(6), 3)
    sampler = MPerClassSampler(labels, 3, 2, seed=0)
    ds = index_dataset(sampler)
    assert ds.element_spec[0].shape.as_list() == [6]
    epoch0 = np.stack([idx for idx, _ in ds.as_numpy_iterator()])
    epoch1 = np.stack([idx for idx, _ in ds.as_numpy_iterator()])
    np.testing.assert_array_equal(epoch0, sampler.epoch_indices(0))
    np.testing.assert_array_equal(epoch1, sampler.epoch_indices(1))
    seeds = np.stack([s for _, s in ds.as_numpy_iterator()])
    assert seeds.shape == (len(sampler), 6, 2)

    flat = index_dataset(RandomSampler(5, seed=1), repeat=True, with_seeds=False)
    first = [int(i) for i in flat.take(15).as_numpy_iterator()]
    assert sorted(first[:5]) == sorted(first[5:10]) == list(range(5))
    assert first[:5] != first[5:10] or first[5:10] != first[10:]
