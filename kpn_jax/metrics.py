"""Evaluation metrics of the paper's tables: accuracy, RMSE, quadratic kappa.

numpy in, plain Python floats out, so evaluation runs on any host without JAX.
Grades are class indices; RMSE treats them as numbers (the grade scale).

Degenerate cases:
- an empty input gives NaN for every score (nothing to measure);
- quadratic kappa is undefined when the expected disagreement is 0, i.e. every
  true and every predicted grade is one and the same class. scikit-learn's
  ``cohen_kappa_score`` returns NaN there (its ``replace_undefined_by``
  default), and so do we; the OARSI average then averages the tasks where
  kappa is defined.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from kpn_jax import grades as grades_lib

_SCORES = ("accuracy", "rmse", "kappa", "balanced_accuracy")


def _labels(values, name: str) -> np.ndarray:
    """A 1-D int64 array of integer class labels, or ValueError naming ``name``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of grades, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name}: grades must be finite integers")
    elif arr.dtype.kind not in "iub" and arr.size:
        raise ValueError(f"{name}: grades must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _pair(y_true, y_pred, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    true = _labels(y_true, "y_true")
    pred = _labels(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {true.shape} vs {pred.shape}")
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        for name, arr in (("y_true", true), ("y_pred", pred)):
            if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
                bad = arr[(arr < 0) | (arr >= num_classes)][0]
                raise ValueError(f"{name}: grade {bad} outside 0..{num_classes - 1}")
    return true, pred


def accuracy(y_true, y_pred) -> float:
    """Fraction of exact matches; NaN when empty."""
    true, pred = _pair(y_true, y_pred)
    return float(np.mean(true == pred)) if true.size else math.nan


def rmse(y_true, y_pred) -> float:
    """Root mean squared error of the grade as a number; NaN when empty."""
    true, pred = _pair(y_true, y_pred)
    if not true.size:
        return math.nan
    return float(np.sqrt(np.mean((true - pred).astype(np.float64) ** 2)))


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """int64 ``[C, C]``, rows = true grade, columns = predicted grade."""
    true, pred = _pair(y_true, y_pred, num_classes)
    return np.bincount(true * num_classes + pred,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def quadratic_kappa(y_true, y_pred, num_classes: int) -> float:
    """Quadratic weighted Cohen's kappa over grades ``0..num_classes-1``.

    ``1 - sum(W * O) / sum(W * E)`` with ``W_ij = (i - j)^2``, ``O`` the
    confusion matrix and ``E`` the outer product of its marginals / ``n``. The
    weights use grade distance even for grades absent from both arrays (pass
    ``labels=range(C)`` to scikit-learn for the same numbers). NaN when empty
    or when the expected disagreement is 0 (see the module docstring).
    """
    confusion = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    total = confusion.sum()
    if total == 0:
        return math.nan
    grades = np.arange(num_classes, dtype=np.float64)
    weight = (grades[:, None] - grades[None, :]) ** 2
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / total
    expected_disagreement = np.sum(weight * expected)
    if expected_disagreement == 0:  # a sum of non-negative terms: exact test is safe
        return math.nan
    return float(1.0 - np.sum(weight * confusion) / expected_disagreement)


def balanced_accuracy(y_true, y_pred, num_classes: int) -> float:
    """Mean per-class recall over the classes present in ``y_true``; NaN when empty.

    Classes with no true sample are left out, as in scikit-learn's
    ``balanced_accuracy_score``.
    """
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    support = confusion.sum(axis=1)
    present = support > 0
    if not present.any():
        return math.nan
    return float(np.mean(np.diag(confusion)[present] / support[present]))


def _grade_matrix(grades, name: str) -> np.ndarray:
    arr = grades_lib.validate(grades, name=name)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected [M, {len(grades_lib.TASKS)}], got {arr.shape}")
    return arr


def evaluate(true_grades, pred_grades, tasks: Sequence[str] = grades_lib.TASKS) -> dict:
    """Per-task scores and the paper's OARSI average.

    Args:
      true_grades: int ``[M, 7]`` in ``TASKS`` order, -1 = not graded (masked
        out per task).
      pred_grades: int ``[M, 7]``, every grade in range (no -1).
      tasks: tasks to score.

    Returns:
      ``{task: {'accuracy', 'rmse', 'kappa', 'balanced_accuracy', 'count',
      'confusion_matrix' (nested list [C][C], rows true)}, 'oarsi_average':
      {'accuracy', 'rmse', 'kappa', 'balanced_accuracy'}}``. A task without
      graded samples has count 0 and NaN scores. Each OARSI average score is
      the mean over the OARSI tasks in ``tasks`` with a defined (non-NaN) value;
      NaN when there is none.

    Raises:
      ValueError: shape mismatch, grades out of range, or a missing prediction.
    """
    true = _grade_matrix(true_grades, "true_grades")
    pred = _grade_matrix(pred_grades, "pred_grades")
    if true.shape != pred.shape:
        raise ValueError(f"true_grades and pred_grades differ in shape: {true.shape} vs "
                         f"{pred.shape}")
    if np.any(pred == grades_lib.MISSING):
        task = grades_lib.TASKS[int(np.argwhere(pred == grades_lib.MISSING)[0, 1])]
        raise ValueError(f"pred_grades: {task} has a missing (-1) prediction; every example "
                         "needs a predicted grade")
    results: dict = {}
    for task in tasks:
        if task not in grades_lib.NUM_CLASSES:
            raise ValueError(f"evaluate: unknown task {task!r}; known: {grades_lib.TASKS}")
        column = grades_lib.TASKS.index(task)
        num_classes = grades_lib.NUM_CLASSES[task]
        graded = true[:, column] != grades_lib.MISSING
        y_true, y_pred = true[graded, column], pred[graded, column]
        results[task] = {
            "accuracy": accuracy(y_true, y_pred),
            "rmse": rmse(y_true, y_pred),
            "kappa": quadratic_kappa(y_true, y_pred, num_classes),
            "balanced_accuracy": balanced_accuracy(y_true, y_pred, num_classes),
            "count": int(graded.sum()),
            "confusion_matrix": confusion_matrix(y_true, y_pred, num_classes).tolist(),
        }
    oarsi = [t for t in tasks if t in grades_lib.OARSI_TASKS]
    average = {}
    for score in _SCORES:
        values = [results[t][score] for t in oarsi if not math.isnan(results[t][score])]
        average[score] = float(np.mean(values)) if values else math.nan
    results["oarsi_average"] = average
    return results
