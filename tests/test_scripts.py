"""The command-line programs (detreg_keras.cli): train (main job, omniglot preset, resume after a kill),
evaluate, the Omniglot benchmark; the scripts/*.py wrappers and the [project.scripts] entry points."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from detreg_keras.cli import ablate as ablate_cli
from detreg_keras.cli import evaluate as evaluate_cli
from detreg_keras.cli import omniglot_benchmark as omniglot_benchmark_cli
from detreg_keras.cli import train as train_cli
from detreg_keras.evaluation import plot_recall_at_k
from detreg_keras.training import (
    build_model,
    evaluate_splits,
    load_splits,
    read_history,
    resolve_config,
)
from tests.conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_ROOT = (REPO_ROOT / ".." / "shared" / "data" / "omniglot").resolve()
TINY_FLAGS = ["--cnn-widths", "8", "16", "--embedding-dim", "8", "--num-couplings", "2", "--hidden-units", "8"]




#: scripts/NAME.py -> the cli module it wraps
WRAPPED = {"train": train_cli, "evaluate": evaluate_cli, "ablate": ablate_cli, "omniglot_benchmark": omniglot_benchmark_cli}


@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_scripts_are_thin_wrappers_of_the_cli_modules(name):
    """scripts/NAME.py runs detreg_keras.cli.NAME.main (the same function object, nothing of its own)."""
    script = load_script(name)
    assert script.main is WRAPPED[name].main
    source = (REPO_ROOT / "scripts" / f"{name}.py").read_text()
    assert len(source.splitlines()) < 25 and 'os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")' in source


def test_project_scripts_point_at_the_cli_mains():
    """Every [project.scripts] entry of pyproject.toml imports and is a cli module's main."""
    import importlib

    import tomllib

    entries = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    ours = {k: v for k, v in entries.items() if v.startswith("detreg_keras.cli.")}
    assert set(ours) == {"detreg-train", "detreg-evaluate", "detreg-ablate", "detreg-omniglot-benchmark"}
    for target in ours.values():
        module, _, attr = target.partition(":")
        assert getattr(importlib.import_module(module), attr) is WRAPPED[module.rsplit(".", 1)[1]].main


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO_ROOT)}


MAIN_JOB_TEST = "test_main_job_prints_the_baseline_table_and_no_tensorflow_log_line"


@pytest.fixture(scope="module", autouse=True)
def main_job(request, tmp_path_factory):
    """The README's main job (`python scripts/train.py`, 1 epoch and 2 couplings per head) in a fresh
    process, with the environment a user has (TF_CPP_MIN_LOG_LEVEL unset).

    Started before this module's other tests and checked by the last one: most
    of its time is single-threaded graph tracing, which overlaps well with the
    in-process tests on a 2-core machine. Not started when that test is deselected.
    """
    if not any(item.name == MAIN_JOB_TEST for item in request.session.items):
        yield None
        return
    out = tmp_path_factory.mktemp("main_job")
    with (out / "stdout.txt").open("w") as stdout, (out / "stderr.txt").open("w") as stderr:
        env = {k: v for k, v in _env().items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
        proc = subprocess.Popen(
            [sys.executable, "scripts/train.py", "--epochs", "1", "--num-couplings", "2", "--output-dir", str(out / "runs")],
            cwd=REPO_ROOT, env=env, stdout=stdout, stderr=stderr, text=True,
        )  # fmt: skip
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder as train.py leaves it (config.json, model.keras, metrics.json, PNG), untrained:
    evaluate.py evaluates whatever model it is given, and this skips the training's graph tracing."""
    cfg = resolve_config(
        "digits", cnn_widths=(8, 16), embedding_dim=8, num_couplings=2, hidden_units=8, verbose=0,
        output_dir=str(tmp_path_factory.mktemp("runs")), run_name="tiny",
    )  # fmt: skip
    run_dir = Path(cfg.output_dir) / cfg.run_name
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    model = build_model(cfg, num_classes=5)
    model.build((None, cfg.image_size, cfg.image_size, cfg.channels))
    model.save(run_dir / "model.keras")
    splits, _ = load_splits(cfg)
    metrics = evaluate_splits(model, splits, cfg)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    plot_recall_at_k({"model": metrics}, run_dir / "recall_at_k.png")
    return run_dir


def test_evaluate_writes_metrics_and_plot(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate_cli.main([str(tiny_run), "--output-dir", str(out), "--ks", "1", "2", "4", "8", "--verbose", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {f"recall@{k}" for k in (1, 2, 4, 8)} | {"map@r", "nmi", "r_precision", "precision@1"} <= set(metrics)
    assert metrics["dataset"] == "digits" and metrics["model"].endswith("model.keras")
    # the run's own test evaluation (training.evaluate_splits) and evaluate.py agree
    trained = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["recall@1"] == pytest.approx(trained["recall@1"])
    assert (out / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "R@8=" in capsys.readouterr().out


def _one_error_line(capsys, *fragments: str) -> str:
    """stderr is exactly one ``error: ...`` line (no traceback, no usage) containing every fragment."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_evaluate_never_overwrites_without_flag(tiny_run, tmp_path, capsys):
    # Next to the model (the default) there is already the run's metrics.json.
    before = {name: (tiny_run / name).read_bytes() for name in ("metrics.json", "recall_at_k.png")}
    assert evaluate_cli.main([str(tiny_run), "--verbose", "0"]) == 1
    _one_error_line(capsys, "--overwrite")
    assert {name: (tiny_run / name).read_bytes() for name in before} == before
    out = tmp_path / "eval"
    out.mkdir()
    (out / "recall_at_k.png").write_bytes(b"mine")
    assert evaluate_cli.main([str(tiny_run / "model.keras"), "--output-dir", str(out), "--verbose", "0"]) == 1
    _one_error_line(capsys, "already exist")
    assert (out / "recall_at_k.png").read_bytes() == b"mine" and not (out / "metrics.json").exists()
    assert evaluate_cli.main(
        [str(tiny_run / "model.keras"), "--output-dir", str(out), "--overwrite", "--ks", "1", "--verbose", "0"]
    ) == 0
    assert (out / "recall_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "metrics.json").read_text())["ks"] == [1]


def test_evaluate_a_bare_model_file_needs_a_dataset(tiny_run, tmp_path, capsys):
    model = tmp_path / "exported.keras"
    model.write_bytes((tiny_run / "model.keras").read_bytes())
    assert evaluate_cli.main([str(model), "--verbose", "0"]) == 1
    _one_error_line(capsys, "--dataset")
    assert evaluate_cli.main([str(model), "--dataset", "digits", "--verbose", "0"]) == 0
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "recall_at_k.png").is_file()


def _gray_class_folders(root: Path, classes: int = 4, per_class: int = 3, size: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(40 * c + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_evaluate_folder_with_only_a_test_dir(tiny_run, tmp_path, capsys):
    """The documented `evaluate.py model.keras --dataset folder --test-dir X` failed with "needs --train-dir"."""
    model = tmp_path / "exported.keras"
    model.write_bytes((tiny_run / "model.keras").read_bytes())
    test_dir = _gray_class_folders(tmp_path / "test_classes")
    out = tmp_path / "eval"
    argv = [str(model), "--dataset", "folder", "--test-dir", str(test_dir), "--output-dir", str(out),
            "--ks", "1", "2", "--verbose", "0"]  # fmt: skip
    assert evaluate_cli.main(argv) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "folder" and 0.0 <= metrics["recall@1"] <= metrics["recall@2"] <= 1.0


@pytest.mark.parametrize("case", ["missing test dir", "empty test dir", "truncated model", "zip without config"])
def test_evaluate_expected_failures_are_one_error_line(tiny_run, tmp_path, capsys, case):
    import zipfile

    model = tmp_path / "m.keras"
    data = (tiny_run / "model.keras").read_bytes()
    model.write_bytes(data)
    test_dir = tmp_path / "test_classes"
    expected = str(test_dir)
    if case == "empty test dir":
        (test_dir / "class0").mkdir(parents=True)
        expected = "No readable image"
    elif case == "truncated model":
        model.write_bytes(data[: len(data) * 6 // 10])  # keras itself said "File not found"
        expected, test_dir = "truncated", _gray_class_folders(test_dir)
    elif case == "zip without config":
        with zipfile.ZipFile(tiny_run / "model.keras") as src, zipfile.ZipFile(model, "w") as dst:
            for name in src.namelist():
                if name != "config.json":
                    dst.writestr(name, src.read(name))
        expected, test_dir = "no config.json", _gray_class_folders(test_dir)  # keras itself: KeyError
    argv = [str(model), "--dataset", "folder", "--test-dir", str(test_dir), "--output-dir", str(tmp_path / "o"),
            "--verbose", "0"]  # fmt: skip
    assert evaluate_cli.main(argv) == 1
    _one_error_line(capsys, expected)


def test_omniglot_preset_one_tiny_epoch(tmp_path, capsys):
    if not (OMNIGLOT_ROOT / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot archives not found in {OMNIGLOT_ROOT}")
    # The preset as is (data, m-per-class pipeline, backbone, recipe) on 8 train / 8 test
    # characters, without the flow heads, whose graph tracing is the slow part (the DReg
    # model is covered by the other tests and by scripts/omniglot_benchmark.py).
    argv = ["--preset", "omniglot", "--data-root", str(OMNIGLOT_ROOT), "--subset-classes", "8", "--epochs", "1",
            "--batch-size", "16", "--flow", "none", "--output-dir", str(tmp_path), "--run-name", "omni",
            "--verbose", "0"]  # fmt: skip
    assert train_cli.main(argv) == 0
    metrics = json.loads((tmp_path / "omni" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0.0 <= metrics["recall@1"] <= 1.0
    cfg = json.loads((tmp_path / "omni" / "config.json").read_text())
    assert cfg["preset"] == "omniglot" and cfg["dataset"] == "omniglot" and cfg["image_size"] == resolve_config("omniglot").image_size
    out = capsys.readouterr().out
    assert "omniglot: retrieval on the unseen alphabets" in out and "\nProxy Anchor    " in out
    assert f"{100 * metrics['recall@1']:6.2f}" in out


def test_omniglot_relative_data_root_resolves_from_the_repo_root(monkeypatch, tmp_path):
    if not (OMNIGLOT_ROOT / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot archives not found in {OMNIGLOT_ROOT}")
    from detreg_keras.training import load_splits

    monkeypatch.chdir(tmp_path)  # ../shared/data/omniglot does not exist from here
    splits, _ = load_splits(resolve_config("omniglot", data_root="../shared/data/omniglot", subset_classes=3))
    assert splits.train.num_classes == 3 and splits.test.num_classes == 3
    assert splits.train.paths[0].startswith(str(REPO_ROOT / ".." / "shared"))


def test_omniglot_benchmark_runs_on_the_embedded_data(tmp_path):
    argv = ["--seeds", "0", "--methods", "Proxy Anchor", "--output", str(tmp_path), "--set", "epochs=1",
            "--set", "subset_classes=6", "--set", "batch_size=24", "--set", "cnn_widths=[8]", "--set", "embedding_dim=8"]  # fmt: skip
    assert omniglot_benchmark_cli.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    config = results["configs"]["Proxy Anchor"]
    assert config["data_root"] is None and config["flow"] == "none" and config["subset_classes"] == 6
    run = json.loads((tmp_path / "runs" / "proxy_anchor-seed0" / "metrics.json").read_text())
    assert results["per_seed"]["Proxy Anchor"]["0"]["recall@1"] == run["recall@1"]
    assert "| **Proxy Anchor** (mean ± std) |" in (tmp_path / "RESULTS.md").read_text()


@pytest.mark.slow
def test_resume_after_the_process_is_killed(tmp_path):
    """A real `train.py` process killed with SIGKILL mid-run, then `--resume RUN_DIR`."""
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "scripts/train.py", "--preset", "digits", *TINY_FLAGS, "--epochs", "6", "--batch-size", "32",
           "--output-dir", str(tmp_path), "--run-name", "killed", "--verbose", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    meta = run_dir / "backup" / "training_metadata.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if meta.is_file() and json.loads(meta.read_text() or "{}").get("epoch", 0) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached epoch 2")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "metrics.json").exists()
    done = json.loads(meta.read_text())["epoch"]
    assert 2 <= done < 6

    resumed = subprocess.run(
        [sys.executable, "scripts/train.py", "--resume", str(run_dir), "--verbose", "2"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming {run_dir} after epoch {done}/6" in resumed.stdout
    assert resumed.stdout.count("Epoch ") == 6 - done  # only the missing epochs run
    assert [row["epoch"] for row in read_history(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 6
    assert not (run_dir / "backup").exists()

    # parity: the same command run without interruption reaches the same weights and metrics
    straight = subprocess.run(
        [*cmd[:-6], "--output-dir", str(tmp_path), "--run-name", "straight", "--verbose", "0"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    import keras

    from detreg_keras import load_model

    resumed_model, straight_model = (load_model(tmp_path / name / "model.keras") for name in ("killed", "straight"))
    for a, b in zip(resumed_model.get_weights(), straight_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert keras.ops.convert_to_numpy(resumed_model.optimizer.iterations) == keras.ops.convert_to_numpy(
        straight_model.optimizer.iterations
    )
    resumed_metrics = json.loads((run_dir / "metrics.json").read_text())
    straight_metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
        assert resumed_metrics[key] == pytest.approx(straight_metrics[key], abs=1e-6), key


#: a line of TensorFlow's C++ logger (absl format), or its pre-initialisation notice
TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|^WARNING: All log messages before absl", re.M)


def test_main_job_prints_the_baseline_table_and_no_tensorflow_log_line(main_job):
    """Last in this module: waits for the `main_job` process started at the module's first test."""
    proc, out = main_job
    returncode = proc.wait(timeout=600)
    stdout, stderr = (out / "stdout.txt").read_text(), (out / "stderr.txt").read_text()
    assert returncode == 0, stderr[-3000:]
    assert TF_LOG_LINE.search(stdout + stderr) is None, (stdout + stderr)[:3000]
    lines = stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("method")))
    assert lines[header - 1] == "omniglot: retrieval on the unseen alphabets, 1 epochs (%)"
    assert [line.split("  ")[0] for line in lines[header + 1 : header + 4]] == ["raw pixels", "untrained network", "DReg (realnvp)"]
    assert re.search(r"^43/43 - \d+s - .*loss: ", stdout, re.M)  # Keras' progress line (2,720 images, 43 batches of 64)
    (run_dir,) = (out / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and set(metrics["baselines"]) == {"raw pixels", "untrained network"}


def test_tensorflow_log_line_pattern_matches_real_lines():
    """The pattern above must match what TensorFlow prints, or the test above could not fail."""
    sample = ("I0000 00:00:1796194492.273208    5272 port.cc:153] oneDNN custom operations are on.\n"
              "E0000 00:00:1796194496.997650    5272 cuda_platform.cc:52] failed call to cuInit\n")  # fmt: skip
    assert len(TF_LOG_LINE.findall(sample)) == 2
    assert TF_LOG_LINE.search("43/43 - 4s - 88ms/step - loss: 11.6\nraw pixels   37.12") is None


def test_evaluate_embedding_map(tiny_run, tmp_path, capsys):
    """--embedding-map: projector files of the whole test split (digits 5-9) and the t-SNE PNG; never overwritten."""
    from detreg_keras.data import load_digits_split
    from tests.test_embedding_map import PNG_MAGIC, check_projector_folder

    out = tmp_path / "eval"
    argv = [str(tiny_run), "--output-dir", str(out), "--ks", "1", "--embedding-map", "--verbose", "0"]
    assert evaluate_cli.main(argv) == 0, capsys.readouterr().err
    _, (_, y_test) = load_digits_split()
    found = check_projector_folder(out / "projector", None, y_test)  # every test image, in order
    assert found["dim"] == 8 and found["side"] == 32  # embedding_dim of the tiny run; 32-px thumbnails
    assert found["sprite"] == (30 * 32, 30 * 32)  # 896 images on a 30 x 30 grid
    assert (out / "embedding_map.png").read_bytes()[:8] == PNG_MAGIC
    assert "embedding_map.png" in capsys.readouterr().out
    (out / "metrics.json").unlink()
    (out / "recall_at_k.png").unlink()
    assert evaluate_cli.main(argv) == 1  # projector/ and the PNG exist: --overwrite needed
    _one_error_line(capsys, "projector", "--overwrite")
