"""Evaluation: predictions over a split, the paper's metrics, the report folder."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kpn_jax import grades as grades_lib
from kpn_jax import input_pipeline, metrics, storage, trainer


def task_probabilities(outputs: dict, tasks) -> dict:
    """Model outputs -> task -> softmax ``[B, C]`` for the trained tasks."""
    return {task: jax.nn.softmax(outputs[task].astype(jnp.float32), axis=-1) for task in tasks}


def predicted_grades(outputs: dict, tasks, probabilities: dict | None = None
                     ) -> tuple[jax.Array, jax.Array]:
    """Model outputs -> (argmax grades int32 [B, 7] with -1 for absent tasks, P float32 [B, 29]).

    P holds each present task's softmax (``probabilities``, default from ``outputs``) and
    zeros for absent tasks.
    """
    probabilities = probabilities or task_probabilities(outputs, tasks)
    batch = next(iter(probabilities.values())).shape[0]
    grades, blocks = [], []
    for task in grades_lib.TASKS:
        if task in tasks:
            grades.append(jnp.argmax(probabilities[task], axis=-1).astype(jnp.int32))
            blocks.append(probabilities[task])
        else:
            grades.append(jnp.full((batch,), grades_lib.MISSING, jnp.int32))
            blocks.append(jnp.zeros((batch, grades_lib.NUM_CLASSES[task]), jnp.float32))
    return jnp.stack(grades, axis=-1), jnp.concatenate(blocks, axis=-1)


def make_eval_step(model, tasks, dtype=jnp.float32, compiler_options=None,
                   hflip: bool = False) -> Callable:
    """Jitted ``(variables, batch) -> (pred_grades [B,7], probabilities [B,29])``
    (``compiler_options``: the backend kernels', see :mod:`kpn_jax.kernels`). With
    ``hflip`` each knee's probabilities are the mean over it and its left-right mirror
    (keypoints mirrored with it; for grades without a side)."""

    def step(variables, batch):
        images = batch["image"].astype(dtype) / 255.0
        keypoints = batch["keypoints"].astype(jnp.float32)
        outputs = model.apply(variables, images, keypoints, train=False)
        if not hflip:
            return predicted_grades(outputs, tasks)
        # Pixel centres at integer x: column j of a W-wide image lands at W - 1 - j.
        mirrored_keypoints = keypoints.at[..., 0].set(images.shape[2] - 1 - keypoints[..., 0])
        mirrored = model.apply(variables, images[:, :, ::-1], mirrored_keypoints, train=False)
        straight, flipped = task_probabilities(outputs, tasks), task_probabilities(mirrored, tasks)
        return predicted_grades(outputs, tasks, {t: (straight[t] + flipped[t]) / 2 for t in tasks})

    return jax.jit(step, compiler_options=compiler_options or None)


def predict_split(eval_step, variables, source, checker, mesh, batch_size: int,
                  loading: input_pipeline.Loading = input_pipeline.Loading()) -> dict:
    """Runs ``eval_step`` over every example of ``source`` once.

    Returns numpy ``{'true': [M,7], 'pred': [M,7], 'probabilities': [M,29]}`` in
    the source's order.
    """
    def predict(variables, batch):
        pred, prob = eval_step(variables, batch)
        return {"pred": pred, "probabilities": prob}

    result = trainer.predict_dataset(predict, variables, source, checker, mesh, batch_size,
                                     fields=("image", "keypoints", "grades"), loading=loading,
                                     outputs=("grades",))
    return {"true": result["grades"], "pred": result["pred"],
            "probabilities": result["probabilities"]}


def coherence_log_probs(predictions: dict, gmm) -> np.ndarray | None:
    """The GMM log-density of each knee's predicted grade vector ``[M]``; None without a
    GMM or knees."""
    if gmm is None or not len(predictions["probabilities"]):
        return None
    from kpn_jax import gmm as gmm_lib

    return np.asarray(gmm_lib.log_prob(gmm, jnp.asarray(predictions["probabilities"])))


def split_metrics(predictions: dict, tasks, gmm=None, log_probs: np.ndarray | None = None
                  ) -> dict:
    """The paper's metrics for ``tasks`` (others are reported with count 0).

    With a GMM, also the mean coherence log-density of the predicted P
    (``'coherence_log_prob'``): how coherent the predicted grade vectors are
    (``log_probs``: :func:`coherence_log_probs`, when the caller has them already).
    """
    true = predictions["true"].copy()
    pred = predictions["pred"].copy()
    for t, task in enumerate(grades_lib.TASKS):
        if task not in tasks:
            true[:, t] = grades_lib.MISSING
            pred[:, t] = 0
    result = metrics.evaluate(true, pred)
    if log_probs is None:
        log_probs = coherence_log_probs(predictions, gmm)
    if log_probs is not None:
        result["coherence_log_prob"] = float(jnp.mean(jnp.asarray(log_probs)))
    return result


def flatten_metrics(result: dict, split: str) -> dict:
    """``evaluate()`` dict -> flat ``{'{split}/{task}/{metric}': float}`` for logs."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, dict):
            for metric, number in value.items():
                if isinstance(number, (int, float, np.floating, np.integer)):
                    flat[f"{split}/{key}/{metric}"] = float(number)
        elif isinstance(value, (int, float, np.floating)):
            flat[f"{split}/{key}"] = float(value)
    return flat


def write_split_report(report_dir, split: str, result: dict, records=None,
                       method_name="kpn-jax") -> Path:
    """Writes ``report_dir`` (a workdir's ``report/``) for ``split`` (tables, json, plots)."""
    from kpn_jax import reporting

    report_dir = storage.path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    reporting.write_report(report_dir, split, result, metrics_records=records, method_name=method_name)
    return report_dir


PREDICTIONS_CSV = "predictions_{split}.csv"


def write_predictions_csv(path, predictions: dict, tasks, image_ids=None, log_probs=None) -> Path:
    """One row per knee of an evaluated split, in the split's order: ``index`` (the
    example's position in the split), ``image_id``, per task ``<task>_true`` (-1 = not
    graded), ``<task>_pred`` and ``<task>_p0..`` (probabilities), and the GMM coherence
    log-density of the predicted grade vector where there is a GMM.

    Args:
      predictions: :func:`predict_split`'s ``{'true': [M,7], 'pred': [M,7],
        'probabilities': [M,29]}``.
    """
    import csv

    path = storage.path(path)
    tasks = [t for t in grades_lib.TASKS if t in tasks]
    offsets = grades_lib.one_hot_offsets()
    columns = ["index", "image_id"]
    for task in tasks:
        columns += [f"{task}_true", f"{task}_pred",
                    *(f"{task}_p{g}" for g in range(grades_lib.NUM_CLASSES[task]))]
    if log_probs is not None:
        columns.append("coherence_log_prob")
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(columns)
    for k in range(len(predictions["true"])):
        row = [k, "" if image_ids is None else image_ids[k]]
        for task in tasks:
            t = grades_lib.TASKS.index(task)
            start, stop = offsets[t]
            row += [int(predictions["true"][k, t]), int(predictions["pred"][k, t]),
                    *(f"{p:.5f}" for p in predictions["probabilities"][k, start:stop])]
        if log_probs is not None:
            row.append(f"{float(log_probs[k]):.4f}")
        writer.writerow(row)
    storage.write_atomic(path, table.getvalue())
    return path


def majority_baseline(true_grades: np.ndarray) -> dict:
    """Accuracy of always predicting each task's most frequent grade (chance reference)."""
    out = {}
    for t, task in enumerate(grades_lib.TASKS):
        column = true_grades[:, t]
        column = column[column >= 0]
        if len(column):
            out[task] = float(np.bincount(column).max() / len(column))
    return out

