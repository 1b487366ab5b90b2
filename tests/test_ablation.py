"""Ablation runner: study grids, resume without redoing finished cells, tables and plot."""

from __future__ import annotations

import json

import pytest

from detreg_keras import ablation, training
from detreg_keras.ablation import AblationConfig, run_ablation, study_cells


def test_studies_cover_the_paper_and_the_plan():
    assert [c for c, _ in study_cells("flow-type")] == ["realnvp", "nice"]
    lambdas = dict(study_cells("lambda"))
    for lam in (0.01, 0.05, 0.1, 0.2, 0.5):
        assert lambdas[f"lambda={lam:g}"] == {"lambda_min": lam, "lambda_max": lam}
    assert any(v["lambda_min"] != v["lambda_max"] for v in lambdas.values())
    epsilons = dict(study_cells("epsilon"))
    assert len(epsilons) == 8 and epsilons["no-augmentation"] == {"epsilon": 0.0}
    assert dict(study_cells("dueling"))["single-head-min-only"] == {"dueling": False}
    regularization = dict(study_cells("regularization"))
    assert regularization["two-flows-lambda=0"] == {"lambda_min": 0.0, "lambda_max": 0.0}
    assert regularization["proxy-anchor-no-flows"] == {"flow": "none"}
    assert {v["regularizer_form"] for v in dict(study_cells("regularizer-form")).values()} == {"log1p", "logdet"}
    losses = dict(study_cells("losses"))
    assert losses["proxy_anchor"] == {"loss": "proxy_anchor", "flow": "none"}
    assert losses["triplet+dreg"] == {"loss": "triplet"}
    with pytest.raises(ValueError, match="Unknown study"):
        study_cells("dropout")


def test_grid_resumes_without_redoing_finished_cells(tmp_path, monkeypatch):
    calls = []

    def fake_run_training(cfg, resume=None):
        calls.append((cfg.run_name, cfg.dueling, cfg.seed, cfg.epochs))
        run_dir = tmp_path / "out" / "unused"
        metrics = {"recall@1": 0.5 + 0.1 * cfg.seed + (0.05 if cfg.dueling else 0.0), "map@r": 0.2, "train_seconds": 1.0}
        # what run_training leaves behind: the run folder with metrics.json
        real_dir = tmp_path / "grid" / "dueling" / ("dueling" if cfg.dueling else "single-head-min-only") / cfg.run_name
        real_dir.mkdir(parents=True, exist_ok=True)
        (real_dir / "metrics.json").write_text(json.dumps(metrics))
        return {"run_dir": str(run_dir), "metrics": metrics, "history": {}}

    monkeypatch.setattr(training, "run_training", fake_run_training)
    cfg = AblationConfig(preset="digits", studies=["dueling"], seeds=[0], overrides={"epochs": 2}, output_dir=str(tmp_path / "grid"))
    run_ablation(cfg, log=lambda *_: None)
    assert sorted(calls) == [("seed-0", False, 0, 2), ("seed-0", True, 0, 2)]
    calls.clear()
    cfg.seeds = [0, 1]
    result = run_ablation(cfg, log=lambda *_: None)
    assert sorted(calls) == [("seed-1", False, 1, 2), ("seed-1", True, 1, 2)]  # seed 0 read back
    rows = {r["cell"]: r for r in result["rows"]}
    assert rows["dueling"]["n_seeds"] == 2
    assert rows["dueling"]["recall@1_mean"] == pytest.approx(0.60)
    assert rows["dueling"]["recall@1_std"] == pytest.approx(0.0707107, rel=1e-4)  # sample std of 0.55, 0.65
    table = (tmp_path / "grid" / "results.md").read_text()
    assert "| dueling | 2 | 60.00 ± 7.07" in table
    assert (tmp_path / "grid" / "results.csv").exists()
    assert (tmp_path / "grid" / "recall_at_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_cell_is_resumed(tmp_path, monkeypatch):
    seen = {}

    def fake_run_training(cfg, resume=None):
        seen["resume"] = resume
        return {"run_dir": str(resume), "metrics": {"recall@1": 0.7}, "history": {}}

    run_dir = tmp_path / "grid" / "flow-type" / "nice" / "seed-0"
    run_dir.mkdir(parents=True)
    monkeypatch.setattr(training, "run_training", fake_run_training)
    monkeypatch.setattr(training, "load_run_config", lambda d: training.resolve_config("digits"))
    (run_dir / "config.json").write_text("{}")
    metrics = ablation.run_cell(AblationConfig(output_dir=str(tmp_path / "grid")), "flow-type", "nice", {"flow": "nice"}, 0)
    assert seen["resume"] == run_dir and metrics["recall@1"] == 0.7


def test_real_tiny_grid_on_digits(tmp_path):
    cfg = AblationConfig(
        preset="digits",
        studies=["regularizer-form"],
        seeds=[0],
        overrides={"epochs": 1, "num_couplings": 2, "hidden_units": 16, "embedding_dim": 16, "verbose": 0},
        output_dir=str(tmp_path / "grid"),
        ks=(1, 10),
    )
    result = run_ablation(cfg, log=lambda *_: None)
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        assert 0.0 < row["recall@1_mean"] <= 1.0
        assert row["recall@10_mean"] >= row["recall@1_mean"]
    saved = json.loads((tmp_path / "grid" / "regularizer-form" / "logdet-eq6" / "seed-0" / "config.json").read_text())
    assert saved["regularizer_form"] == "logdet" and saved["epochs"] == 1


def _fake_trainer(tmp_path, calls):
    """A stand-in for run_training that records what it trains and leaves metrics.json behind."""

    def fake_run_training(cfg, resume=None):
        calls.append((cfg.output_dir, cfg.seed))
        metrics = {"recall@1": 0.5 + 0.01 * cfg.seed + cfg.lambda_min, "train_seconds": 1.0}
        run_dir = tmp_path / cfg.output_dir / cfg.run_name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return {"run_dir": str(run_dir), "metrics": metrics, "history": {}}

    return fake_run_training


def test_cells_with_the_same_config_are_trained_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "run_training", _fake_trainer(tmp_path, calls))
    cfg = AblationConfig(preset="digits", studies=["dueling", "regularization", "lambda"], seeds=[0, 1],
                         output_dir=str(tmp_path / "grid"))
    jobs = ablation.plan_jobs(cfg)
    shared = {(j["study"], j["cell"]): j["same_as"] for j in jobs if j["same_as"]}
    # the default DReg run appears in all three studies
    assert shared == {("regularization", "dreg"): ("dueling", "dueling"), ("lambda", "lambda=0.05"): ("dueling", "dueling")}
    result = run_ablation(cfg, log=lambda *_: None)
    trained_dirs = [d for d, _ in calls]
    assert len(calls) == len(jobs) - 4 == len(set(calls))  # 2 shared cells x 2 seeds not retrained
    assert not any(d.endswith("dreg") or d.endswith("lambda=0.05") for d in trained_dirs)
    rows = {(r["study"], r["cell"]): r for r in result["rows"]}
    for key in (("regularization", "dreg"), ("lambda", "lambda=0.05"), ("dueling", "dueling")):
        assert rows[key]["n_seeds"] == 2 and rows[key]["recall@1_mean"] == pytest.approx(0.555)


def test_shards_split_the_distinct_runs_and_a_plain_run_assembles_them(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "run_training", _fake_trainer(tmp_path, calls))
    cfg = AblationConfig(preset="digits", studies=["dueling", "regularization"], seeds=[0, 1, 2],
                         output_dir=str(tmp_path / "grid"))
    per_shard = []
    for shard in ("0/2", "1/2"):
        before = len(calls)
        out = run_ablation(cfg, log=lambda *_: None, shard=shard)
        per_shard.append(set(calls[before:]))
        assert len(out["trained"]) == len(per_shard[-1])
    assert not per_shard[0] & per_shard[1]
    assert len(per_shard[0] | per_shard[1]) == 4 * 3  # dueling, single head, lambda=0, no flows
    assert not (tmp_path / "grid" / "results.md").exists()  # shards write no tables
    calls.clear()
    result = run_ablation(cfg, log=lambda *_: None)
    assert calls == [] and len(result["rows"]) == 5  # everything read back
    for bad in ("2/2", "x/2", "1"):
        with pytest.raises(ValueError, match="shard"):
            run_ablation(cfg, log=lambda *_: None, shard=bad)


def test_cell_seeds_restrict_secondary_cells(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "run_training", _fake_trainer(tmp_path, calls))
    cfg = AblationConfig(preset="digits", studies=["lambda"], seeds=[0, 1, 2], output_dir=str(tmp_path / "grid"),
                         cell_seeds={"lambda1=0.05,lambda2=0.01": [0]})
    rows = {r["cell"]: r for r in run_ablation(cfg, log=lambda *_: None)["rows"]}
    assert rows["lambda1=0.05,lambda2=0.01"]["n_seeds"] == 1 and rows["lambda=0.5"]["n_seeds"] == 3
    assert len(calls) == 8 * 3 + 1
    cfg.cell_seeds = {"lambda=7": [0]}
    with pytest.raises(ValueError, match="lambda=7"):
        ablation.plan_jobs(cfg)
