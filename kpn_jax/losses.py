"""Losses of coherence learning (paper eqs. 1, 4, 5).

- ``L_cls``: sum over the 7 tasks of prevalence-weighted cross entropy,
  labelled examples only.
- ``L_gmm``: the incoherence loss ``softplus(-tau * g(P)) / tau`` with
  ``g = log p_GMM`` of the concatenated softmaxes ``P``, on every example.
- ``L = lambda_cls * L_cls + lambda_gmm * L_gmm``; ``L_gmm`` is switched off
  during the warm-up epoch by a (possibly traced) boolean.

Everything here is pure ``jax.numpy`` and runs under ``jax.jit``, except
:func:`class_weights`, which counts training grades on the host.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kpn_jax import gmm as gmm_lib
from kpn_jax import grades as grades_lib


def class_weights(grades, tasks: Sequence[str] = grades_lib.TASKS) -> dict[str, np.ndarray]:
    """Prevalence weights ``N / (C * n_c)`` per task from training grades.

    ``N`` counts the task's present (not -1) grades, ``n_c`` those of class
    ``c``; this is scikit-learn's ``class_weight='balanced'``. A class absent
    from the training grades gets weight 0: its prevalence weight would be
    infinite, and with 0 an example of that class (e.g. in validation) simply
    does not count, rather than dominating the loss.

    Args:
      grades: int ``[M, 7]`` in ``TASKS`` order, -1 = missing.
      tasks: the tasks to weight.

    Returns:
      task -> float32 ``[C_task]``.
    """
    arr = grades_lib.validate(grades, name="class_weights: grades")
    arr = arr.reshape(-1, len(grades_lib.TASKS))
    weights = {}
    for task in tasks:
        if task not in grades_lib.NUM_CLASSES:
            raise ValueError(f"class_weights: unknown task {task!r}; known: {grades_lib.TASKS}")
        column = arr[:, grades_lib.TASKS.index(task)]
        num_classes = grades_lib.NUM_CLASSES[task]
        counts = np.bincount(column[column >= 0], minlength=num_classes).astype(np.float64)
        total = counts.sum()
        w = np.where(counts > 0, total / (num_classes * np.maximum(counts, 1)), 0.0)
        weights[task] = w.astype(np.float32)
    return weights


def ordinal_targets(labels: jax.Array, num_classes: int, sigma: float) -> jax.Array:
    """Soft ordinal labels (SORD, Diaz & Marathe 2019): ``softmax_k(-(k - y)^2 / (2 sigma^2))``.

    The target puts most of its mass on the grade ``y`` and the rest on its neighbours,
    falling off with the squared distance, so a prediction one grade off costs less than
    one three grades off. ``sigma`` 0.4 keeps 0.92 on a middle grade (as label smoothing
    0.1 does over 5 classes) and gives 0.04 to each neighbour.

    Args:
      labels: int ``[B]`` in ``[0, C)``.
      num_classes: ``C``.
      sigma: > 0, in grades.

    Returns:
      float32 ``[B, C]``, rows summing to 1.
    """
    grades = jnp.arange(num_classes, dtype=jnp.float32)
    distance = grades[None, :] - jnp.asarray(labels, jnp.float32)[:, None]           # [B, C]
    return jax.nn.softmax(-distance ** 2 / (2.0 * sigma ** 2), axis=-1)


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array,
                           class_weights: jax.Array | None = None,
                           label_smoothing: float = 0.0,
                           ordinal_label_sigma: float = 0.0) -> jax.Array:
    """Class-weighted mean cross entropy over present labels.

    ``sum_i w[y_i] CE_i / sum_i w[y_i]`` over ``i`` with ``y_i != -1``: the
    reduction of torch ``F.cross_entropy(weight=w, ignore_index=-1)``. Returns
    0 with zero gradient when no label is present (torch returns NaN there).
    ``CE_i`` is against ``onehot(y_i)``, or with ``ordinal_label_sigma`` ``s`` > 0
    against :func:`ordinal_targets`; with ``label_smoothing`` ``e`` that target ``q`` becomes
    ``(1 - e) q + e / C`` (each example still weighted by ``w[y_i]``).

    Args:
      logits: ``[B, C]``.
      labels: int ``[B]`` in ``{-1} U [0, C)``; -1 = missing.
      class_weights: ``[C]``; ``None`` = all ones.

    Returns:
      float32 scalar.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"weighted_cross_entropy: logits must be [B, C], got {logits.shape}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"weighted_cross_entropy: labels must be [{logits.shape[0]}], "
                         f"got {labels.shape}")
    num_classes = logits.shape[1]
    if class_weights is None:
        class_weights = jnp.ones((num_classes,), jnp.float32)
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
        raise ValueError(f"weighted_cross_entropy: class_weights must be [{num_classes}], "
                         f"got {class_weights.shape}")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    present = labels >= 0
    safe_labels = jnp.where(present, labels, 0).astype(jnp.int32)
    if ordinal_label_sigma:
        targets = ordinal_targets(safe_labels, num_classes, ordinal_label_sigma)      # [B, C]
        nll = -jnp.sum(targets * log_probs, axis=-1)                                  # [B]
    else:
        nll = -jnp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]  # [B]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(log_probs, axis=-1)
    weight = jnp.where(present, class_weights[safe_labels], 0.0)                     # [B]
    total_weight = jnp.sum(weight)
    has_weight = total_weight > 0
    # The safe denominator keeps both the value and the gradient finite (0) when empty.
    return jnp.where(has_weight, jnp.sum(weight * nll) / jnp.where(has_weight, total_weight, 1.0),
                     0.0)


def incoherence_loss(log_prob: jax.Array, tau: float | jax.Array = 0.5) -> jax.Array:
    """``log(1 + exp(-tau * g)) / tau`` elementwise (paper eq. 4).

    A smooth hinge on the GMM log-density ``g``: about ``-g`` for very
    incoherent predictions, about 0 for coherent ones. ``jax.nn.softplus`` is
    ``logaddexp(x, 0)``, so value and gradient stay finite for any finite
    ``g`` (checked for ``|g|`` up to 1e4).
    """
    if isinstance(tau, (int, float)) and not tau > 0:
        raise ValueError(f"incoherence_loss: tau must be > 0, got {tau}")
    log_prob = jnp.asarray(log_prob)
    return jax.nn.softplus(-tau * log_prob) / tau


def _check_logits(logits: Mapping[str, jax.Array], tasks: Sequence[str], where: str) -> None:
    missing = [t for t in tasks if t not in logits]
    if missing:
        raise ValueError(f"{where}: outputs lack logits for tasks {missing}")
    for task in tasks:
        shape = jnp.shape(logits[task])
        if len(shape) != 2 or shape[1] != grades_lib.NUM_CLASSES[task]:
            raise ValueError(f"{where}: logits[{task!r}] must be [B, {grades_lib.NUM_CLASSES[task]}], "
                             f"got {shape}")


def probabilities_vector(logits: Mapping[str, jax.Array]) -> jax.Array:
    """The paper's ``P``: softmaxes of the 7 heads concatenated in ``TASKS`` order.

    Args:
      logits: task -> ``[B, C_task]`` for every task in ``TASKS``.

    Returns:
      float32 ``[B, 29]``.
    """
    _check_logits(logits, grades_lib.TASKS, "probabilities_vector")
    return jnp.concatenate(
        [jax.nn.softmax(jnp.asarray(logits[t]).astype(jnp.float32), axis=-1)
         for t in grades_lib.TASKS], axis=-1)


def _masked_mse(prediction: jax.Array, target: jax.Array, present: jax.Array) -> jax.Array:
    """Mean of ``(prediction - target)^2`` over ``present``; 0 when none."""
    count = jnp.sum(present)
    squared = jnp.where(present, (prediction.astype(jnp.float32) - target) ** 2, 0.0)
    return jnp.sum(squared) / jnp.maximum(count, 1)


def total_loss(outputs: Mapping[str, jax.Array | Mapping[str, jax.Array]], grades: jax.Array,
               class_weights: Mapping[str, jax.Array] | None,
               gmm: gmm_lib.GMM | None = None, tau: float = 0.5, lambda_cls: float = 1.0,
               lambda_gmm: float = 1.0, use_gmm: bool | jax.Array = True,
               labeled_mask: jax.Array | None = None,
               tasks: Sequence[str] = grades_lib.TASKS,
               aux_regression_weight: float = 1.0,
               label_smoothing: float = 0.0,
               ordinal_label_sigma: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``L = lambda_cls * L_cls + lambda_gmm * L_gmm (+ aux regression)``.

    Args:
      outputs: the model output: task -> logits ``[B, C]``, plus optionally
        ``'regression'``: task -> ``[B]`` predicted grades (the auxiliary head of
        Antony et al.).
      grades: int ``[B, 7]`` in ``TASKS`` order, -1 = missing (anything for
        unlabelled examples).
      class_weights: task -> ``[C]`` (see :func:`class_weights`); ``None`` = unweighted.
      gmm: the coherence GMM; ``None`` drops the incoherence term entirely.
      tau: temperature of the incoherence loss.
      lambda_cls, lambda_gmm: weights of the two terms.
      use_gmm: the warm-up switch (False during the first epoch); a Python or
        traced boolean, so one jitted step serves both phases.
      labeled_mask: bool ``[B]``, True for examples of the labelled stream;
        only they enter the classification and regression terms. ``None`` = all.
      tasks: tasks in the classification term.
      aux_regression_weight: weight of the regression MSE (only when
        ``outputs`` has ``'regression'``).
      label_smoothing, ordinal_label_sigma: of the classification targets
        (:func:`weighted_cross_entropy`).

    Returns:
      ``(loss, metrics)``; metrics hold scalars ``'loss'``, ``'cls'``,
      ``'cls/{task}'`` and, with a GMM, ``'gmm'`` (the unweighted incoherence
      loss, reported even while switched off), ``'gmm_on'`` and
      ``'log_prob'``; with a regression head ``'regression'``.
    """
    grades = jnp.asarray(grades)
    batch = grades.shape[0]
    labeled_mask = jnp.ones((batch,), bool) if labeled_mask is None else jnp.asarray(labeled_mask,
                                                                                     bool)
    _check_loss_inputs(outputs, grades, labeled_mask, tasks, gmm)

    metrics: dict[str, jax.Array] = {}
    cls = jnp.zeros((), jnp.float32)
    for task in tasks:
        labels = jnp.where(labeled_mask, grades[:, grades_lib.TASKS.index(task)], -1)
        weights = None if class_weights is None else class_weights[task]
        task_loss = weighted_cross_entropy(outputs[task], labels, weights, label_smoothing,
                                           ordinal_label_sigma)
        metrics[f"cls/{task}"] = task_loss
        cls = cls + task_loss
    metrics["cls"] = cls
    loss = lambda_cls * cls

    if "regression" in outputs:
        regression = jnp.zeros((), jnp.float32)
        for task, predicted in outputs["regression"].items():
            target = grades[:, grades_lib.TASKS.index(task)]
            present = labeled_mask & (target >= 0)
            regression = regression + _masked_mse(jnp.asarray(predicted),
                                                  target.astype(jnp.float32), present)
        metrics["regression"] = regression
        loss = loss + aux_regression_weight * regression

    if gmm is not None:
        probabilities = probabilities_vector(outputs)                                 # [B, 29]
        log_prob = gmm_lib.log_prob(gmm, probabilities)                               # [B]
        incoherence = jnp.mean(incoherence_loss(log_prob, tau))
        gmm_on = jnp.asarray(use_gmm, bool)
        # jnp.where, not Python `if`: use_gmm may be traced. The incoherence value
        # is finite, so the switched-off branch contributes an exact zero gradient.
        loss = loss + jnp.where(gmm_on, lambda_gmm * incoherence, 0.0)
        metrics["gmm"] = incoherence
        metrics["gmm_on"] = gmm_on.astype(jnp.float32)
        metrics["log_prob"] = jnp.mean(log_prob)

    metrics["loss"] = loss
    return loss, metrics


def mixup_loss(loss_of_targets, grades: jax.Array, labeled_mask: jax.Array, lam: jax.Array,
               permutation: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of mixed images: ``lam * L(grades) + (1 - lam) * L(grades[permutation])``.

    Cross entropy is linear in its target, so this is the cross entropy against the mixed
    (smoothed) one-hot targets; terms that do not depend on the grades (the incoherence
    loss) come out unchanged.

    Args:
      loss_of_targets: ``(grades [B, 7], labeled_mask [B]) -> (loss, metrics)``, e.g.
        :func:`total_loss` with the outputs of the mixed images bound.
      grades, labeled_mask: of the unmixed batch.
      lam: float scalar, the weight of each example's own image.
      permutation: int ``[B]``, each example's partner (:func:`kpn_jax.augment.mixup_params`).

    Returns:
      ``(loss, metrics)``, each metric mixed the same way.
    """
    own = loss_of_targets(grades, labeled_mask)
    partner = loss_of_targets(grades[permutation], labeled_mask[permutation])
    return jax.tree.map(lambda a, b: lam * a + (1.0 - lam) * b, own, partner)


def _check_loss_inputs(outputs: dict, grades: jax.Array, labeled_mask: jax.Array,
                       tasks: Sequence[str], gmm) -> None:
    """The shapes :func:`total_loss` relies on; raises ValueError naming the argument."""
    if grades.ndim != 2 or grades.shape[1] != len(grades_lib.TASKS):
        raise ValueError(f"total_loss: grades must be [B, {len(grades_lib.TASKS)}], "
                         f"got {grades.shape}")
    batch = grades.shape[0]
    _check_logits(outputs, tasks, "total_loss")
    for task in tasks:
        if jnp.shape(outputs[task])[0] != batch:
            raise ValueError(f"total_loss: logits[{task!r}] has batch {jnp.shape(outputs[task])[0]}, "
                             f"grades has {batch}")
    if labeled_mask.shape != (batch,):
        raise ValueError(f"total_loss: labeled_mask must be [{batch}], got {labeled_mask.shape}")
    for task, predicted in outputs.get("regression", {}).items():
        if task not in grades_lib.TASKS:
            raise ValueError(f"total_loss: regression output for unknown task {task!r}")
        if jnp.shape(predicted) != (batch,):
            raise ValueError(f"total_loss: regression[{task!r}] must be [{batch}], "
                             f"got {jnp.shape(predicted)}")
    if gmm is not None:
        dimension = sum(grades_lib.NUM_CLASSES[t] for t in grades_lib.TASKS)
        if gmm.means.shape[-1] != dimension:
            raise ValueError(f"total_loss: P has dimension {dimension}, the GMM "
                             f"{gmm.means.shape[-1]}")
