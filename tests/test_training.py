"""The training job: presets and flag overrides, the run folder, no-overwrite, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest

from detreg_keras.cli import train as train_cli
from detreg_keras.data import load_omniglot_split
from detreg_keras.data.registry import source_class_names
from detreg_keras.language import hashed_ngram_embeddings
from detreg_keras.training import (
    DATASETS,
    PRESETS,
    DataSplits,
    TrainConfig,
    build_model,
    evaluate_splits,
    format_table,
    load_run_config,
    load_splits,
    make_training_data,
    pixel_vectors,
    raw_pixel_metrics,
    read_history,
    resolve_config,
    run_training,
)
from tests.conftest import OMNIGLOT_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]



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


def test_omniglot_on_embedded_data_is_the_command_line_default():
    command = train_cli.parse_args([])
    assert command.cfg == resolve_config("omniglot") and command.resume is None
    assert command.baselines and not command.compare
    cfg = command.cfg
    assert cfg.preset == cfg.dataset == "omniglot" and cfg.data_root is None and cfg.data_dir is None
    assert (cfg.flow, cfg.num_couplings, cfg.hidden_units, cfg.dueling) == ("realnvp", 12, 128, True)
    assert (cfg.learning_rate, cfg.head_lr_multiplier, cfg.epochs, cfg.image_size) == (1e-3, 1.0, 15, 28)


def test_digits_preset_is_the_config_default():
    assert resolve_config("digits") == TrainConfig() == train_cli.parse_args(["--preset", "digits"]).cfg
    cfg = TrainConfig()
    assert (cfg.learning_rate, cfg.head_lr_multiplier, cfg.proxy_lr_multiplier) == (3e-4, 1.0, 10.0)
    assert (cfg.epochs, cfg.batch_size, cfg.embedding_dim, cfg.hidden_units, cfg.num_couplings) == (20, 64, 128, 128, 12)


def test_compare_and_baselines_flags():
    command = train_cli.parse_args(["--compare", "--no-baselines", "--seed", "3"])
    assert command.compare and not command.baselines and command.cfg.seed == 3
    with pytest.raises(SystemExit):  # nothing to compare Proxy Anchor with
        train_cli.parse_args(["--compare", "--flow", "none"])


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
    cfg = train_cli.parse_args(
        ["--preset", "cub200", "--batch-size", "60", "--backbone", "resnet50", "--no-dueling",
         "--ks", "1", "5", "--backbone-weights", "none", "--sampler", "m_per_class", "--dataset", "folder"]
    ).cfg  # fmt: skip
    assert (cfg.batch_size, cfg.backbone, cfg.dueling, cfg.ks) == (60, "resnet50", False, (1, 5))
    assert cfg.backbone_weights is None and cfg.sampler == "m_per_class" and cfg.dataset == "folder"
    # everything not given keeps the preset's value
    assert (cfg.embedding_dim, cfg.epochs, cfg.learning_rate, cfg.image_size) == (512, 30, 1e-4, 224)
    cfg = train_cli.parse_args(["--preset", "omniglot", "--flow", "none", "--image-size", "64"]).cfg
    assert cfg.flow == "none" and cfg.image_size == 64 and cfg.backbone == "small_cnn"


def test_resolve_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown preset"):
        resolve_config("imagenet")
    with pytest.raises(ValueError, match="Unknown TrainConfig fields"):
        resolve_config("digits", learning_rat=1.0)
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--preset", "imagenet"])


def test_resume_takes_the_saved_config(tmp_path):
    cfg = tiny(tmp_path, seed=7)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.to_dict()))
    loaded, resume, compare, _ = train_cli.parse_args(["--resume", str(tmp_path / "run"), "--verbose", "1"])
    assert not compare
    assert resume == str(tmp_path / "run")
    assert loaded == TrainConfig.from_dict({**cfg.to_dict(), "verbose": 1})
    with pytest.raises(SystemExit):  # other flags would silently change the run
        train_cli.parse_args(["--resume", str(tmp_path / "run"), "--epochs", "5"])
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--resume", str(tmp_path / "run"), "--compare"])


# ----------------------------------------------------------------------------- data of the presets


def test_omniglot_preset_reads_the_embedded_data():
    splits, validation = load_splits(resolve_config("omniglot"))
    assert validation is None
    assert (splits.train.num_classes, len(splits.train)) == (136, 2720)
    assert (splits.test.num_classes, len(splits.test)) == (106, 2120)
    assert {n.split("/")[0] for n in splits.test.class_names} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}


def test_omniglot_embedded_and_zip_records_are_the_same_images():
    """Same classes, labels, paths and pixels whichever source the preset reads."""
    if not (OMNIGLOT_DIR / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot archives not found in {OMNIGLOT_DIR}")
    from detreg_keras.data import decode_image

    embedded, _ = load_splits(resolve_config("omniglot"))
    zipped, _ = load_splits(resolve_config("omniglot", data_root=str(OMNIGLOT_DIR)))
    for a, b in ((embedded.train, zipped.train), (embedded.test, zipped.test)):
        assert a.class_names == b.class_names
        np.testing.assert_array_equal(a.labels, b.labels)
        for i in range(0, len(a), 97):
            np.testing.assert_array_equal(decode_image(a.data[i]).numpy(), decode_image(b.data[i]).numpy())


@pytest.mark.parametrize(
    ("preset", "paths", "message"),
    [
        ("digits", {"data_dir": "/data/omniglot"}, "digits dataset does not use --data-dir /data/omniglot"),
        ("digits", {"data_root": "x"}, "ship with the package"),
        ("omniglot", {"train_dir": "x"}, "does not use --train-dir"),
        ("cub200", {"data_root": "x"}, "reads --data-dir"),
        ("omniglot", {"data_root": "a", "data_dir": "b"}, "not both"),
    ],
)
def test_a_path_the_dataset_would_ignore_is_an_error(preset, paths, message):
    with pytest.raises(ValueError, match=message):
        load_splits(resolve_config(preset, **paths))


def test_the_command_line_refuses_an_ignored_path(capsys):
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--preset", "digits", "--data-dir", "/data/omniglot"])
    assert "digits dataset does not use --data-dir /data/omniglot" in capsys.readouterr().err


def test_omniglot_data_dir_reads_the_full_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_background.zip"):
        load_splits(resolve_config("omniglot", data_dir=str(tmp_path)))


# ----------------------------------------------------------------------------- baselines and table


def _brute_force_recall_and_map(x: np.ndarray, y: np.ndarray, ks) -> dict[str, float]:
    """Recall@k and MAP@R of all-vs-all cosine retrieval, by definition, with dense numpy."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = y[order] == y[:, None]
    out = {f"recall@{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}
    r = (y[:, None] == y[None, :]).sum(axis=1) - 1
    ap = [np.sum(h[:n] * np.cumsum(h[:n]) / np.arange(1, n + 1)) / n for h, n in zip(hits, r, strict=True)]
    out["map@r"] = float(np.mean(ap))
    return out


def test_raw_pixel_row_equals_a_brute_force_computation():
    cfg = resolve_config("omniglot", metrics=("recall", "map_at_r"))
    splits, _ = load_splits(cfg)
    metrics = raw_pixel_metrics(splits, cfg)
    # independent pixels: the 105x105 arrays resized by PIL (not the tf.data pipeline), mean-centred
    from PIL import Image

    data = load_omniglot_split("test")
    small = np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((28, 28), Image.BILINEAR), np.float32)
                      for im in data.images])  # fmt: skip
    x = small.reshape(len(small), -1)
    expected = _brute_force_recall_and_map(x - x.mean(axis=0), data.labels, cfg.ks)
    # PIL's and TensorFlow's antialiased bilinear kernels differ slightly: a few queries may change
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=0.01), key
    # the exact pipeline pixels: the same numbers to float precision
    pixels, labels = pixel_vectors(splits.test, cfg)
    exact = _brute_force_recall_and_map(pixels - pixels.mean(axis=0), labels, cfg.ks)
    for key, value in exact.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert 0.30 < metrics["recall@1"] < 0.45  # far below a trained embedding (~0.8)


def test_raw_pixel_row_is_invariant_to_inverting_the_images():
    cfg = resolve_config("digits", metrics=("recall",))
    splits, _ = load_splits(cfg)
    (x, y) = splits.test
    inverted = DataSplits(splits.train, (255.0 - x, y))
    a, b = raw_pixel_metrics(splits, cfg), raw_pixel_metrics(inverted, cfg)
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
    assert raw_pixel_metrics(splits, resolve_config("cub200")) is None  # 224x224x3: no raw-pixel row


def test_format_table():
    rows = {"raw pixels": {"recall@1": 0.3712, "recall@2": 0.5, "map@r": 0.0701},
            "DReg (realnvp)": {"recall@1": 0.81, "recall@2": 0.885, "map@r": 0.4684, "nmi": 0.8364}}  # fmt: skip
    assert format_table(rows, (1, 2)).splitlines() == [
        "method             R@1     R@2   MAP@R     NMI",
        "raw pixels       37.12   50.00    7.01       -",
        "DReg (realnvp)   81.00   88.50   46.84   83.64",
    ]


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


def test_unreadable_images_dropped_by_the_pipelines_are_reported(tmp_path, capsys):
    """A JPEG cut off at 60% passes the folder listing but not the decoder: training and test say so."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(4):  # classes 0-1 train, 2-3 test (the DML half split)
        (root / f"class{c}").mkdir(parents=True)
        for i in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
            if i == 0:  # one truncated file per class
                data = data[: int(len(data) * 0.6)]
            (root / f"class{c}" / f"{i}.jpg").write_bytes(data)
    cfg = tiny(tmp_path, dataset="folder", train_dir=str(root), epochs=2, batch_size=4, run_name="drops",
               eval_mode="resize", flow="none", ks=(1,), sampler="random")  # fmt: skip
    result = run_training(cfg)
    err = capsys.readouterr().err
    # 2 truncated of 12 training images, over 2 epochs; 2 of 12 test images
    assert "warning: training images (all epochs): 20 of 24 images decoded, 4 dropped" in err, err
    assert "warning: test images: 10 of 12 images decoded, 2 dropped" in err, err
    assert 0.0 <= result["metrics"]["recall@1"] <= 1.0


def test_report_dropped_is_silent_without_drops(capsys):
    from detreg_keras.data import DecodeStats
    from detreg_keras.training import report_dropped

    assert report_dropped(DecodeStats(), "test images") == 0
    assert capsys.readouterr().err == ""


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


def test_baselines_are_the_untrained_model_and_the_pixels(tmp_path, monkeypatch):
    from detreg_keras.training import runner

    plotted: dict = {}
    real_plot = runner.plot_recall_at_k

    def spy(curves, path, **kwargs):
        plotted.update(curves)
        return real_plot(curves, path, **kwargs)

    monkeypatch.setattr(runner, "plot_recall_at_k", spy)
    cfg = tiny(tmp_path, epochs=1, num_couplings=1, dueling=False, seed=5, run_name="b")
    reference = {"recall@1": 0.5, "recall@2": 0.6, "recall@4": 0.7, "recall@8": 0.8}
    result = run_training(cfg, baselines=True, references={"Proxy Anchor": reference})
    rows = result["metrics"]["baselines"]
    assert list(rows) == ["raw pixels", "untrained network"]
    assert json.loads((Path(result["run_dir"]) / "baselines.json").read_text()) == rows
    assert list(plotted) == ["raw pixels", "untrained network", "Proxy Anchor", "DReg (realnvp)"]
    # an independent rebuild of the seed-5 model, never trained, scores the "untrained network" row
    keras.utils.set_random_seed(cfg.seed)
    splits, _ = load_splits(cfg)
    model = build_model(cfg, num_classes=5)
    model.build((None, cfg.image_size, cfg.image_size, cfg.channels))
    untrained = evaluate_splits(model, splits, cfg, verbose=0)
    for key, value in untrained.items():
        assert rows["untrained network"][key] == pytest.approx(value, abs=1e-6), key
    assert rows["raw pixels"] == pytest.approx(raw_pixel_metrics(splits, cfg))
    assert result["metrics"]["recall@1"] != pytest.approx(untrained["recall@1"], abs=1e-9)  # training changed it


def test_main_job_prints_the_baseline_table_with_compare(tmp_path, capsys):
    """`scripts/train.py --compare` (default preset, embedded Omniglot) at a tiny budget."""
    argv = ["--compare", "--subset-classes", "8", "--epochs", "1", "--batch-size", "16", "--cnn-widths", "8", "16",
            "--embedding-dim", "8", "--num-couplings", "1", "--hidden-units", "8", "--output-dir", str(tmp_path),
            "--run-name", "main", "--verbose", "0"]  # fmt: skip
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert "retrieval on the unseen alphabets, 1 epochs" in lines[header - 1]
    assert lines[header].split() == ["method", "R@1", "R@2", "R@4", "R@8", "MAP@R", "NMI"]
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[header + 1 : header + 5]]
    names = [row[0] for row in cells]
    assert names == ["raw pixels", "untrained network", "Proxy Anchor", "DReg (realnvp)"]
    dreg = json.loads((tmp_path / "main" / "metrics.json").read_text())
    pa = json.loads((tmp_path / "main-proxy-anchor" / "metrics.json").read_text())
    assert json.loads((tmp_path / "main-proxy-anchor" / "config.json").read_text())["flow"] == "none"
    for row, metrics in ((cells[2], pa), (cells[3], dreg), (cells[0], dreg["baselines"]["raw pixels"])):
        assert [float(v) for v in row[1:]] == pytest.approx(
            [100 * metrics[k] for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi")], abs=0.006
        )
    assert (tmp_path / "main" / "recall_at_k.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- head stability options (issue 13)


def test_head_stability_fields_reach_the_model_and_the_optimizer(tmp_path):
    from detreg_keras.training import make_run_optimizer

    cfg = tiny(tmp_path, shift_bound=1.5, head_input_norm="l2", log_scale_bound=0.5, coupling_reduction="mean",
               clipvalue=10.0)
    model = build_model(cfg, num_classes=5)
    assert model.head_input_norm == "l2" and model.shift_bound == 1.5 and model.log_scale_bound == 0.5
    assert model.flow_min.shift_bound == 1.5 and model.flow_min.log_scale_bound == 0.5
    assert model.reg_min.coupling_reduction == "mean"
    assert make_run_optimizer(cfg, steps_per_epoch=4).clipvalue == 10.0
    warm = make_run_optimizer(tiny(tmp_path, head_warmup_epochs=1.5), steps_per_epoch=4)
    assert warm.ramp_for_path("dreg_flow_max/coupling_0/net/out/kernel") == 6
    defaults = build_model(tiny(tmp_path), num_classes=5)
    assert (defaults.head_input_norm, defaults.shift_bound, defaults.log_scale_bound) == ("l2", 0.1, 0.1)  # issue 13
    assert make_run_optimizer(tiny(tmp_path), steps_per_epoch=4).clipvalue is None
    # an old run's config.json (written before these fields) still loads
    old = {k: v for k, v in cfg.to_dict().items()
           if k not in ("shift_bound", "head_input_norm", "log_scale_bound", "coupling_reduction", "clipvalue",
                        "head_warmup_epochs")}
    legacy = TrainConfig.from_dict(old)  # ... with the behaviour it was trained with, not today's defaults
    assert (legacy.shift_bound, legacy.head_input_norm, legacy.head_warmup_epochs) == (None, "none", 0.0)


def test_head_stability_flags():
    cfg = train_cli.parse_args(["--shift-bound", "1", "--head-input-norm", "l2", "--log-scale-bound", "0.5",
                                   "--coupling-reduction", "mean", "--clipvalue", "10",
                                   "--head-warmup-epochs", "1"]).cfg
    assert (cfg.shift_bound, cfg.head_input_norm, cfg.log_scale_bound) == (1.0, "l2", 0.5)
    assert (cfg.coupling_reduction, cfg.clipvalue, cfg.head_warmup_epochs) == ("mean", 10.0, 1.0)
    cfg = train_cli.parse_args(["--shift-bound", "none", "--clipvalue", "none"]).cfg
    assert cfg.shift_bound is None and cfg.clipvalue is None


def test_embedding_map_is_opt_in():
    assert not TrainConfig().embedding_map and not resolve_config("omniglot").embedding_map  # off by default
    assert not train_cli.parse_args([]).cfg.embedding_map and train_cli.parse_args(["--embedding-map"]).cfg.embedding_map


@pytest.mark.slow
def test_embedding_map_flag_writes_the_maps_into_the_run_folder(tmp_path):
    """`train --embedding-map`: the run folder gets projector/ (every test image) and embedding_map.png
    (27 s at load 6-10 on 2 cores: a 1-epoch run and t-SNE)."""
    from tests.test_embedding_map import PNG_MAGIC, check_projector_folder

    argv = ["--preset", "digits", "--subset-classes", "2", "--epochs", "1", "--cnn-widths", "8", "--embedding-dim", "8",
            "--num-couplings", "1", "--hidden-units", "8", "--no-baselines", "--embedding-map", "--output-dir",
            str(tmp_path), "--run-name", "map", "--verbose", "0"]  # fmt: skip
    assert train_cli.main(argv) == 0
    run_dir = tmp_path / "map"
    splits, _ = load_splits(load_run_config(run_dir))
    found = check_projector_folder(run_dir / "projector", None, splits.test[1])
    assert found["dim"] == 8
    assert (run_dir / "embedding_map.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((run_dir / "metrics.json").read_text())["embedding_map_seconds"] > 0


def test_loss_config_reaches_the_model(tmp_path):
    """`--loss xbm --loss-config JSON` -> TrainConfig.loss_config -> DRegModel's XBM wrapper arguments."""
    cfg = train_cli.parse_args(["--preset", "digits", "--loss", "xbm",
                                "--loss-config", '{"loss": "contrastive", "memory_size": 256}']).cfg
    assert cfg.loss_config == {"loss": "contrastive", "memory_size": 256}
    model = build_model(tiny(tmp_path, loss=cfg.loss, loss_config=cfg.loss_config), num_classes=5)
    assert model.loss_config == {"loss": "contrastive", "memory_size": 256}
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).loss_config == cfg.loss_config
    with pytest.raises(SystemExit):
        train_cli.parse_args(["--loss-config", "[1, 2]"])


def test_language_guidance_gets_the_training_class_names(tmp_path):
    """loss="language_guidance": the runner hands the split's class names to the loss, in label order."""
    records = load_omniglot_split("train").to_records().select_classes([5, 2, 9])
    cfg = tiny(tmp_path, loss="language_guidance", loss_config={"loss": "proxy_anchor", "weight": 2.0})
    model = build_model(cfg, num_classes=3, class_names=source_class_names(records))
    assert model.loss_min.class_names == records.class_names
    np.testing.assert_allclose(model.loss_min.table @ model.loss_min.table.T, _cosines(records.class_names), atol=1e-6)
    assert model.loss_min.has_proxies and model.loss_min.weight == 2.0
    with pytest.raises(ValueError, match="dataset 'digits' gives none; pass them as loss_config"):
        run_training(cfg)  # the digits arrays name no classes


def test_language_guidance_trains_on_digits_with_given_embeddings(tmp_path):
    table = np.random.default_rng(0).normal(size=(5, 4)).tolist()
    config = {"loss": "multi_similarity", "class_embeddings": table}
    cfg = tiny(tmp_path, epochs=1, loss="language_guidance", loss_config=config)
    result = run_training(cfg)
    assert np.isfinite(result["metrics"]["recall@1"])
    rows = read_history(result["run_dir"])
    assert np.isfinite(rows[-1]["loss"])


def _cosines(names):
    table = hashed_ngram_embeddings(names)
    return table @ table.T
