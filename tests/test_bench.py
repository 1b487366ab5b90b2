"""Smoke tests of the benchmark scripts in bench/: they run end to end at tiny sizes and
report well-formed results (the timings themselves are not checked)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The smallest model the train-step bench accepts: it keeps the traces short.
TINY_TRAIN_STEP = [
    "--settings", "small_cnn", "--batch-size", "8", "--image-size", "16", "--cnn-widths", "8", "16",
    "--embedding-dim", "8", "--hidden-units", "8", "--num-couplings", "1", "--reps", "2", "--steps", "1",
    "--warmup", "1", "--matmul-size", "64",
]  # fmt: skip


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench_train_step = _load_bench("bench_train_step")
bench_tfdata = _load_bench("bench_tfdata")
bench_eval = _load_bench("bench_eval")
bench_index = _load_bench("bench_index")


def _positive_finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


# ----------------------------------------------------------------------------- train step


def test_count_flops_of_a_known_graph():
    import tensorflow as tf

    graph = tf.function(lambda a, b: tf.linalg.matmul(a, b)).get_concrete_function(
        tf.TensorSpec([16, 32]), tf.TensorSpec([32, 8])
    ).graph
    flops = bench_train_step.count_flops(graph)
    assert flops["MatMul"] == 2 * 16 * 32 * 8
    assert flops["total"] == flops["MatMul"]


def _check_train_step_results(data: dict, flops: bool) -> dict:
    assert set(data) == {"results", "env"}
    (row,) = data["results"]
    assert row["setting"] == "small_cnn" and row["batch_size"] == 8 and row["image_size"] == 16 and row["reps"] == 2
    for key in ("ratio_of_medians", "paired_ratio_median", "cpu_ratio_of_medians", "cpu_paired_ratio_median"):
        assert _positive_finite(row[key]), key
    assert len(row["paired_ratios"]) == 2
    assert row["target_ratio"] == 1.15 and isinstance(row["meets_target"], bool)
    for contender in ("dreg", "plain"):
        assert _positive_finite(row["median_step_ms"][contender])
        assert len(row["step_ms"][contender]) == 2
        info = row["contenders"][contender]
        assert math.isfinite(info["loss_after_warmup"])
    # The DReg model has the flow heads (and a second proxy set) on top of the same backbone.
    assert row["contenders"]["dreg"]["params"] > row["contenders"]["plain"]["params"]
    assert row["config"]["num_couplings"] == 1 and row["config"]["embedding_dim"] == 8
    for probe in ("matmul_tf", "matmul_numpy"):
        assert _positive_finite(row["matmul_peak_gflops"][probe]["median"])
    assert ("flop_efficiency" in row) == flops
    assert data["env"]["cpu_count"] >= 1 and len(data["env"]["load_avg_end"]) == 3
    _check_cpu_recorded(data["env"])
    return row


def _check_cpu_recorded(env: dict) -> None:
    """Every bench names the CPU its figures came from (model, family, vector-ISA flags)."""
    from detreg_keras.cpu import cpu_info

    assert env["cpu"] == cpu_info()
    assert isinstance(env["cpu"]["flags"], list) and env["cpu"]["logical_cpus"] >= 1


def test_train_step_bench_smoke(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    assert bench_train_step.main([*TINY_TRAIN_STEP, "--no-flops", "--json", str(out)]) == 0
    _check_train_step_results(json.loads(out.read_text()), flops=False)
    printed = capsys.readouterr().out
    assert "| small_cnn@16 | 8 | dreg |" in printed and "median of paired ratios" in printed


@pytest.mark.slow
def test_train_step_bench_with_flops(tmp_path):
    out = tmp_path / "train_step.json"
    assert bench_train_step.main([*TINY_TRAIN_STEP, "--nominal-peak", "100", "--json", str(out)]) == 0
    row = _check_train_step_results(json.loads(out.read_text()), flops=True)
    eff = row["flop_efficiency"]
    for contender in ("dreg", "plain"):
        flops = row["contenders"][contender]["flops"]
        # forward + input gradients + weight gradients: about 3x the forward FLOPs
        assert 2.0 < flops["train_over_forward"] < 4.0
        assert flops["by_op"]["Conv2D"] > 0 and flops["by_op"]["Conv2DBackpropFilter"] > 0
        assert _positive_finite(eff[contender]["achieved_gflops"])
        assert eff[contender]["pct_of_nominal_peak"] == pytest.approx(eff[contender]["achieved_gflops"])  # of 100
        assert _positive_finite(eff[contender]["pct_of_matmul_tf_median"])
    assert eff["flop_ratio_dreg_over_plain"] > 1.0


def test_train_step_bench_rejects_batches_without_class_pairs():
    args = bench_train_step.parse_args(["--batch-size", "6"])
    with pytest.raises(ValueError, match="multiple of 4"):
        bench_train_step.setting_config("small_cnn", args)


def test_train_step_settings_follow_the_issue():
    args = bench_train_step.parse_args([])
    resnet = bench_train_step.setting_config("resnet50", args)
    assert resnet["overrides"]["backbone"] == "resnet50" and resnet["overrides"]["backbone_weights"] is None
    assert resnet["overrides"]["image_size"] == 224 and resnet["overrides"]["embedding_dim"] == 512
    assert resnet["target"] == 1.03 and resnet["analytic_forward_gflop"] == pytest.approx(7.6)
    small = bench_train_step.setting_config("small_cnn", args)
    assert small["overrides"]["image_size"] == 64 and small["target"] == 1.15


# ----------------------------------------------------------------------------- tf.data


def test_synthetic_jpegs_are_cub_like():
    import tensorflow as tf
    from PIL import Image

    rng = np.random.default_rng(0)
    for width, height in ((500, 375), (333, 500)):
        data = bench_tfdata.synthetic_jpeg(rng, width, height, quality=90)
        assert 15_000 < len(data) < 90_000  # CUB's JPEGs: ~30-60 KB
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG" and img.size == (width, height)
        assert tuple(tf.io.decode_jpeg(data).shape) == (height, width, 3)


def test_tfdata_bench_smoke(tmp_path, capsys):
    level = logging.getLogger("detreg_keras.data.pipeline").level
    out = tmp_path / "tfdata.json"
    argv = [
        "--num-images", "16", "--classes", "4", "--batch-size", "4", "--batches", "1", "--warmup-batches", "1",
        "--reps", "1", "--threads", "1", "--image-dir", str(tmp_path / "jpegs"), "--json", str(out),
    ]  # fmt: skip
    assert bench_tfdata.main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"results", "env", "target_per_core"} and data["target_per_core"] == 450.0
    rows = {r["contender"]: r for r in data["results"]}
    assert set(rows) == set(bench_tfdata.CONTENDERS)
    for row in rows.values():
        assert row["threads"] == "1" and row["cores"] == 1
        for key in ("img_per_s", "img_per_s_per_core", "img_per_cpu_s", "vs_library_paired_median"):
            assert _positive_finite(row[key]), key
        assert isinstance(row["meets_target"], bool)
    assert rows["library"]["vs_library_paired_median"] == 1.0
    # The previous from_generator source yields exactly the library's batches; the downscale-only
    # antialiasing computes the library's augmentation up to rounding; dropping antialiasing does not.
    assert rows["old_from_generator"]["max_abs_diff_vs_library"] == 0.0
    assert rows["alt_aa_downscale_only"]["max_abs_diff_vs_library"] < 1e-2
    assert rows["alt_no_antialias"]["max_abs_diff_vs_library"] > 1e-2
    assert data["env"]["data"]["written"] == 16 and 15 < data["env"]["data"]["kb_mean"] < 90
    _check_cpu_recorded(data["env"])
    assert len(list((tmp_path / "jpegs").glob("*/*.jpg"))) == 16
    printed = capsys.readouterr().out
    assert "| 1 | library |" in printed and "img/s per core" in printed
    assert logging.getLogger("detreg_keras.data.pipeline").level == level  # restored


# ----------------------------------------------------------------------------- eval / index


def test_eval_bench_smoke_names_the_cpu_and_needs_no_nominal_peak(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = ["--n", "3000", "--dim", "32", "--ks", "1", "4", "--peak-size", "256", "--peak-reps", "1",
            "--warmup-s", "0", "--json", str(out)]  # fmt: skip
    assert bench_eval.main(argv) == 0
    data = json.loads(out.read_text())
    _check_cpu_recorded(data["env"])
    assert data["args"]["nominal_gflops"] is None
    assert all(r["pct_nominal_peak"] is None and _positive_finite(r["pct_measured_peak"]) for r in data["rows"])
    printed = capsys.readouterr().out
    assert "cpu: " in printed and "nominal" not in printed.split("| phase |", 1)[1].splitlines()[0]
    # with a nominal peak given, its share is reported against it
    assert bench_eval.main([*argv[:-2], "--nominal-gflops", "50", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert all(r["pct_nominal_peak"] == pytest.approx(2 * r["gflops"]) for r in rows)


def test_index_bench_smoke_names_the_cpu(tmp_path):
    out = tmp_path / "index.json"
    argv = ["--n", "2000", "--dim", "16", "--clusters", "20", "--queries", "50", "--nprobes", "4",
            "--ef-searches", "32", "--json", str(out)]  # fmt: skip
    assert bench_index.main(argv) == 0
    _check_cpu_recorded(json.loads(out.read_text())["env"])
