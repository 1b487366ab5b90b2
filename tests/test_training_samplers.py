"""The batch samplers selectable by name in a run (``TrainConfig.sampler``, ``--sampler``)."""

from __future__ import annotations

from typing import ClassVar

import keras
import numpy as np
import pytest

from detreg_keras.cli import train as train_cli
from detreg_keras.data import EmbeddingStore, PoolEmbeddingRefresh
from detreg_keras.training import (
    check_config,
    load_run_config,
    load_splits,
    make_training_data,
    make_training_inputs,
    read_history,
    resolve_config,
    run_training,
)
from detreg_keras.training import inputs as inputs_module
from tests.test_training import tiny


class RecordingRefresh(PoolEmbeddingRefresh):
    """:class:`PoolEmbeddingRefresh` that remembers its instances (to inspect after ``run_training``)."""

    made: ClassVar[list[PoolEmbeddingRefresh]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        RecordingRefresh.made.append(self)


@pytest.fixture
def recorded(monkeypatch) -> list[PoolEmbeddingRefresh]:
    RecordingRefresh.made = []
    monkeypatch.setattr(inputs_module, "PoolEmbeddingRefresh", RecordingRefresh)
    return RecordingRefresh.made


def _run(tmp_path, sampler: str, **overrides) -> dict:
    cfg = tiny(tmp_path, epochs=1, sampler=sampler, samples_per_class=1, batch_size=64, run_name=sampler,
               ks=(1,), **overrides)  # fmt: skip
    return run_training(cfg)


def test_embedded_sampler_trains_and_refreshes_its_pool(tmp_path, recorded):
    result = _run(tmp_path, "greedy_coreset")
    assert result["metrics"]["epochs"] == 1 and np.isfinite(result["history"]["loss"]).all()
    (refresh,) = recorded
    # train begin + the end of epoch 1 (sampler_refresh_epochs=1); every digits training image embedded
    assert refresh.store.version == 2 and len(refresh.durations) == 2
    version, pool = refresh.store.snapshot()
    assert pool.shape == (refresh.store.num_examples, 8) and np.isfinite(pool).all()
    (row,) = read_history(result["run_dir"])  # history.jsonl records the refresh cost of the epoch
    assert row["pool_refresh_s"] == pytest.approx(sum(refresh.durations), rel=1e-6)
    assert row["epoch_seconds"] >= row["pool_refresh_s"] - refresh.durations[0]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["spc_r", "ddm", "frd"])
def test_every_sampler_name_trains_one_epoch(tmp_path, recorded, sampler):
    result = _run(tmp_path, sampler, sampler_candidates=5)
    assert result["metrics"]["epochs"] == 1 and np.isfinite(result["history"]["loss"]).all()
    assert [r.store.version for r in recorded] == ([] if sampler == "spc_r" else [2])


def test_training_inputs_of_each_sampler_on_omniglot_records():
    """Batch counts and compositions, checked against the labels (no model: the store is filled by hand)."""
    cfg = resolve_config("omniglot", batch_size=16, samples_per_class=4, sampler_candidates=4, subset_classes=12)
    train = load_splits(cfg)[0].train
    labels = train.labels
    for name in ("spc_r", "greedy_coreset", "ddm", "frd"):
        cfg.sampler = name
        check_config(cfg)
        inputs = make_training_inputs(train, cfg)
        assert inputs.steps_per_epoch == len(labels) // 16
        assert inputs.reproducible == (name == "spc_r")
        for refresh in inputs.callbacks:  # fill the store as the callback would, from the pool's batches
            rows = sum(len(x) for x, _ in refresh.pool)
            assert rows == len(labels)  # the pool drops nothing: one row per training image
            refresh.store.update(np.random.default_rng(0).normal(size=(rows, 8)))
        for images, batch_labels in inputs.dataset.take(3).as_numpy_iterator():
            assert images.shape == (16, 28, 28, 1) and images.dtype == np.float32
            _, counts = np.unique(batch_labels, return_counts=True)
            if name == "spc_r":
                assert counts.max() >= 2  # at least one same-class pair
            else:
                assert (counts % 4 == 0).all()  # groups of samples_per_class examples of one class


def test_embedded_sampler_on_arrays_and_errors(tmp_path):
    cfg = tiny(tmp_path, sampler="ddm", samples_per_class=1, batch_size=64, sampler_candidates=3)
    train = load_splits(cfg)[0].train
    inputs = make_training_inputs(train, cfg)
    (refresh,) = inputs.callbacks
    assert isinstance(refresh.store, EmbeddingStore) and len(refresh.pool) == len(train[0])
    assert refresh.every_n_epochs == 1 and inputs.steps_per_epoch == len(train[0]) // 64
    with pytest.raises(ValueError, match="use make_training_inputs"):
        make_training_data(train, cfg)
    with pytest.raises(ValueError, match="only 5 classes"):  # 16 groups of 4 from digits 0-4
        make_training_inputs(train, tiny(tmp_path, sampler="frd", samples_per_class=4, batch_size=64))
    for field, value, message in (
        ("sampler", "coreset", "valid samplers: random, m_per_class, spc_r, greedy_coreset, ddm, frd"),
        ("sampler_refresh_epochs", 0, "sampler_refresh_epochs must be >= 1"),
        ("sampler_candidates", 0, "sampler_candidates must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            check_config(tiny(tmp_path, **{field: value}))


def test_cli_sampler_flags():
    cfg = train_cli.parse_args(["--sampler", "ddm", "--sampler-candidates", "12", "--sampler-refresh-epochs", "2"]).cfg
    assert (cfg.sampler, cfg.sampler_candidates, cfg.sampler_refresh_epochs) == ("ddm", 12, 2)
    assert train_cli.parse_args([]).cfg.sampler == "m_per_class"  # the omniglot preset is unchanged
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--sampler", "coreset"])


@pytest.mark.slow
def test_a_run_with_an_embedded_sampler_resumes(tmp_path, recorded):
    """A resumed run replays no batches (they depend on the embeddings), re-embeds its pool and finishes."""
    from tests.test_training import InterruptAt

    cfg = tiny(tmp_path, epochs=2, sampler="greedy_coreset", samples_per_class=1, batch_size=64, run_name="gc",
               ks=(1,))  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, callbacks=[InterruptAt(1)])
    run_dir = tmp_path / "gc"
    result = run_training(load_run_config(run_dir), resume=run_dir)
    assert result["metrics"]["epochs"] == 2 and [r["epoch"] for r in read_history(run_dir)] == [1, 2]
    first, resumed = recorded
    assert first.store.version == 2 and resumed.store.version == 2  # train begin + each epoch end
    restored = keras.models.load_model(run_dir / "model.keras")
    assert int(restored.optimizer.iterations) == 2 * (len(first.pool) // 64)
