"""Between-sample augmentation: points on the segment to the nearest same-class neighbour."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from detreg_keras.augment import between_sample_augment, nearest_same_class_neighbor


def _reference_partner(z: np.ndarray, labels: np.ndarray) -> list[int | None]:
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    partners = []
    for i in range(len(z)):
        best, best_sim = None, -np.inf
        for j in range(len(z)):
            if j != i and labels[j] == labels[i] and unit[i] @ unit[j] > best_sim:
                best, best_sim = j, unit[i] @ unit[j]
        partners.append(best)
    return partners


def test_partner_is_nearest_same_class_by_cosine_and_points_lie_on_segment():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((24, 5)).astype("float32")
    labels = rng.integers(0, 4, 24)
    labels[0], labels[1] = 7, 7  # a pair
    labels[2] = 9  # a singleton
    eps = 0.4
    augmented, valid = between_sample_augment(tf.constant(z), tf.constant(labels), eps)
    augmented, valid = augmented.numpy(), valid.numpy()
    for i, j in enumerate(_reference_partner(z, labels)):
        if j is None:
            assert not valid[i]
            np.testing.assert_allclose(augmented[i], z[i])
            continue
        assert valid[i]
        np.testing.assert_allclose(augmented[i], z[i] + eps * (z[j] - z[i]), atol=1e-6)
        # on the segment: |z_i - z_ij| + |z_ij - z_j| == |z_i - z_j|, at fraction eps
        d_ij = np.linalg.norm(z[i] - z[j])
        np.testing.assert_allclose(np.linalg.norm(z[i] - augmented[i]), eps * d_ij, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(augmented[i] - z[j]), (1 - eps) * d_ij, rtol=1e-5)
    assert valid[0] and valid[1] and not valid[2]


def test_all_singletons_and_duplicates():
    z = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    index, valid = nearest_same_class_neighbor(z, tf.constant([0, 1, 2]))
    assert not valid.numpy().any()
    assert index.numpy().tolist() == [0, 1, 2]
    augmented, valid = between_sample_augment(tf.constant([[1.0, 2.0], [1.0, 2.0]]), tf.constant([3, 3]), 0.4)
    assert valid.numpy().all()
    np.testing.assert_allclose(augmented.numpy(), [[1.0, 2.0], [1.0, 2.0]])


def test_works_in_tf_function_with_dynamic_batch():
    fn = tf.function(between_sample_augment, input_signature=[
        tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([None], tf.int32)
    ])
    out, valid = fn(tf.constant([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), tf.constant([0, 0, 1]))
    np.testing.assert_allclose(out.numpy()[0], [0.6, 0.4, 0.0], atol=1e-6)
    assert valid.numpy().tolist() == [True, True, False]


@pytest.mark.parametrize("eps", [-0.1, 1.5])
def test_epsilon_outside_unit_interval_is_rejected(eps):
    with pytest.raises(ValueError, match="epsilon"):
        between_sample_augment(tf.zeros((2, 2)), tf.constant([0, 0]), eps)
