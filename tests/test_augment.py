"""Tests of kpn_jax.augment against scipy.ndimage and closed-form geometry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from kpn_jax import augment as aug


def _random_images(seed, shape):
    return np.random.default_rng(seed).uniform(0, 1, size=shape).astype(np.float32)


def _matrices_from(translation, angle_deg, scale, size, flip=None):
    return aug.affine_matrices(np.asarray(translation, np.float32),
                               np.deg2rad(np.asarray(angle_deg, np.float32)),
                               np.asarray(scale, np.float32), size,
                               None if flip is None else np.asarray(flip))


def _scipy_warp(image, matrix):
    """float64 reference: inverse-map every output pixel centre, map_coordinates(order=1)."""
    height, width, channels = image.shape
    inverse = np.linalg.inv(np.asarray(matrix, np.float64))
    y_out, x_out = np.mgrid[0:height, 0:width].astype(np.float64)
    homog = np.stack([x_out.ravel(), y_out.ravel(), np.ones(height * width)])
    x_in, y_in, _ = inverse @ homog
    out = np.stack([
        ndimage.map_coordinates(image[..., c].astype(np.float64), [y_in, x_in], order=1,
                                mode="constant", cval=0.0).reshape(height, width)
        for c in range(channels)], axis=-1)
    # Pixels whose source sits within float32 rounding of the input border may
    # legitimately land on either side of the hard 'constant' edge.
    eps = 1e-3
    ambiguous = ((np.abs(x_in) < eps) | (np.abs(x_in - (width - 1)) < eps)
                 | (np.abs(y_in) < eps) | (np.abs(y_in - (height - 1)) < eps))
    return out, ambiguous.reshape(height, width)


@pytest.mark.slow
def test_warp_matches_scipy_map_coordinates():
    size = (17, 23)
    images = _random_images(0, (3, *size, 2))
    matrices = _matrices_from([[2.3, -1.7], [-4.0, 0.5], [0.0, 0.0]], [4.0, -3.3, 30.0],
                              [1.04, 0.96, 0.8], size, flip=[False, True, False])
    warped = np.asarray(aug.warp_images(jnp.asarray(images), matrices))
    for b in range(3):
        expected, ambiguous = _scipy_warp(images[b], np.asarray(matrices[b]))
        assert np.sum(~ambiguous) > 0.5 * ambiguous.size
        np.testing.assert_allclose(warped[b][~ambiguous], expected[~ambiguous], atol=2e-5)
        # The transforms move real content: the comparison is not trivially all zeros.
        assert np.mean(expected[~ambiguous] != 0) > 0.5


@pytest.mark.slow
def test_fill_value_outside():
    images = np.ones((1, 8, 8, 1), np.float32)
    matrices = _matrices_from([[3.0, 0.0]], [0.0], [1.0], (8, 8))  # content moves 3 px right
    warped = np.asarray(aug.warp_images(images, matrices, fill_value=-2.0))
    np.testing.assert_array_equal(warped[0, :, :3, 0], -2.0)
    np.testing.assert_array_equal(warped[0, :, 3:, 0], 1.0)


@pytest.mark.slow
def test_identity_params_return_input_exactly():
    images = _random_images(1, (2, 12, 9, 3))
    keypoints = np.random.default_rng(2).uniform(-3, 12, size=(2, 5, 2)).astype(np.float32)
    matrices = aug.random_affine_params(jax.random.key(0), 2, 0.0, 0.0, (1.0, 1.0), image_size=(12, 9))
    np.testing.assert_array_equal(np.asarray(matrices), np.broadcast_to(np.eye(3), (2, 3, 3)))
    np.testing.assert_array_equal(np.asarray(aug.warp_images(images, matrices)), images)
    np.testing.assert_array_equal(np.asarray(aug.warp_keypoints(keypoints, matrices)), keypoints)
    out_images, out_keypoints = aug.augment(jax.random.key(3), images, keypoints, max_translation_px=0,
                                            max_rotation_deg=0, scale_range=(1, 1))
    np.testing.assert_array_equal(np.asarray(out_images), images)
    np.testing.assert_array_equal(np.asarray(out_keypoints), keypoints)


def _blob_image(size, centre, sigma=1.8):
    height, width = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma ** 2))


def _centroid(image):
    height, width = image.shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    total = image.sum()
    return np.array([(image * x).sum() / total, (image * y).sum() / total])


@pytest.mark.slow
@pytest.mark.parametrize("hflip", [False, True])
def test_keypoints_follow_the_image(hflip):
    size = (48, 56)
    centres = np.array([[20.3, 17.6], [33.8, 29.1], [24.0, 22.5], [30.2, 20.7]], np.float32)
    images = np.stack([_blob_image(size, c) for c in centres])[..., None].astype(np.float32)
    keypoints = centres[:, None, :]
    # Strong transforms so a wrong sign or centre would move the blob by pixels.
    out_images, out_keypoints = aug.augment(jax.random.key(7), images, keypoints, max_translation_px=6,
                                            max_rotation_deg=25, scale_range=(0.8, 1.2), hflip=hflip)
    out_images, out_keypoints = np.asarray(out_images), np.asarray(out_keypoints)
    moved = np.linalg.norm(out_keypoints[:, 0] - keypoints[:, 0], axis=-1)
    assert np.all(moved > 1.0)
    for b in range(len(centres)):
        np.testing.assert_allclose(_centroid(out_images[b, ..., 0].astype(np.float64)),
                                   out_keypoints[b, 0], atol=0.05)


def _decompose(matrices, size):
    """Recover translation, angle (deg), scale, flip from [B, 3, 3] built about the centre."""
    height, width = size
    m = np.asarray(matrices, np.float64)
    det = np.linalg.det(m[:, :2, :2])
    flip = det < 0
    linear = m[:, :2, :2].copy()
    linear[flip, :, 0] *= -1  # undo the mirror's x sign
    scale = np.sqrt(np.abs(det))
    angle = np.rad2deg(np.arctan2(linear[:, 1, 0], linear[:, 0, 0]))
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    # The centre (mirrored onto itself) goes to centre + t.
    translation = np.einsum("bij,j->bi", m[:, :2, :2], centre) + m[:, :2, 2] - centre
    return translation, angle, scale, flip


def test_parameter_ranges_respected():
    size = (320, 320)
    matrices = aug.random_affine_params(jax.random.key(11), 4000, 10.0, 5.0, (0.95, 1.05), image_size=size)
    assert matrices.shape == (4000, 3, 3) and matrices.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(matrices[:, 2]), np.broadcast_to([0, 0, 1], (4000, 3)))
    translation, angle, scale, flip = _decompose(matrices, size)
    assert not flip.any()
    tol = 1e-3
    assert np.all(np.abs(translation) <= 10 + tol) and np.all(np.abs(angle) <= 5 + tol)
    assert np.all((scale >= 0.95 - 1e-5) & (scale <= 1.05 + 1e-5))
    # The draws fill the ranges (uniform), not a sliver of them.
    assert translation.min() < -9.5 and translation.max() > 9.5
    assert angle.min() < -4.8 and angle.max() > 4.8
    assert scale.min() < 0.955 and scale.max() > 1.045
    assert abs(np.mean(angle)) < 0.3 and abs(np.mean(translation)) < 0.5


def test_hflip_draws_half_mirrors():
    size = (32, 40)
    matrices = aug.random_affine_params(jax.random.key(5), 2000, 0.0, 0.0, (1.0, 1.0),
                                        image_size=size, hflip=True)
    _, _, _, flip = _decompose(matrices, size)
    assert 0.45 < flip.mean() < 0.55
    # A mirror with zero ranges is exactly x -> (W - 1) - x.
    mirrored = np.asarray(matrices)[flip]
    np.testing.assert_allclose(mirrored[0], [[-1, 0, 39], [0, 1, 0], [0, 0, 1]], atol=1e-5)


def test_deterministic_for_fixed_rng_and_differs_across_keys():
    images = _random_images(4, (3, 16, 16, 1))
    keypoints = np.random.default_rng(5).uniform(2, 14, size=(3, 4, 2)).astype(np.float32)
    kwargs = dict(max_translation_px=3, max_rotation_deg=5, scale_range=(0.95, 1.05))
    first = aug.augment(jax.random.key(9), images, keypoints, **kwargs)
    second = aug.augment(jax.random.key(9), images, keypoints, **kwargs)
    other = aug.augment(jax.random.key(10), images, keypoints, **kwargs)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(first[1]), np.asarray(other[1]))
    # Each example gets its own draw.
    shifts = np.asarray(first[1]) - keypoints
    assert not np.allclose(shifts[0], shifts[1])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jit_and_dtypes(dtype):
    images = jnp.asarray(_random_images(6, (2, 20, 24, 1)), dtype)
    keypoints = jnp.asarray(np.random.default_rng(7).uniform(3, 17, size=(2, 6, 2)), jnp.float32)

    @jax.jit
    def step(rng, images, keypoints):
        return aug.augment(rng, images, keypoints, max_translation_px=2.0, max_rotation_deg=5.0,
                           scale_range=(0.95, 1.05))

    out_images, out_keypoints = step(jax.random.key(1), images, keypoints)
    assert out_images.dtype == dtype and out_images.shape == images.shape
    assert out_keypoints.dtype == jnp.float32 and out_keypoints.shape == keypoints.shape
    eager_images, eager_keypoints = aug.augment(jax.random.key(1), images, keypoints, max_translation_px=2.0,
                                                max_rotation_deg=5.0, scale_range=(0.95, 1.05))
    np.testing.assert_allclose(np.asarray(out_keypoints), np.asarray(eager_keypoints), atol=1e-4)
    atol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out_images, np.float32), np.asarray(eager_images, np.float32),
                               atol=atol)
    # bfloat16 only rounds the stored values: the warp itself matches float32.
    matrices = aug.random_affine_params(jax.random.key(1), 2, 2.0, 5.0, (0.95, 1.05), image_size=(20, 24))
    reference = aug.warp_images(images.astype(jnp.float32), matrices)
    np.testing.assert_allclose(np.asarray(out_images, np.float32), np.asarray(reference), atol=atol)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_translation_px=-1, max_rotation_deg=5, scale_range=(0.9, 1.1)), "max_translation_px"),
    (dict(max_translation_px=1, max_rotation_deg=float("nan"), scale_range=(0.9, 1.1)), "max_rotation_deg"),
    (dict(max_translation_px=1, max_rotation_deg=5, scale_range=(1.1, 0.9)), "scale_range"),
    (dict(max_translation_px=1, max_rotation_deg=5, scale_range=(0.0, 1.0)), "scale_range"),
])
def test_bad_ranges_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        aug.augment(jax.random.key(0), np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 2, 2), np.float32),
                    **kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="images"):
        aug.warp_images(np.zeros((4, 4, 1), np.float32), np.eye(3)[None])
    with pytest.raises(ValueError, match="floating"):
        aug.warp_images(np.zeros((1, 4, 4, 1), np.uint8), np.eye(3)[None])
    with pytest.raises(ValueError, match="matrices"):
        aug.warp_keypoints(np.zeros((2, 3, 2), np.float32), np.eye(3)[None])


# ----------------------------------------------------------------------------- grey levels


def test_intensity_adjustment_matches_float64():
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, size=(3, 9, 7, 1)).astype(np.float32)
    exponent = np.array([0.7, 1.0, 1.4], np.float32)
    factor = np.array([1.3, 0.8, 1.0], np.float32)
    offset = np.array([0.1, -0.05, 0.0], np.float32)
    got = aug.adjust_intensity(jnp.asarray(images), jnp.asarray(exponent),
                                   jnp.asarray(factor), jnp.asarray(offset))
    x = images.astype(np.float64) ** exponent[:, None, None, None].astype(np.float64)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    want = np.clip((x - mean) * factor[:, None, None, None] + mean + offset[:, None, None, None],
                   0, 1)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
    assert np.asarray(got).min() >= 0 and np.asarray(got).max() <= 1


def test_intensity_parameters_stay_in_their_ranges_and_zero_ranges_change_nothing():
    exponent, factor, offset = aug.random_intensity_params(
        jax.random.PRNGKey(3), 4000, contrast=0.2, brightness=0.1, gamma=0.3)
    assert np.exp(-0.3) - 1e-6 <= float(exponent.min()) < 0.8 and 1.3 < float(exponent.max()) <= np.exp(0.3) + 1e-6
    assert 0.8 <= float(factor.min()) < 0.81 and 1.19 < float(factor.max()) <= 1.2
    assert -0.1 <= float(offset.min()) < -0.09 and 0.09 < float(offset.max()) <= 0.1
    images = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (2, 5, 5, 1)), jnp.float32)
    assert aug.augment_intensity(jax.random.PRNGKey(0), images) is images
    changed = aug.augment_intensity(jax.random.PRNGKey(0), images, contrast=0.2)
    assert not np.allclose(np.asarray(changed), np.asarray(images))
    with pytest.raises(ValueError, match=r"augment.gamma must be in \[0, inf\)"):
        aug.augment_intensity(jax.random.PRNGKey(0), images, gamma=-0.1)
    with pytest.raises(ValueError, match=r"augment.contrast must be in \[0, 1\)"):
        aug.augment_intensity(jax.random.PRNGKey(0), images, contrast=1.0)
