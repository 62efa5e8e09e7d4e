"""kpn_jax.keypoints: bilinear gather vs float64 numpy (and torch), densification, schemas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax import keypoints as kp


def reference_weights(points, height, width, stride) -> np.ndarray:
    """float64 ``[N, H*W]`` bilinear weights: ``gather = A @ F.reshape(H*W, C)``.

    Input pixel ``x`` sits at feature coordinate ``(x + 0.5) / stride - 0.5``;
    corners outside the map contribute nothing (zero padding).
    """
    a = np.zeros((len(points), height * width))
    for n, (x, y) in enumerate(np.asarray(points, np.float64)):
        u = (x + 0.5) / stride - 0.5
        v = (y + 0.5) / stride - 0.5
        u0, v0 = int(np.floor(u)), int(np.floor(v))
        for du, wu in ((0, 1 - (u - u0)), (1, u - u0)):
            for dv, wv in ((0, 1 - (v - v0)), (1, v - v0)):
                j, i = u0 + du, v0 + dv
                if 0 <= i < height and 0 <= j < width:
                    a[n, i * width + j] += wu * wv
    return a


def random_case(seed, batch=2, height=5, width=6, channels=3, n=9, stride=4.0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
    # Points spread over the image and beyond it on every side.
    points = np.stack([rng.uniform(-2 * stride, width * stride + 2 * stride, (batch, n)),
                       rng.uniform(-2 * stride, height * stride + 2 * stride, (batch, n))],
                      -1).astype(np.float32)
    return features, points, stride


@pytest.mark.slow
def test_bilinear_gather_matches_float64_reference_inside_and_outside():
    features, points, stride = random_case(0)
    batch, height, width, channels = features.shape
    got = np.asarray(kp.bilinear_gather(jnp.asarray(features), jnp.asarray(points), stride))
    assert got.shape == (batch, points.shape[1], channels)
    for b in range(batch):
        a = reference_weights(points[b], height, width, stride)
        expected = a @ features[b].astype(np.float64).reshape(height * width, channels)
        np.testing.assert_allclose(got[b], expected, rtol=1e-5, atol=1e-6)
    # Far outside the map: exactly zero.
    far = np.array([[[-100.0, 5.0], [5.0, 1e3], [1e3, 1e3]]], np.float32)
    zero = kp.bilinear_gather(jnp.asarray(features[:1]), jnp.asarray(far), stride)
    assert np.all(np.asarray(zero) == 0)


def test_bilinear_gather_at_cell_centres_reads_the_cell():
    features, _, _ = random_case(1, batch=1)
    stride = 16.0
    rows, cols = np.meshgrid(np.arange(5), np.arange(6), indexing="ij")
    # Feature cell (i, j) covers input pixels [16 j, 16 j + 15]; its centre is 16 j + 7.5.
    points = np.stack([stride * cols + (stride - 1) / 2, stride * rows + (stride - 1) / 2],
                      -1).reshape(1, -1, 2).astype(np.float32)
    got = np.asarray(kp.bilinear_gather(jnp.asarray(features), jnp.asarray(points), stride))
    np.testing.assert_allclose(got[0], features[0].reshape(-1, 3), rtol=1e-6)


def test_bilinear_gather_gradient_wrt_feature_map_is_the_transposed_weights():
    features, points, stride = random_case(2)
    batch, height, width, channels = features.shape
    cotangent = np.random.default_rng(3).normal(size=(batch, points.shape[1], channels))
    grad = jax.grad(lambda f: jnp.sum(kp.bilinear_gather(f, jnp.asarray(points), stride)
                                      * cotangent))(jnp.asarray(features))
    for b in range(batch):
        a = reference_weights(points[b], height, width, stride)
        expected = (a.T @ cotangent[b]).reshape(height, width, channels)
        np.testing.assert_allclose(np.asarray(grad[b]), expected, rtol=1e-5, atol=1e-6)


def test_bilinear_gather_gradient_wrt_keypoints_matches_finite_differences():
    features, _, stride = random_case(4, batch=1)
    height, width = features.shape[1:3]
    # Points inside the map and away from cell boundaries (fractional parts near 0.5).
    rng = np.random.default_rng(5)
    cells = np.stack([rng.integers(0, width - 1, 6), rng.integers(0, height - 1, 6)], -1)
    frac = rng.uniform(0.3, 0.7, (6, 2))
    points = ((cells + frac + 0.5) * stride - 0.5)[None].astype(np.float32)
    weights = np.random.default_rng(6).normal(size=3)
    f64 = features[0].astype(np.float64).reshape(height * width, 3)

    def reference(p):
        return np.sum(reference_weights(p, height, width, stride) @ f64 @ weights)

    grad = np.asarray(jax.grad(lambda p: jnp.sum(
        kp.bilinear_gather(jnp.asarray(features), p, stride) @ weights))(jnp.asarray(points)))[0]
    eps = 1e-4
    numeric = np.zeros((6, 2))
    for n in range(6):
        for d in range(2):
            step = np.zeros((6, 2))
            step[n, d] = eps
            numeric[n, d] = (reference(points[0] + step) - reference(points[0] - step)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_bilinear_gather_matches_torch_grid_sample():
    torch = pytest.importorskip("torch")
    features, points, stride = random_case(7, batch=2, height=5, width=7)
    _, height, width, _ = features.shape
    # Normalised grid coordinates for align_corners=False: -1 and +1 are the outer
    # edges of the input image, W_in = W_feat * stride pixels wide.
    grid = np.stack([2 * (points[..., 0] + 0.5) / (width * stride) - 1,
                     2 * (points[..., 1] + 0.5) / (height * stride) - 1], -1)
    out = torch.nn.functional.grid_sample(
        torch.from_numpy(features).permute(0, 3, 1, 2),
        torch.from_numpy(grid[:, None].astype(np.float32)),
        mode="bilinear", padding_mode="zeros", align_corners=False)   # [B, C, 1, N]
    expected = out[:, :, 0].permute(0, 2, 1).numpy()
    got = np.asarray(kp.bilinear_gather(jnp.asarray(features), jnp.asarray(points), stride))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bilinear_gather_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feature_map"):
        kp.bilinear_gather(jnp.zeros((4, 4, 3)), jnp.zeros((1, 2, 2)), 4.0)
    with pytest.raises(ValueError, match="batch"):
        kp.bilinear_gather(jnp.zeros((2, 4, 4, 3)), jnp.zeros((1, 2, 2)), 4.0)


def reference_resample(polyline, k) -> np.ndarray:
    """float64 arc-length resampling with np.interp."""
    polyline = np.asarray(polyline, np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(polyline, axis=0), axis=1))])
    targets = np.linspace(0.0, cumulative[-1], k)
    return np.stack([np.interp(targets, cumulative, polyline[:, 0]),
                     np.interp(targets, cumulative, polyline[:, 1])], -1)


def kneel16_points(rng) -> np.ndarray:
    """Points on two arcs: femur condyles (7) above, tibial plateau (9) below."""
    femur_angle = np.sort(rng.uniform(0.2, np.pi - 0.2, 7))[::-1]
    femur = np.stack([100 + 60 * np.cos(femur_angle), 120 + 40 * np.sin(femur_angle)], -1)
    tibia_x = np.sort(rng.uniform(30, 170, 9))
    tibia = np.stack([tibia_x, 180 + 0.002 * (tibia_x - 100) ** 2], -1)
    return np.concatenate([femur, tibia]).astype(np.float32)


@pytest.mark.slow
def test_densify_matches_interp_reference_and_keeps_ends():
    rng = np.random.default_rng(8)
    points = np.stack([kneel16_points(rng) for _ in range(3)])      # [3, 16, 2]
    k = 6
    dense = np.asarray(kp.densify(jnp.asarray(points), kp.KNEEL16, k))
    assert dense.shape == (3, 4 * k, 2)
    for b in range(3):
        for c, compartment in enumerate(kp.COMPARTMENTS):
            polyline = points[b, list(kp.KNEEL16.compartments[compartment])]
            block = dense[b, c * k:(c + 1) * k]
            np.testing.assert_allclose(block, reference_resample(polyline, k), atol=1e-3)
            np.testing.assert_allclose(block[0], polyline[0], atol=1e-4)
            np.testing.assert_allclose(block[-1], polyline[-1], atol=1e-3)


@pytest.mark.slow
def test_densify_spacing_on_a_straight_line_and_a_curve():
    line = np.stack([np.linspace(0, 90, 16) ** 1.5 / 10, np.full(16, 7.0)], -1)  # uneven input
    dense = np.asarray(kp.densify(jnp.asarray(line, jnp.float32), kp.KNEEL16, 8))
    for c in range(4):
        block = dense[c * 8:(c + 1) * 8]
        steps = np.linalg.norm(np.diff(block, axis=0), axis=1)
        np.testing.assert_allclose(steps, steps.mean(), rtol=1e-4)
        np.testing.assert_allclose(block[:, 1], 7.0)
    # A circle sampled finely: chords between resampled points are equal too.
    angle = np.linspace(0, np.pi / 2, 16) ** 2 / (np.pi / 2)   # uneven along the arc
    circle = np.stack([50 * np.cos(angle), 50 * np.sin(angle)], -1)
    dense = np.asarray(kp.densify(jnp.asarray(circle, jnp.float32), kp.KNEEL16, 5))
    for c, compartment in enumerate(kp.COMPARTMENTS):
        block = dense[c * 5:(c + 1) * 5]
        np.testing.assert_allclose(
            block, reference_resample(circle[list(kp.KNEEL16.compartments[compartment])], 5),
            atol=1e-3)


def test_densify_degenerate_and_invalid_input():
    # Repeated points (a zero-length segment) stay finite.
    points = kneel16_points(np.random.default_rng(9))
    points[1] = points[0]
    dense = np.asarray(kp.densify(jnp.asarray(points), kp.KNEEL16, 4))
    assert np.all(np.isfinite(dense))
    with pytest.raises(ValueError, match="k must be >= 2"):
        kp.densify(jnp.asarray(points), kp.KNEEL16, 1)
    with pytest.raises(ValueError, match="16, 2"):
        kp.densify(jnp.zeros((15, 2)), kp.KNEEL16, 4)


def test_schemas():
    assert kp.KNEEL16.num_points == 16
    assert kp.KNEEL16.indices_for_task("kl") == tuple(range(16))
    assert kp.KNEEL16.indices_for_task("ost_tibia_medial") == (11, 12, 13, 14, 15)
    dense = kp.get_schema("kneel16_dense8")
    assert dense.num_points == 32 and dense.compartments["TL"] == tuple(range(16, 24))
    with pytest.raises(ValueError, match="unknown keypoint schema"):
        kp.get_schema("kneel17")
    with pytest.raises(ValueError, match="indices outside"):
        kp.KeypointSchema("bad", ("a", "b"), {c: (0, 2) for c in kp.COMPARTMENTS}, {})


def test_flip_horizontal():
    points = np.array([[[0.0, 1.0], [9.0, 2.0], [4.5, 3.0]]])
    flipped = kp.flip_horizontal(points, width=10)
    np.testing.assert_array_equal(flipped[0, :, 0], [9.0, 0.0, 4.5])
    np.testing.assert_array_equal(flipped[..., 1], points[..., 1])
    np.testing.assert_array_equal(kp.flip_horizontal(flipped, width=10), points)


def test_validate_keypoints():
    points = kneel16_points(np.random.default_rng(10))
    assert kp.validate_keypoints(points).dtype == np.float32
    with pytest.raises(ValueError, match="pts: expected"):
        kp.validate_keypoints(points[:15], name="pts")
    bad = points.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"pts: keypoint \(3,\)"):
        kp.validate_keypoints(bad, name="pts")
    with pytest.raises(ValueError, match="outside the 64x64 image"):
        kp.validate_keypoints(points * 10, image_shape=(64, 64))
    kp.validate_keypoints(points, image_shape=(256, 256))
    # Inside, on the edge (within the tolerance) and just past it.
    edge = np.zeros((16, 2), np.float32)
    edge[0] = (63 + kp.OUTSIDE_TOLERANCE_PX, 0)
    kp.validate_keypoints(edge, image_shape=(64, 64))
    edge[5] = (10, -kp.OUTSIDE_TOLERANCE_PX - 0.5)
    with pytest.raises(ValueError, match=r"keypoint 5 at \(10\.0, -2\.5\) lies outside"):
        kp.validate_keypoints(edge, image_shape=(64, 64))


@pytest.mark.slow
def test_densify_gradient_finite_with_coinciding_points():
    import jax
    import jax.numpy as jnp

    from kpn_jax import keypoints as kp_lib

    points = jnp.asarray(np.random.default_rng(0).uniform(0, 50, (16, 2)), jnp.float32)
    points = points.at[1].set(points[0])  # a zero-length segment
    grad = jax.grad(lambda p: kp_lib.densify(p, kp_lib.KNEEL16, 6).sum())(points)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_roi_to_source_inverts_crop_and_resize():
    from kpn_jax import roi as roi_lib

    rng = np.random.default_rng(0)
    points = rng.uniform(20, 180, size=(16, 2))
    for center, roi_size, out_size in (((100.0, 90.0), 80.0, 48), ((50.5, 120.0), 200.0, 320)):
        _, in_roi = roi_lib.crop_and_resize(np.zeros((200, 220)), points, center, roi_size,
                                            out_size)
        back = roi_lib.roi_to_source(in_roi, center, roi_size, out_size)
        np.testing.assert_allclose(back, points, atol=1e-3)
