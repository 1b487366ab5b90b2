"""scripts/verify_omniglot.py: thresholds are calibrated on validation characters, never on test ones."""

from __future__ import annotations

import json

import numpy as np
import pytest

from detreg_keras.data.omniglot_embedded import load_omniglot_split
from detreg_keras.training import TrainConfig, load_splits
from tests.conftest import load_script

verify = load_script("verify_omniglot")


def _alphabet(class_name: str) -> str:
    return class_name.split("/")[0]


def _omniglot_cfg(**fields) -> TrainConfig:
    return TrainConfig(preset="omniglot", dataset="omniglot", image_size=28, **fields)


def test_calibration_split_holds_no_test_alphabet_class():
    train_names = set(load_omniglot_split("train").class_names)  # read from the package data directly
    test_names = set(load_omniglot_split("test").class_names)
    cfg = _omniglot_cfg(val_classes=34, val_seed=0)
    cal, test = verify.calibration_splits(cfg)
    cal_names = {cal.class_names[c] for c in np.unique(cal.labels)}  # the classes of its images
    assert len(cal_names) == 34 and len(cal.labels) == 34 * 20
    assert cal_names <= train_names
    assert not cal_names & test_names
    assert not {_alphabet(n) for n in cal_names} & {_alphabet(n) for n in test_names}
    assert {test.class_names[c] for c in np.unique(test.labels)} == test_names
    # ... and the model never trained on them: the run's training split is the other 102.
    trained = set(load_splits(cfg)[0].train.class_names)
    assert not cal_names & trained and len(trained) == 136 - 34


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"val_classes": 0}, "val_classes=0"), ({"val_classes": 34, "evaluate_on": "val"}, "evaluate_on='val'")],
)
def test_calibration_splits_refuse_runs_without_validation_characters(fields, message):
    with pytest.raises(ValueError, match=message):
        verify.calibration_splits(_omniglot_cfg(**fields))


def _brute_force_pairs(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, genuine = [], []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            scores.append(float(x[i] @ x[j]) / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])))
            genuine.append(y[i] == y[j])
    return np.array(scores), np.array(genuine)


def test_threshold_comes_from_the_calibration_pairs_and_is_measured_on_the_test_pairs():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 8))
    y = np.repeat(np.arange(12), 5)
    x = centres[y] + 0.7 * rng.normal(size=(60, 8))
    cal, test = y < 6, y >= 6
    rows, thresholds = verify.calibrated_rows(x[cal], y[cal], x[test], y[test], [0.1])
    cal_s, cal_g = _brute_force_pairs(x[cal], y[cal])
    test_s, test_g = _brute_force_pairs(x[test], y[test])
    t = thresholds[0.1]
    # The smallest threshold with calibration FMR <= 0.1: one calibration score lower breaks it.
    assert np.mean(cal_s[~cal_g] >= t - 1e-6) <= 0.1
    assert np.mean(cal_s[~cal_g] >= np.max(cal_s[cal_s < t - 1e-6])) > 0.1
    assert rows["calibrated@0.1: test FMR"] == pytest.approx(np.mean(test_s[~test_g] >= t), abs=1e-6)
    assert rows["calibrated@0.1: test TAR"] == pytest.approx(np.mean(test_s[test_g] >= t), abs=1e-6)
    # Test data do not move the threshold.
    _, other = verify.calibrated_rows(x[cal], y[cal], -x[test], y[test], [0.1])
    assert other == thresholds


def test_main_exits_with_the_reason_for_a_run_without_validation_characters(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(_omniglot_cfg(val_classes=0).to_dict()))
    with pytest.raises(SystemExit) as exit_info:
        verify.main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "val_classes=0" in err and "--val-classes" in err and "--calibration test-halves" in err
