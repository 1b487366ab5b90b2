"""Decoding, transforms and tf.data pipelines (detreg_keras.data.pipeline)."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detreg_keras.data import (
    DecodeStats,
    ImageRecords,
    MPerClassSampler,
    decode_image,
    decode_train_transform,
    ensure_rgb,
    eval_transform,
    make_eval_dataset,
    make_train_dataset,
    random_resized_crop_box,
    records_from_dataset,
    train_transform,
)


def _encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _rand(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _records(
    num_classes: int = 6, per_class: int = 5, extra: dict[int, bytes] | None = None
) -> ImageRecords:
    """In-memory records of varied sizes, formats and colour modes."""
    formats = [
        ("PNG", None, 3),
        ("JPEG", None, 3),
        ("PNG", "L", 1),
        ("PNG", "RGBA", 4),
        ("BMP", None, 3),
    ]
    data, labels = [], []
    for c in range(num_classes):
        for i in range(per_class):
            fmt, mode, channels = formats[(c + i) % len(formats)]
            shape = (12 + 3 * i, 20 + 5 * c, channels) if channels > 1 else (12 + 3 * i, 20 + 5 * c)
            data.append(_encode(_rand(shape, c * 100 + i), fmt, "RGBA" if channels == 4 else mode))
            labels.append(c)
    for position, blob in sorted((extra or {}).items()):
        data.insert(position, blob)
        labels.insert(position, 0)
    return ImageRecords(
        paths=[f"mem{i}" for i in range(len(data))],
        labels=np.array(labels),
        class_names=[f"c{c}" for c in range(num_classes)],
        data=data,
    )


# ----------------------------------------------------------------------------- decoding


def test_decode_image_converts_to_rgb_uint8():
    rgb = _rand((9, 7, 3), 1)
    rgba = np.concatenate([rgb, _rand((9, 7, 1), 2)], axis=-1)
    gray = _rand((9, 7), 3)
    np.testing.assert_array_equal(decode_image(_encode(rgb)).numpy(), rgb)
    np.testing.assert_array_equal(decode_image(_encode(rgba)).numpy(), rgb)  # alpha dropped
    out = decode_image(_encode(gray)).numpy()
    assert out.dtype == np.uint8 and out.shape == (9, 7, 3)
    for ch in range(3):
        np.testing.assert_array_equal(out[..., ch], gray)
    np.testing.assert_array_equal(decode_image(_encode(rgb, "BMP")).numpy(), rgb)
    assert decode_image(_encode(rgb, "GIF")).shape.as_list() == [9, 7, 3]
    assert decode_image(_encode(rgb, "JPEG")).shape.as_list() == [9, 7, 3]
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_image(b"not an image")


def test_ensure_rgb_channels():
    base = tf.constant(_rand((4, 5, 4), 0))
    assert ensure_rgb(base[..., :1]).shape.as_list() == [4, 5, 3]
    np.testing.assert_array_equal(ensure_rgb(base[..., :2]).numpy()[..., 2], base.numpy()[..., 0])
    np.testing.assert_array_equal(ensure_rgb(base).numpy(), base.numpy()[..., :3])

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
    def dynamic(image):
        return ensure_rgb(image)

    assert dynamic(base[..., :1]).shape == (4, 5, 3)
    np.testing.assert_array_equal(dynamic(base).numpy(), base.numpy()[..., :3])


# ----------------------------------------------------------------------------- transforms


def test_random_resized_crop_box_bounds_and_fallback():
    seeds = tf.stack(
        [tf.range(200, dtype=tf.int64), tf.fill([200], tf.constant(7, tf.int64))], axis=1
    )
    boxes = tf.function(
        lambda seeds: tf.map_fn(
            lambda s: tf.stack(random_resized_crop_box(100, 80, s, (0.08, 1.0))),
            seeds,
            fn_output_signature=tf.int32,
        )
    )(seeds).numpy()
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 100).all() and (left + w <= 80).all()
    area = h * w / 8000.0
    assert area.min() >= 0.06 and area.max() <= 1.0
    assert (w / h >= 0.7).all() and (w / h <= 1.4).all()
    assert len({tuple(b) for b in boxes}) > 150  # really random
    # A 1:1 box of the whole area never fits a 100x50 image: centre fallback.
    fallback = random_resized_crop_box(
        100, 50, tf.constant([1, 2], tf.int64), (1.0, 1.0), (1.0, 1.0)
    )
    assert [int(v) for v in fallback] == [25, 0, 50, 50]


def test_train_transform_shapes_range_determinism_and_flip():
    image = tf.constant(_rand((16, 16, 3), 4))
    seed = tf.constant([3, 4], tf.int64)
    out = train_transform(image, 12, seed=seed)
    assert out.shape == (12, 12, 3) and out.dtype == tf.float32
    assert float(tf.reduce_min(out)) >= 0.0 and float(tf.reduce_max(out)) <= 255.0
    np.testing.assert_array_equal(out.numpy(), train_transform(image, 12, seed=seed).numpy())
    assert not np.array_equal(out.numpy(), train_transform(image, 12, seed=seed + 1).numpy())
    assert train_transform(image[..., :1], (10, 14)).shape == (10, 14, 3)
    # Whole-image crop: each output is the image or its mirror, both occur.
    flips = set()
    for s in range(16):
        whole = train_transform(
            image, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=tf.constant([s, 0], tf.int64)
        ).numpy()
        if np.allclose(whole, image.numpy(), atol=1e-3):
            flips.add(False)
        else:
            np.testing.assert_allclose(whole, image.numpy()[:, ::-1], atol=1e-3)
            flips.add(True)
    assert flips == {False, True}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_fused_decode_crop_matches_decode_then_crop(fmt):
    data = _encode(_rand((40, 50, 3), 5), fmt)
    seed = tf.constant([11, 12], tf.int64)
    fused = decode_train_transform(data, 24, seed=seed).numpy()
    reference = train_transform(decode_image(data), 24, seed=seed).numpy()
    assert fused.shape == (24, 24, 3)
    np.testing.assert_allclose(fused, reference, atol=2.0 if fmt == "JPEG" else 1e-4)


def test_eval_transform_center_crop_and_resize():
    wide = np.zeros((200, 300, 3), np.uint8)
    wide[:, 150:] = 255  # black left half, white right half
    out = eval_transform(wide, 48, resize_size=64).numpy()
    # 200x300 -> 64x96 (shorter side 64), crop 48x48 at left 24: edge at column 24.
    assert out.shape == (48, 48, 3) and out.dtype == np.float32
    assert out[:, :22].max() < 1.0 and out[:, 26:].min() > 254.0
    tall = np.transpose(wide, (1, 0, 2))  # 300x200, black top, white bottom
    out_tall = eval_transform(tall, 48, resize_size=64).numpy()
    assert out_tall[:22].max() < 1.0 and out_tall[26:].min() > 254.0
    plain = eval_transform(wide[..., :1], (30, 40), mode="resize").numpy()
    assert plain.shape == (30, 40, 3)
    assert plain[:, :18].max() < 1.0 and plain[:, 22:].min() > 254.0
    constant = eval_transform(np.full((50, 70, 3), 77, np.uint8), 32, resize_size=40).numpy()
    np.testing.assert_allclose(constant, 77.0, atol=1e-3)
    with pytest.raises(ValueError, match="smaller"):
        eval_transform(wide, 224, resize_size=200)
    with pytest.raises(ValueError, match="mode"):
        eval_transform(wide, 32, mode="pad")


# ----------------------------------------------------------------------------- pipelines


def test_train_dataset_random_batches():
    records = _records()
    ds = make_train_dataset(records, batch_size=8, image_size=16, seed=1)
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == 30 // 8
    for images, labels in batches:
        assert images.shape == (8, 16, 16, 3) and images.dtype == np.float32
        assert labels.dtype == np.int64
        assert images.min() >= 0.0 and images.max() <= 255.0
    assert images.max() > 1.0  # raw pixels, not normalised
    epoch2 = list(ds.as_numpy_iterator())  # next iteration = next epoch
    assert not np.array_equal(batches[0][1], epoch2[0][1])
    again = list(
        make_train_dataset(records, batch_size=8, image_size=16, seed=1).as_numpy_iterator()
    )
    for (a, la), (b, lb) in zip(batches, again):
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_allclose(a, b)
    everything = make_train_dataset(records, 8, 16, drop_remainder=False)
    labels = np.concatenate([y for _, y in everything.as_numpy_iterator()])
    np.testing.assert_array_equal(np.sort(labels), np.sort(records.labels))


def test_train_dataset_m_per_class():
    records = _records(num_classes=6, per_class=5)
    ds = make_train_dataset(
        records,
        image_size=16,
        sampler="m_per_class",
        classes_per_batch=3,
        samples_per_class=2,
        seed=0,
    )
    batches = list(ds.as_numpy_iterator())
    assert len(batches) == len(MPerClassSampler(records.labels, 3, 2))
    seen = set()
    for images, labels in batches:
        assert images.shape == (6, 16, 16, 3)
        classes, counts = np.unique(labels, return_counts=True)
        assert len(classes) == 3 and (counts == 2).all()
        seen |= set(classes.tolist())
    assert seen == set(range(6))
    repeated = make_train_dataset(
        records, 6, 16, sampler="m_per_class", samples_per_class=2, repeat=True
    )
    assert len(list(repeated.take(len(batches) * 2 + 1))) == len(batches) * 2 + 1
    with pytest.raises(ValueError, match="two of"):
        make_train_dataset(records, 6, 16, sampler="m_per_class")
    with pytest.raises(ValueError, match="!="):
        make_train_dataset(
            records, 8, 16, sampler="m_per_class", classes_per_batch=3, samples_per_class=2
        )


def test_corrupt_images_are_dropped_not_fatal(caplog):
    truncated = _encode(_rand((64, 64, 3), 9), "JPEG")
    records = _records(extra={3: b"garbage bytes", 10: truncated[: len(truncated) // 2], 20: b""})
    stats = DecodeStats()
    ds = make_train_dataset(records, 4, 16, drop_remainder=False, stats=stats)
    labels = np.concatenate([y for _, y in ds.as_numpy_iterator()])
    assert len(labels) == len(records) - 3
    assert stats.dropped == 3 and "3 dropped" in stats.summary()
    with caplog.at_level(logging.WARNING, logger="detreg_keras.data.pipeline"):
        next(iter(ds))  # the next epoch starts with a warning summary
    assert any("unreadable image(s) dropped" in r.getMessage() for r in caplog.records)

    mpc_stats = DecodeStats()
    mpc = make_train_dataset(
        records, 6, 16, sampler="m_per_class", samples_per_class=2, stats=mpc_stats, seed=2
    )
    kept = list(mpc.as_numpy_iterator())
    planned = len(MPerClassSampler(records.labels, 3, 2))
    assert 0 < len(kept) < planned  # batches with a bad image are dropped whole
    assert mpc_stats.dropped == 6 * (planned - len(kept))
    for _, batch_labels in kept:
        assert (np.unique(batch_labels, return_counts=True)[1] == 2).all()

    eval_stats = DecodeStats()
    evaluated = make_eval_dataset(records, 7, 16, resize_size=20, stats=eval_stats)
    eval_labels = np.concatenate([y for _, y in evaluated.as_numpy_iterator()])
    assert len(eval_labels) == len(records) - 3 and eval_stats.dropped == 3


def test_repeat_pipeline_reports_drops_per_epoch_not_images_in_flight(caplog):
    """repeat=True: images still being decoded at an epoch boundary are not "dropped"."""
    records = _records()  # 30 valid images
    stats = DecodeStats()
    ds = make_train_dataset(records, 4, 16, repeat=True, stats=stats, seed=3)
    with caplog.at_level(logging.WARNING, logger="detreg_keras.data.pipeline"):
        for _ in ds.take(7 * 30 // 4):  # 7 epochs, read without pauses
            pass
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]

    truncated = _encode(_rand((64, 64, 3), 9), "JPEG")
    bad = _records(extra={5: b"not an image", 11: truncated[: len(truncated) // 3]})  # 32 images, 2 bad
    bad_stats = DecodeStats()
    bad_ds = make_train_dataset(bad, 6, 16, repeat=True, stats=bad_stats, seed=1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detreg_keras.data.pipeline"):
        for _ in bad_ds.take(4 * 30 // 6):  # 4 epochs of 30 good images: epochs 0-1 settle by epoch 3
            pass
    messages = [r.getMessage() for r in caplog.records if "unreadable image(s) dropped" in r.getMessage()]
    # epoch e is reported when epoch e + 2 is planned (the prefetch may run an epoch ahead)
    assert 2 <= len(messages) <= 3
    for epoch, message in enumerate(messages):
        assert message.startswith("detreg_keras.data: 2 unreadable")
        assert f"in epoch {epoch} (30 of 32 decoded)" in message
    assert bad_stats._reported == 2 * len(messages)


def test_pipelines_are_not_fed_by_from_generator():
    """from_generator halved decode throughput per CPU-second (bench/bench_tfdata.py): not used."""
    records = _records()
    pipelines = [
        make_train_dataset(records, 4, 16),
        make_train_dataset(records, 6, 16, sampler="m_per_class", samples_per_class=2),
        make_eval_dataset(records, 4, 16, mode="resize"),
    ]
    for ds in pipelines:
        graph = ds._as_serialized_graph(external_state_policy=tf.data.experimental.ExternalStatePolicy.WARN)
        serialized = graph.numpy()
        assert b"GeneratorDataset" not in serialized and b"PyFunc" in serialized  # numpy_function sources


def test_eval_dataset_keeps_order():
    records = _records()
    ds = make_eval_dataset(records, batch_size=7, image_size=16, resize_size=18)
    batches = list(ds.as_numpy_iterator())
    assert [len(y) for _, y in batches] == [7, 7, 7, 7, 2]
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), records.labels)
    first = eval_transform(decode_image(records.data[0]), 16, resize_size=18).numpy()
    np.testing.assert_allclose(batches[0][0][0], first, atol=1e-4)
    assert batches[0][0].dtype == np.float32 and batches[0][0].shape[1:] == (16, 16, 3)


def test_paths_records_read_from_disk(tmp_path):
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        path.write_bytes(_encode(_rand((10, 10, 3), i)))
        paths.append(str(path))
    records = ImageRecords(paths=paths, labels=[0, 0, 1, 1], class_names=["a", "b"])
    images, labels = next(iter(make_eval_dataset(records, 4, 10, mode="resize")))
    np.testing.assert_allclose(images[2].numpy(), _rand((10, 10, 3), 2), atol=1e-3)
    assert labels.numpy().tolist() == [0, 0, 1, 1]
    train = make_train_dataset(
        records, image_size=8, sampler="m_per_class", classes_per_batch=2, samples_per_class=2
    )
    assert next(iter(train))[0].shape == (4, 8, 8, 3)


def test_tf_dataset_sources():
    gray = _rand((10, 12, 16, 1), 3)
    labels = np.arange(10) % 3
    decoded = tf.data.Dataset.from_tensor_slices((gray, labels))
    images, batch_labels = next(iter(make_train_dataset(decoded, 4, 8, seed=0)))
    assert images.shape == (4, 8, 8, 3) and batch_labels.dtype == tf.int64
    np.testing.assert_array_equal(images[..., 0].numpy(), images[..., 2].numpy())
    ev_images, ev_labels = next(iter(make_eval_dataset(decoded, 10, (12, 16), mode="resize")))
    np.testing.assert_allclose(
        ev_images[..., 1].numpy(), gray[..., 0].astype(np.float32), atol=1e-3
    )
    np.testing.assert_array_equal(ev_labels.numpy(), labels)

    encoded = tf.data.Dataset.from_tensor_slices(([_encode(g[..., 0]) for g in gray], labels))
    images, _ = next(iter(make_train_dataset(encoded, 5, 8)))
    assert images.shape == (5, 8, 8, 3)
    records = records_from_dataset(decoded)
    assert records.in_memory and len(records) == 10 and records.class_names == ["0", "1", "2"]
    np.testing.assert_array_equal(decode_image(records.data[4]).numpy()[..., 0], gray[4, ..., 0])
    mpc = make_train_dataset(
        decoded, image_size=8, sampler="m_per_class", classes_per_batch=3, samples_per_class=2
    )
    for _, y in mpc.as_numpy_iterator():
        assert sorted(np.unique(y, return_counts=True)[1].tolist()) == [2, 2, 2]


# ----------------------------------------------------------------------------- sampler objects


def _indexed_records(n: int = 24, num_classes: int = 6) -> ImageRecords:
    """Uniform grey images whose value is ``10 * index``: a batch's pixels name its examples."""
    data = [_encode(np.full((10, 14), 10 * i, dtype=np.uint8)) for i in range(n)]
    labels = np.arange(n) % num_classes
    return ImageRecords(
        paths=[f"x{i}" for i in range(n)],
        labels=labels.astype(np.int64),
        class_names=[str(c) for c in range(num_classes)],
        data=data,
    )


def _batch_indices(images: np.ndarray) -> np.ndarray:
    """Example indices of a batch of :func:`_indexed_records` images (crops of a uniform image)."""
    return np.rint(images[:, 0, 0, 0] / 10.0).astype(np.int64)


def test_train_dataset_takes_a_sampler_object():
    from detreg_keras.data import SPCRSampler

    records = _indexed_records()
    ds = make_train_dataset(records, image_size=8, sampler=SPCRSampler(records.labels, 6, seed=3))
    batches = list(ds.as_numpy_iterator())
    expected = SPCRSampler(records.labels, 6, seed=3).epoch_indices(0)  # an independent sampler
    assert len(batches) == len(expected) == 24 // 6
    for (images, labels), rows in zip(batches, expected, strict=True):
        assert images.shape == (6, 8, 8, 3)
        np.testing.assert_array_equal(_batch_indices(images), rows)
        np.testing.assert_array_equal(labels, records.labels[rows])
    second = [_batch_indices(x) for x, _ in ds.as_numpy_iterator()]  # the next iteration: epoch 1
    np.testing.assert_array_equal(np.stack(second), SPCRSampler(records.labels, 6, seed=3).epoch_indices(1))


def test_train_dataset_plans_embedded_samplers_one_batch_at_a_time():
    from detreg_keras.data import EmbeddingStore, GreedyCoresetSampler

    records = _indexed_records()
    store = EmbeddingStore(len(records))
    store.update(np.random.default_rng(0).normal(size=(len(records), 4)))
    sampler = GreedyCoresetSampler(records.labels, 4, store, pool_size=12, samples_per_class=2, seed=1)
    reference = GreedyCoresetSampler(records.labels, 4, store, pool_size=12, samples_per_class=2, seed=1)
    batches = [_batch_indices(x) for x, _ in make_train_dataset(records, None, 8, sampler=sampler)]
    assert len(batches) == len(sampler) == 6
    for step, rows in enumerate(batches):
        np.testing.assert_array_equal(rows, reference.batch_indices(0, step))


def test_train_dataset_sampler_object_errors():
    from detreg_keras.data import SPCRSampler

    records = _indexed_records()
    sampler = SPCRSampler(records.labels, 6)
    with pytest.raises(ValueError, match="differs from the sampler's batch_size=6"):
        make_train_dataset(records, 8, 8, sampler=sampler)
    with pytest.raises(ValueError, match="only apply to sampler='m_per_class'"):
        make_train_dataset(records, None, 8, sampler=sampler, samples_per_class=2)
    with pytest.raises(ValueError, match="indexes 12 examples but the source holds 24"):
        make_train_dataset(records, None, 8, sampler=SPCRSampler(records.labels[:12], 6))
    with pytest.raises(TypeError, match="got list"):
        make_train_dataset(records, 6, 8, sampler=[1, 2])
    with pytest.raises(ValueError, match="'random', 'm_per_class' or an index sampler object"):
        make_train_dataset(records, 6, 8, sampler="spc_r")
