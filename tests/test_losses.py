"""kpn_jax.losses against float64 numpy references (and torch when installed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from kpn_jax import gmm as gmm_lib
from kpn_jax import grades as grades_lib
from kpn_jax import losses

TASKS = grades_lib.TASKS


def reference_weighted_ce(logits, labels, weights) -> float:
    """float64 numpy ``sum w_y CE / sum w_y`` over labels != -1."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    num = den = 0.0
    for row, label in zip(log_probs, labels):
        if label >= 0:
            num += -weights[label] * row[label]
            den += weights[label]
    return num / den


def reference_log_prob(gmm, x) -> np.ndarray:
    """float64 numpy GMM log-density, ``x [N, D]`` -> ``[N]``."""
    weights, means, chol = (np.asarray(a, np.float64)
                            for a in (gmm.weights, gmm.means, gmm.precisions_cholesky))
    x = np.asarray(x, np.float64)
    terms = []
    for k in range(weights.shape[0]):
        y = (x - means[k]) @ chol[k]
        terms.append(np.log(weights[k]) - 0.5 * (x.shape[1] * np.log(2 * np.pi) + (y * y).sum(1))
                     + np.log(np.diag(chol[k])).sum())
    terms = np.stack(terms, 1)
    top = terms.max(1, keepdims=True)
    return (top + np.log(np.exp(terms - top).sum(1, keepdims=True)))[:, 0]


def random_logits(rng, batch) -> dict[str, jax.Array]:
    return {t: jnp.asarray(rng.normal(0, 2, (batch, grades_lib.NUM_CLASSES[t])), jnp.float32)
            for t in TASKS}


def random_grades(rng, batch, missing_fraction=0.2) -> np.ndarray:
    grades = np.stack([rng.integers(0, grades_lib.NUM_CLASSES[t], batch) for t in TASKS], 1)
    grades[rng.uniform(size=grades.shape) < missing_fraction] = -1
    return grades.astype(np.int32)


def handmade_gmm(rng, k=3) -> gmm_lib.GMM:
    """A valid mixture with means at random one-hot vectors and diagonal precisions."""
    means = grades_lib.one_hot(random_grades(rng, k, missing_fraction=0.0))
    chol = np.stack([np.diag(rng.uniform(2.0, 5.0, grades_lib.ONE_HOT_DIM)) for _ in range(k)])
    weights = rng.uniform(0.5, 1.0, k)
    return gmm_lib.GMM(jnp.asarray(weights / weights.sum(), jnp.float32),
                       jnp.asarray(means, jnp.float32), jnp.asarray(chol, jnp.float32), sigma=0.2)


def test_class_weights_match_sklearn_balanced():
    rng = np.random.default_rng(0)
    grades = random_grades(rng, 200, missing_fraction=0.3)
    grades[:, 3] = np.where(grades[:, 3] == 2, 1, grades[:, 3])  # class 2 never seen
    weights = losses.class_weights(grades)
    assert set(weights) == set(TASKS)
    for t, task in enumerate(TASKS):
        column = grades[:, t][grades[:, t] >= 0]
        classes = np.unique(column)
        expected = np.zeros(grades_lib.NUM_CLASSES[task])
        # sklearn divides by the number of classes present; ours by the task's C.
        expected[classes] = (compute_class_weight("balanced", classes=classes, y=column)
                             * len(classes) / grades_lib.NUM_CLASSES[task])
        assert weights[task].dtype == np.float32
        np.testing.assert_allclose(weights[task], expected, rtol=1e-6)
    assert weights["ost_femur_lateral"][2] == 0.0
    only_kl = losses.class_weights(grades, tasks=("kl",))
    assert list(only_kl) == ["kl"]
    all_missing = losses.class_weights(np.full((5, 7), -1))
    assert all(np.all(w == 0) for w in all_missing.values())
    with pytest.raises(ValueError, match="kl grade 5"):
        losses.class_weights(np.full((3, 7), 5))


def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (32, 5)).astype(np.float32)
    labels = rng.integers(-1, 5, 32)
    weights = rng.uniform(0.2, 3.0, 5).astype(np.float32)
    got = float(losses.weighted_cross_entropy(logits, labels, weights))
    np.testing.assert_allclose(got, reference_weighted_ce(logits, labels, weights), rtol=1e-5)
    got_unweighted = float(losses.weighted_cross_entropy(logits, labels))
    np.testing.assert_allclose(got_unweighted, reference_weighted_ce(logits, labels, np.ones(5)),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="class_weights"):
        losses.weighted_cross_entropy(logits, labels, np.ones(4))
    with pytest.raises(ValueError, match="labels"):
        losses.weighted_cross_entropy(logits, labels[:5], weights)


def test_weighted_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (40, 4)).astype(np.float32)
    labels = rng.integers(-1, 4, 40)
    weights = rng.uniform(0.2, 3.0, 4).astype(np.float32)
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels), weight=torch.from_numpy(weights),
        ignore_index=-1, reduction="mean").item()
    got = float(losses.weighted_cross_entropy(logits, labels, weights))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.slow
def test_missing_labels_contribute_nothing():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(0, 1, (8, 4)), jnp.float32)
    labels = jnp.asarray([0, -1, 2, -1, 3, 1, -1, 0])
    weights = jnp.asarray([1.0, 2.0, 0.5, 1.5])
    base = losses.weighted_cross_entropy(logits, labels, weights)
    changed = logits.at[jnp.asarray([1, 3, 6])].set(100.0 * jnp.ones(4) * jnp.arange(4))
    np.testing.assert_allclose(float(losses.weighted_cross_entropy(changed, labels, weights)),
                               float(base), rtol=1e-6)
    grad = jax.grad(losses.weighted_cross_entropy)(logits, labels, weights)
    assert np.all(np.asarray(grad)[[1, 3, 6]] == 0)
    assert np.any(np.asarray(grad)[0] != 0)


def test_all_missing_gives_zero_and_zero_gradient():
    logits = jnp.asarray(np.random.default_rng(4).normal(0, 1, (6, 5)), jnp.float32)
    labels = -jnp.ones(6, jnp.int32)
    value, grad = jax.value_and_grad(losses.weighted_cross_entropy)(logits, labels, jnp.ones(5))
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)
    # Present labels whose classes all have weight 0 are as good as missing.
    value, grad = jax.value_and_grad(losses.weighted_cross_entropy)(
        logits, jnp.asarray([2, 2, 2, -1, 2, 2]), jnp.asarray([1.0, 1.0, 0.0, 1.0, 1.0]))
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("tau", [0.25, 0.5, 1.5])
def test_incoherence_loss_matches_float64_and_is_finite(tau):
    g = np.linspace(-100.0, 100.0, 41)
    expected = np.log1p(np.exp(-tau * g)) / tau
    expected_grad = -1.0 / (1.0 + np.exp(tau * g))  # d/dg log(1 + e^{-tau g}) / tau
    got = np.asarray(losses.incoherence_loss(jnp.asarray(g, jnp.float32), tau))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-30)
    grad = np.asarray(jax.vmap(jax.grad(lambda x: losses.incoherence_loss(x, tau)))(
        jnp.asarray(g, jnp.float32)))
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-30)
    extremes = jnp.asarray([-1e4, 1e4], jnp.float32)
    value = np.asarray(losses.incoherence_loss(extremes, tau))
    grad = np.asarray(jax.vmap(jax.grad(lambda x: losses.incoherence_loss(x, tau)))(extremes))
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, [1e4, 0.0], rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(grad, [-1.0, 0.0], atol=1e-30)


def test_incoherence_loss_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        losses.incoherence_loss(jnp.zeros(3), 0.0)


def test_probabilities_vector_layout():
    rng = np.random.default_rng(5)
    logits = random_logits(rng, 3)
    p = np.asarray(losses.probabilities_vector(logits))
    assert p.shape == (3, grades_lib.ONE_HOT_DIM) and p.dtype == np.float32
    for (start, stop), task in zip(grades_lib.one_hot_offsets(), TASKS):
        z = np.asarray(logits[task], np.float64)
        expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        np.testing.assert_allclose(p[:, start:stop], expected, rtol=1e-5)
    with pytest.raises(ValueError, match="kl"):
        losses.probabilities_vector({t: v for t, v in logits.items() if t != "kl"})


def reference_total(logits, grades, weights, gmm, tau, lambda_cls, lambda_gmm, labeled):
    cls = 0.0
    for t, task in enumerate(TASKS):
        labels = np.where(labeled, grades[:, t], -1)
        if np.any(labels >= 0):
            cls += reference_weighted_ce(logits[task], labels, weights[task])
    if gmm is None:
        return lambda_cls * cls, cls, None
    p = np.concatenate([np.exp(np.asarray(logits[t], np.float64))
                        / np.exp(np.asarray(logits[t], np.float64)).sum(1, keepdims=True)
                        for t in TASKS], 1)
    g = reference_log_prob(gmm, p)
    incoherence = np.mean(np.logaddexp(0.0, -tau * g) / tau)
    return lambda_cls * cls + lambda_gmm * incoherence, cls, incoherence


@pytest.mark.slow
def test_total_loss_matches_reference_and_warm_up():
    rng = np.random.default_rng(6)
    batch = 10
    logits = random_logits(rng, batch)
    grades = random_grades(rng, batch)
    labeled = np.arange(batch) < 6
    weights = losses.class_weights(random_grades(rng, 100))
    gmm = handmade_gmm(rng)
    expected, expected_cls, expected_gmm = reference_total(
        logits, grades, weights, gmm, 0.5, 1.3, 0.7, labeled)

    loss, metrics = losses.total_loss(logits, grades, weights, gmm, tau=0.5, lambda_cls=1.3,
                                      lambda_gmm=0.7, use_gmm=True, labeled_mask=labeled)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["cls"]), expected_cls, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["gmm"]), expected_gmm, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss))
    np.testing.assert_allclose(sum(float(metrics[f"cls/{t}"]) for t in TASKS),
                               float(metrics["cls"]), rtol=1e-6)
    assert "log_prob" in metrics and "regression" not in metrics

    warm_up, warm_metrics = losses.total_loss(logits, grades, weights, gmm, lambda_cls=1.3,
                                              use_gmm=False, labeled_mask=labeled)
    cls_only, cls_metrics = losses.total_loss(logits, grades, weights, None, lambda_cls=1.3,
                                              labeled_mask=labeled)
    np.testing.assert_allclose(float(warm_up), float(cls_only), rtol=1e-7)
    np.testing.assert_allclose(float(cls_only), 1.3 * expected_cls, rtol=1e-5)
    assert "gmm" not in cls_metrics and float(warm_metrics["gmm_on"]) == 0.0


@pytest.mark.slow
def test_labeled_mask_limits_cls_but_not_gmm():
    rng = np.random.default_rng(7)
    batch = 8
    logits = random_logits(rng, batch)
    grades = random_grades(rng, batch, missing_fraction=0.0)
    labeled = np.arange(batch) < 4
    gmm = handmade_gmm(rng)
    # Unlabelled examples' logits: no gradient from cls, some gradient from gmm.
    grad_cls = jax.grad(lambda o: losses.total_loss(o, grades, None, None,
                                                    labeled_mask=labeled)[0])(logits)
    grad_all = jax.grad(lambda o: losses.total_loss(o, grades, None, gmm,
                                                    labeled_mask=labeled)[0])(logits)
    for task in TASKS:
        assert np.all(np.asarray(grad_cls[task])[4:] == 0)
        assert np.any(np.asarray(grad_cls[task])[:4] != 0)
    assert any(np.any(np.asarray(grad_all[t])[4:] != 0) for t in TASKS)


@pytest.mark.slow
def test_total_loss_jit_with_traced_warm_up_switch():
    rng = np.random.default_rng(8)
    logits = random_logits(rng, 6)
    grades = jnp.asarray(random_grades(rng, 6))
    weights = {t: jnp.asarray(w) for t, w in losses.class_weights(random_grades(rng, 50)).items()}
    gmm = handmade_gmm(rng)

    @jax.jit
    def step(outputs, use_gmm):
        return jax.value_and_grad(
            lambda o: losses.total_loss(o, grades, weights, gmm, use_gmm=use_gmm)[0])(outputs)

    on, grad_on = step(logits, jnp.asarray(True))
    off, grad_off = step(logits, jnp.asarray(False))
    cls_only, grad_cls = jax.value_and_grad(
        lambda o: losses.total_loss(o, grades, weights, None)[0])(logits)
    _, eager = losses.total_loss(logits, grades, weights, gmm, use_gmm=True)
    np.testing.assert_allclose(float(off), float(cls_only), rtol=1e-6)
    np.testing.assert_allclose(float(on), float(cls_only) + float(eager["gmm"]), rtol=1e-5)
    for task in TASKS:
        np.testing.assert_allclose(np.asarray(grad_off[task]), np.asarray(grad_cls[task]),
                                   rtol=1e-5, atol=1e-7)
        assert np.all(np.isfinite(np.asarray(grad_on[task])))


def test_auxiliary_regression_term():
    rng = np.random.default_rng(9)
    batch = 7
    logits = random_logits(rng, batch)
    grades = random_grades(rng, batch, missing_fraction=0.3)
    labeled = np.array([1, 1, 1, 1, 1, 0, 0], bool)
    regression = {t: jnp.asarray(rng.uniform(0, 4, batch), jnp.float32) for t in ("kl", "jsn_medial")}
    outputs = {**logits, "regression": regression}
    base, _ = losses.total_loss(logits, grades, None, labeled_mask=labeled)
    loss, metrics = losses.total_loss(outputs, grades, None, labeled_mask=labeled,
                                      aux_regression_weight=0.5)
    expected = 0.0
    for task, pred in regression.items():
        target = grades[:, TASKS.index(task)]
        keep = labeled & (target >= 0)
        if keep.any():
            expected += np.mean((np.asarray(pred, np.float64)[keep] - target[keep]) ** 2)
    np.testing.assert_allclose(float(metrics["regression"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(base) + 0.5 * expected, rtol=1e-5)
    with pytest.raises(ValueError, match="regression"):
        losses.total_loss({**logits, "regression": {"kl": jnp.zeros(3)}}, grades, None)


def test_total_loss_rejects_bad_shapes():
    rng = np.random.default_rng(10)
    logits = random_logits(rng, 4)
    with pytest.raises(ValueError, match="grades"):
        losses.total_loss(logits, np.zeros((4, 6), np.int32), None)
    with pytest.raises(ValueError, match="labeled_mask"):
        losses.total_loss(logits, np.zeros((4, 7), np.int32), None, labeled_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="jsn_lateral"):
        losses.total_loss({**logits, "jsn_lateral": jnp.zeros((4, 5))}, np.zeros((4, 7)), None)
