"""kpn_jax.metrics against scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from kpn_jax import grades as grades_lib
from kpn_jax import metrics


def sklearn_kappa(y_true, y_pred, num_classes) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return skm.cohen_kappa_score(y_true, y_pred, weights="quadratic",
                                     labels=np.arange(num_classes))


def sklearn_balanced_accuracy(y_true, y_pred) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        return skm.balanced_accuracy_score(y_true, y_pred)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_classes", [4, 5])
def test_scores_match_sklearn_on_random_labels(seed, num_classes):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, 60)
    # Predictions correlated with the truth, so kappa is far from 0.
    y_pred = np.clip(y_true + rng.integers(-1, 2, 60) * (rng.uniform(size=60) < 0.4),
                     0, num_classes - 1)
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert metrics.rmse(y_true, y_pred) == pytest.approx(
        math.sqrt(skm.mean_squared_error(y_true, y_pred)), rel=1e-12)
    assert metrics.quadratic_kappa(y_true, y_pred, num_classes) == pytest.approx(
        sklearn_kappa(y_true, y_pred, num_classes), rel=1e-12)
    assert metrics.balanced_accuracy(y_true, y_pred, num_classes) == pytest.approx(
        sklearn_balanced_accuracy(y_true, y_pred), rel=1e-12)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(y_true, y_pred, num_classes),
        skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes)))
    # Uncorrelated predictions too.
    y_rand = rng.integers(0, num_classes, 60)
    assert metrics.quadratic_kappa(y_true, y_rand, num_classes) == pytest.approx(
        sklearn_kappa(y_true, y_rand, num_classes), rel=1e-12)


def test_kappa_uses_grade_distance_when_a_grade_is_absent():
    # Grade 1 never occurs: sklearn without labels=range(C) would treat 0 and 2 as neighbours.
    y_true = np.array([0, 0, 2, 2, 3, 3, 0, 2])
    y_pred = np.array([0, 2, 2, 3, 3, 0, 0, 2])
    assert metrics.quadratic_kappa(y_true, y_pred, 4) == pytest.approx(
        sklearn_kappa(y_true, y_pred, 4), rel=1e-12)
    assert metrics.quadratic_kappa(y_true, y_pred, 4) != pytest.approx(
        skm.cohen_kappa_score(y_true, y_pred, weights="quadratic"))


def test_a_task_where_every_sample_has_one_class():
    y_true = np.full(20, 2)
    y_pred = np.array([2] * 15 + [1, 3, 3, 0, 2])
    # Defined in sklearn (expected disagreement > 0): compare.
    assert metrics.quadratic_kappa(y_true, y_pred, 4) == pytest.approx(
        sklearn_kappa(y_true, y_pred, 4), abs=1e-12)
    assert metrics.balanced_accuracy(y_true, y_pred, 4) == pytest.approx(
        sklearn_balanced_accuracy(y_true, y_pred))
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(0.8)
    # Every true and predicted grade one class: sklearn returns NaN, so do we.
    assert math.isnan(sklearn_kappa(y_true, y_true, 4))
    assert math.isnan(metrics.quadratic_kappa(y_true, y_true, 4))
    assert metrics.accuracy(y_true, y_true) == 1.0
    assert metrics.balanced_accuracy(y_true, y_true, 4) == 1.0
    assert metrics.rmse(y_true, y_true) == 0.0


def test_empty_input_gives_nan():
    empty = np.zeros(0, np.int64)
    assert math.isnan(metrics.accuracy(empty, empty))
    assert math.isnan(metrics.rmse(empty, empty))
    assert math.isnan(metrics.quadratic_kappa(empty, empty, 5))
    assert math.isnan(metrics.balanced_accuracy(empty, empty, 5))
    assert metrics.confusion_matrix(empty, empty, 5).sum() == 0


def test_invalid_input_raises():
    with pytest.raises(ValueError, match="shape"):
        metrics.accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="y_pred: grade 4"):
        metrics.quadratic_kappa([0, 1], [0, 4], 4)
    with pytest.raises(ValueError, match="y_true: grade -1"):
        metrics.confusion_matrix([-1, 1], [0, 1], 4)
    with pytest.raises(ValueError, match="integers"):
        metrics.rmse([0.5, 1.0], [0, 1])


def random_grade_matrix(rng, m, missing_fraction=0.0):
    grades = np.stack([rng.integers(0, grades_lib.NUM_CLASSES[t], m) for t in grades_lib.TASKS], 1)
    grades[rng.uniform(size=grades.shape) < missing_fraction] = -1
    return grades


def test_evaluate_structure_masking_and_average():
    rng = np.random.default_rng(0)
    true = random_grade_matrix(rng, 80, missing_fraction=0.25)
    pred = random_grade_matrix(rng, 80)
    pred[:40] = np.maximum(true[:40], 0)  # half the predictions copy the truth
    true[:, grades_lib.TASKS.index("ost_tibia_lateral")] = -1  # a task nobody graded
    result = metrics.evaluate(true, pred)
    assert set(result) == set(grades_lib.TASKS) | {"oarsi_average"}
    for t, task in enumerate(grades_lib.TASKS):
        entry = result[task]
        assert set(entry) == {"accuracy", "rmse", "kappa", "balanced_accuracy", "count",
                              "confusion_matrix"}
        keep = true[:, t] >= 0
        assert entry["count"] == int(keep.sum())
        c = grades_lib.NUM_CLASSES[task]
        if task == "ost_tibia_lateral":
            assert entry["count"] == 0
            assert all(math.isnan(entry[k]) for k in ("accuracy", "rmse", "kappa",
                                                      "balanced_accuracy"))
            continue
        y_true, y_pred = true[keep, t], pred[keep, t]
        assert entry["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
        assert entry["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y_true, y_pred)))
        assert entry["kappa"] == pytest.approx(sklearn_kappa(y_true, y_pred, c))
        assert entry["balanced_accuracy"] == pytest.approx(
            sklearn_balanced_accuracy(y_true, y_pred))
        assert entry["confusion_matrix"] == skm.confusion_matrix(
            y_true, y_pred, labels=np.arange(c)).tolist()
        assert isinstance(entry["accuracy"], float) and isinstance(entry["count"], int)
    present = [t for t in grades_lib.OARSI_TASKS if t != "ost_tibia_lateral"]
    for score in ("accuracy", "rmse", "kappa", "balanced_accuracy"):
        assert result["oarsi_average"][score] == pytest.approx(
            np.mean([result[t][score] for t in present]))


def test_evaluate_subset_of_tasks_and_errors():
    rng = np.random.default_rng(1)
    true = random_grade_matrix(rng, 10)
    pred = random_grade_matrix(rng, 10)
    result = metrics.evaluate(true, pred, tasks=("kl",))
    assert set(result) == {"kl", "oarsi_average"}
    assert math.isnan(result["oarsi_average"]["accuracy"])
    with pytest.raises(ValueError, match="shape"):
        metrics.evaluate(true, pred[:5])
    bad = pred.copy()
    bad[0, 0] = 5
    with pytest.raises(ValueError, match="kl grade 5"):
        metrics.evaluate(true, bad)
    bad = pred.copy()
    bad[3, 2] = -1
    with pytest.raises(ValueError, match="jsn_medial"):
        metrics.evaluate(true, bad)
    with pytest.raises(ValueError, match="unknown task"):
        metrics.evaluate(true, pred, tasks=("kl", "womac"))


def test_evaluate_undefined_kappa_is_left_out_of_the_average():
    rng = np.random.default_rng(2)
    true = random_grade_matrix(rng, 30)
    pred = random_grade_matrix(rng, 30)
    column = grades_lib.TASKS.index("jsn_lateral")
    true[:, column] = pred[:, column] = 0  # everyone grade 0, predicted 0
    result = metrics.evaluate(true, pred)
    assert result["jsn_lateral"]["count"] == 30 and result["jsn_lateral"]["accuracy"] == 1.0
    assert math.isnan(result["jsn_lateral"]["kappa"])
    others = [t for t in grades_lib.OARSI_TASKS if t != "jsn_lateral"]
    assert result["oarsi_average"]["kappa"] == pytest.approx(
        np.mean([result[t]["kappa"] for t in others]))
    assert result["oarsi_average"]["accuracy"] == pytest.approx(
        np.mean([result[t]["accuracy"] for t in grades_lib.OARSI_TASKS]))
