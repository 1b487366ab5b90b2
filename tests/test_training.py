"""The training job: presets and flag overrides, the run folder, no-overwrite, resume."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from detreg_keras.training import (
    DATASETS,
    PRESETS,
    TrainConfig,
    load_run_config,
    load_splits,
    make_training_data,
    read_history,
    resolve_config,
    run_training,
)
from tests.conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]


train_script = load_script("train")


def tiny(tmp_path: Path, **overrides) -> TrainConfig:
    """The digits job shrunk to a few seconds per run."""
    values = dict(
        epochs=3,
        cnn_widths=(8, 16),
        embedding_dim=8,
        num_couplings=2,
        hidden_units=8,
        batch_size=128,
        metrics=("recall", "map_at_r"),
        output_dir=str(tmp_path),
        verbose=0,
    )
    values.update(overrides)
    return resolve_config("digits", **values)


# ----------------------------------------------------------------------------- presets


def test_digits_preset_is_the_default_config():
    assert resolve_config("digits") == TrainConfig()
    cfg, resume = train_script.parse_args([])
    assert cfg == TrainConfig() and resume is None
    assert (cfg.learning_rate, cfg.head_lr_multiplier, cfg.proxy_lr_multiplier) == (3e-4, 1.0, 10.0)
    assert (cfg.epochs, cfg.batch_size, cfg.embedding_dim, cfg.hidden_units, cfg.num_couplings) == (20, 64, 128, 128, 12)


@pytest.mark.parametrize("preset", ["cub200", "cars196", "sop", "inshop"])
def test_paper_presets_follow_the_recipe(preset):
    cfg = resolve_config(preset)
    assert cfg.dataset == preset and cfg.preset == preset
    assert (cfg.embedding_dim, cfg.num_couplings, cfg.hidden_units) == (512, 12, 512)
    assert cfg.flow == "realnvp" and cfg.dueling
    assert (cfg.lambda_min, cfg.lambda_max, cfg.epsilon) == (0.05, 0.05, 0.4)
    assert cfg.learning_rate == 1e-4
    assert cfg.learning_rate * cfg.head_lr_multiplier == pytest.approx(1e-3)
    assert cfg.learning_rate * cfg.proxy_lr_multiplier == pytest.approx(1e-3)
    assert (cfg.epochs, cfg.image_size, cfg.batch_size, cfg.sampler) == (30, 224, 180, "random")
    assert cfg.backbone in ("inception_v3", "resnet50") and cfg.channels == 3
    assert cfg.eval_mode == "center_crop" and cfg.resize_size == 256


def test_preset_ks_and_datasets():
    assert resolve_config("sop").ks == (1, 10, 100, 1000)
    assert resolve_config("inshop").ks == (1, 10, 20, 30, 40, 50)
    assert resolve_config("cub200").ks == (1, 2, 4, 8)
    omniglot = resolve_config("omniglot")
    assert omniglot.dataset == "omniglot" and omniglot.backbone == "small_cnn"
    assert 28 <= omniglot.image_size <= 64 and not omniglot.flip and omniglot.eval_mode == "resize"
    assert set(DATASETS) == {"digits", "omniglot", "cub200", "cars196", "sop", "inshop", "folder"}
    assert {PRESETS[p].get("dataset", "digits") for p in PRESETS} <= set(DATASETS)


def test_flags_override_the_preset():
    cfg, _ = train_script.parse_args(
        ["--preset", "cub200", "--batch-size", "60", "--backbone", "resnet50", "--no-dueling",
         "--ks", "1", "5", "--backbone-weights", "none", "--sampler", "m_per_class", "--dataset", "folder"]
    )  # fmt: skip
    assert (cfg.batch_size, cfg.backbone, cfg.dueling, cfg.ks) == (60, "resnet50", False, (1, 5))
    assert cfg.backbone_weights is None and cfg.sampler == "m_per_class" and cfg.dataset == "folder"
    # everything not given keeps the preset's value
    assert (cfg.embedding_dim, cfg.epochs, cfg.learning_rate, cfg.image_size) == (512, 30, 1e-4, 224)
    cfg, _ = train_script.parse_args(["--preset", "omniglot", "--flow", "none", "--image-size", "64"])
    assert cfg.flow == "none" and cfg.image_size == 64 and cfg.backbone == "small_cnn"


def test_resolve_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown preset"):
        resolve_config("imagenet")
    with pytest.raises(ValueError, match="Unknown TrainConfig fields"):
        resolve_config("digits", learning_rat=1.0)
    with pytest.raises(SystemExit):
        train_script.parse_args(["--preset", "imagenet"])


def test_resume_takes_the_saved_config(tmp_path):
    cfg = tiny(tmp_path, seed=7)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.to_dict()))
    loaded, resume = train_script.parse_args(["--resume", str(tmp_path / "run"), "--verbose", "1"])
    assert resume == str(tmp_path / "run")
    assert loaded == TrainConfig.from_dict({**cfg.to_dict(), "verbose": 1})
    with pytest.raises(SystemExit):  # other flags would silently change the run
        train_script.parse_args(["--resume", str(tmp_path / "run"), "--epochs", "5"])


# ----------------------------------------------------------------------------- runs


class InterruptAt(keras.callbacks.Callback):
    """Raises at the start of epoch ``epoch`` (0-based), like a crash or Ctrl-C."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt(f"interrupted at epoch {epoch + 1}")


def resumable(tmp_path: Path, **overrides) -> TrainConfig:
    """A tiny DReg run with a flow head (its own learning-rate group) and 1 validation class."""
    return tiny(tmp_path, num_couplings=1, dueling=False, val_classes=1, **overrides)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """An uninterrupted 3-epoch run (best checkpoint on validation)."""
    return run_training(resumable(tmp_path_factory.mktemp("runs"), run_name="full"))


def test_run_folder_contents(finished_run):
    run_dir = Path(finished_run["run_dir"])
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "history.jsonl", "logs", "model.keras", "best.keras", "metrics.json", "recall_at_k.png"} <= names
    assert "backup" not in names  # removed once the run is complete
    cfg = load_run_config(run_dir)
    assert cfg.epochs == 3 and cfg.val_classes == 1
    history = read_history(run_dir)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert all({"loss", "pa_loss", "reg_min", "val_recall@1", "epoch_seconds"} <= set(row) for row in history)
    assert finished_run["history"]["loss"] == [row["loss"] for row in history]
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "logs").rglob("*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics == finished_run["metrics"]
    assert {f"recall@{k}" for k in (1, 2, 4, 8)} | {"map@r", "epochs", "train_seconds"} <= set(metrics)
    assert metrics["epochs"] == 3 and 0.0 <= metrics["recall@1"] <= 1.0
    best = metrics["best_checkpoint"]
    assert 1 <= best["epoch"] <= 3 and best["val_recall@1"] == max(row["val_recall@1"] for row in history)
    model = keras.models.load_model(run_dir / "model.keras")
    x = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 1)).astype("float32")
    assert np.allclose(np.linalg.norm(model.predict(x, verbose=0), axis=1), 1.0, atol=1e-5)
    assert (run_dir / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_run_folder_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="never overwritten"):
        run_training(tiny(tmp_path, run_name="taken"))
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]
    assert (run_dir / "notes.txt").read_text() == "keep me"


def test_resume_continues_an_interrupted_run(tmp_path, finished_run):
    cfg = resumable(tmp_path, run_name="interrupted")
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, callbacks=[InterruptAt(2)])
    run_dir = tmp_path / "interrupted"
    assert not (run_dir / "metrics.json").exists()
    assert json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"] == 2
    assert [row["epoch"] for row in read_history(run_dir)] == [1, 2]
    with pytest.raises(FileExistsError):  # a new run never reuses the folder ...
        run_training(cfg)
    with pytest.raises(ValueError, match="differs"):  # ... and resume keeps the saved recipe
        run_training(resumable(tmp_path, run_name="interrupted", epochs=4), resume=run_dir)

    result = run_training(load_run_config(run_dir), resume=run_dir)  # ... only --resume does
    history = read_history(run_dir)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert result["metrics"]["epochs"] == 3 and not (run_dir / "backup").exists()

    # Same weights, optimizer step and metrics as the uninterrupted run: nothing lost, nothing redone.
    full_dir = Path(finished_run["run_dir"])
    resumed = keras.models.load_model(run_dir / "model.keras")
    full = keras.models.load_model(full_dir / "model.keras")
    splits, _ = load_splits(cfg)
    steps = make_training_data(splits.train, cfg)[1]
    assert int(resumed.optimizer.iterations) == int(full.optimizer.iterations) == 3 * steps
    for a, b in zip(resumed.weights, full.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    full_history = read_history(full_dir)
    for key in ("loss", "val_recall@1"):
        np.testing.assert_allclose([r[key] for r in history], [r[key] for r in full_history], rtol=1e-5, atol=1e-6)
    assert result["metrics"]["recall@1"] == pytest.approx(finished_run["metrics"]["recall@1"])
    assert result["metrics"]["best_checkpoint"]["epoch"] == finished_run["metrics"]["best_checkpoint"]["epoch"]
    with pytest.raises(ValueError, match="finished run"):
        run_training(load_run_config(run_dir), resume=run_dir)


@pytest.mark.slow
def test_folder_dataset_trains_on_image_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(4):  # 4 classes: 2 to train, 2 to test (the DML half split)
        (root / f"class{c}").mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(rng.normal(60 * c, 20, (12, 12, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    cfg = tiny(tmp_path, dataset="folder", train_dir=str(root), epochs=1, batch_size=4, run_name="folder",
               eval_mode="resize", flow="none", ks=(1, 2))  # fmt: skip
    result = run_training(cfg)
    assert result["metrics"]["epochs"] == 1 and 0.0 <= result["metrics"]["recall@1"] <= 1.0


@pytest.mark.slow
def test_tfds_preset_on_mocked_cub200(tmp_path):
    """The cub200 preset's data path (tfds union split, label pass, validation carve on a
    tf.data source, random batches, Resize+CenterCrop evaluation) on tfds' mocked data,
    with a small CNN instead of the ImageNet backbone."""
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = resolve_config(
        "cub200", backbone="small_cnn", backbone_weights=None, cnn_widths=(8,), image_size=16, resize_size=18,
        embedding_dim=8, flow="none", epochs=2, warmup_epochs=1, batch_size=8, val_classes=3, eval_batch_size=16,
        checkpoint_every=1, output_dir=str(tmp_path), run_name="cub", verbose=0,
    )  # fmt: skip
    with tfds.testing.mock_data(num_examples=48):
        result = run_training(cfg)
    run_dir = Path(result["run_dir"])
    assert result["metrics"]["epochs"] == 2 and "best_checkpoint" in result["metrics"]
    assert (run_dir / "checkpoint.keras").is_file() and (run_dir / "best.keras").is_file()
    assert all("val_recall@1" in row for row in read_history(run_dir))
