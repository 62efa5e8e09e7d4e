"""The landmark detector: soft-argmax decoding, loss, metrics, training, detect, predict."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax.models import landmarks as lm


def _gaussian_logits(centers_px: np.ndarray, height: int, width: int, stride: int,
                     sigma_px: float) -> jnp.ndarray:
    """Log of an (unnormalised) Gaussian around each centre, ``[1, h, w, N]``."""
    xs = (np.arange(width) + 0.5) * stride - 0.5
    ys = (np.arange(height) + 0.5) * stride - 0.5
    logits = [-0.5 * (((xs[None, :] - cx) ** 2 + (ys[:, None] - cy) ** 2) / sigma_px ** 2)
              for cx, cy in centers_px]
    return jnp.asarray(np.stack(logits, axis=-1)[None], jnp.float32)


def test_soft_argmax_recovers_subpixel_peaks():
    stride = 4
    # Off-grid centres: not cell centres, not pixel centres.
    centers = np.array([[37.3, 51.85], [80.61, 22.07], [64.0, 64.0], [15.9, 100.45]])
    logits = _gaussian_logits(centers, 32, 32, stride, sigma_px=5.0)
    keypoints, probabilities = lm.soft_argmax(logits, stride)
    np.testing.assert_allclose(np.asarray(probabilities).sum(axis=(1, 2)), 1.0, atol=1e-5)
    error = np.abs(np.asarray(keypoints[0]) - centers)
    assert error.max() < 0.02, error


def test_soft_argmax_of_a_single_hot_cell_is_its_centre():
    logits = jnp.full((1, 8, 10, 1), -1e4, jnp.float32).at[0, 3, 7, 0].set(0.0)
    keypoints, _ = lm.soft_argmax(logits, 4)
    # Cell (row 3, column 7) of a stride-4 map covers pixels 28..31 x 12..15.
    np.testing.assert_allclose(np.asarray(keypoints[0, 0]), [29.5, 13.5], atol=1e-4)


def test_soft_argmax_is_differentiable_towards_the_target():
    logits = jnp.zeros((1, 16, 16, 1), jnp.float32)
    target = jnp.array([[[10.0, 50.0]]])

    def loss(z):
        return jnp.sum(jnp.abs(lm.soft_argmax(z, 4)[0] - target))

    grads = jax.grad(loss)(logits)
    assert np.all(np.isfinite(np.asarray(grads)))
    moved = lm.soft_argmax(logits - 50.0 * grads, 4)[0]
    assert float(loss(logits - 50.0 * grads)) < float(loss(logits)), moved


def test_gaussian_targets_are_distributions_centred_on_the_points():
    points = jnp.array([[[30.2, 41.7], [60.0, 12.5]]])
    targets = lm.gaussian_targets(points, 24, 24, 4, sigma_cells=1.0)
    assert targets.shape == (1, 24, 24, 2)
    np.testing.assert_allclose(np.asarray(targets).sum(axis=(1, 2)), 1.0, atol=1e-5)
    decoded, _ = lm.soft_argmax(jnp.log(targets + 1e-30), 4)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(points), atol=0.02)


def test_model_output_shapes_and_zero_init_centre():
    model = lm.LandmarkNet(num_points=16, depth=18, width=8, head_channels=16)
    images = jnp.zeros((2, 64, 64, 1), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), images)
    assert "layer4_0" not in variables["params"]["trunk"]
    out = model.apply(variables, images)
    assert out["keypoints"].shape == (2, 16, 2)
    assert out["heatmaps"].shape == (2, 16, 16, 16)
    # The zero-initialised last layer gives uniform maps: every point at the image centre.
    np.testing.assert_allclose(np.asarray(out["keypoints"]), 31.5, atol=1e-4)


def test_model_rejects_a_head_without_enough_stages():
    with pytest.raises(ValueError, match="stages"):
        lm.LandmarkNet(stages=1, width=8).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)))


def test_loss_ignores_invalid_points_and_has_finite_gradients_at_zero_error():
    logits = _gaussian_logits(np.array([[20.0, 20.0], [40.0, 44.0]]), 16, 16, 4, 4.0)
    keypoints, probabilities = lm.soft_argmax(logits, 4)
    outputs = {"keypoints": keypoints, "probabilities": probabilities}
    far = keypoints.at[0, 1].add(30.0)
    loss_all, _ = lm.landmark_loss(outputs, far, jnp.array([[True, True]]))
    loss_first, aux = lm.landmark_loss(outputs, far, jnp.array([[True, False]]))
    assert float(loss_all) > float(loss_first)
    assert float(aux["radial_error_px"]) < 1e-3
    for coord_loss in lm.COORD_LOSSES:
        grad = jax.grad(lambda k: lm.landmark_loss(
            {"keypoints": k, "probabilities": probabilities}, keypoints,
            jnp.ones((1, 2), bool), coord_loss=coord_loss)[0])(keypoints)
        assert np.all(np.isfinite(np.asarray(grad)))
    with pytest.raises(ValueError, match="coord_loss"):
        lm.landmark_loss(outputs, keypoints, jnp.ones((1, 2), bool), coord_loss="l2")


def test_summarize_errors_counts_and_thresholds():
    predicted = np.zeros((2, 3, 2))
    true = np.array([[[1, 0], [0, 2.5], [3, 4]], [[0, 0], [6, 8], [0, 0]]], np.float64)
    errors = lm.radial_errors(predicted, true)
    np.testing.assert_allclose(errors, [[1, 2.5, 5], [0, 10, 0]])
    valid = np.array([[True, True, True], [True, True, False]])
    summary = lm.summarize_errors(errors, valid, point_names=["a", "b", "c"])
    assert summary["num_points"] == 5 and summary["num_images"] == 2
    assert summary["mean"] == pytest.approx((1 + 2.5 + 5 + 0 + 10) / 5)
    assert summary["median"] == pytest.approx(2.5)
    assert summary["within_2px"] == pytest.approx(40.0)
    assert summary["within_3px"] == pytest.approx(60.0)
    assert summary["within_5px"] == pytest.approx(80.0)
    assert summary["per_point"]["c"]["count"] == 1
    assert summary["per_point"]["b"]["mean"] == pytest.approx(6.25)
    with pytest.raises(ValueError, match="valid"):
        lm.summarize_errors(errors, valid[:, :2])
