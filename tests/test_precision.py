"""Coordinate and log-density products run at full float32 precision on every backend.

At default precision TPUs round matmul inputs to bfloat16 (GPUs to TF32): a keypoint would
move ~1.5 px against its warped image, a log-density by whole units. The CPU cannot show
the rounding, so these tests read the precision each dot product asks for."""

import jax
import jax.numpy as jnp
import numpy as np

from kpn_jax import augment, gmm
from kpn_jax.models import landmarks


def _dot_precisions(fn, *args) -> list[str]:
    """The precision of every dot_general in ``fn``'s jaxpr (nested jaxprs included)."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(str(eqn.params["precision"]))
            for value in eqn.params.values():
                for sub in (value if isinstance(value, (list, tuple)) else [value]):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        visit(getattr(inner, "jaxpr", inner))

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _all_highest(precisions):
    assert precisions, "no dot product found"
    assert all("HIGHEST" in p for p in precisions), precisions


def test_augmentation_warps_keypoints_and_images_at_full_precision():
    images = jnp.zeros((2, 32, 32, 1))
    keypoints = jnp.full((2, 16, 2), 16.0)
    fn = lambda rng, im, kp: augment.augment(rng, im, kp, max_translation_px=4.0,
                                             max_rotation_deg=5.0, scale_range=(0.9, 1.1),
                                             hflip=True)
    _all_highest(_dot_precisions(fn, jax.random.PRNGKey(0), images, keypoints))


def test_gmm_log_density_at_full_precision():
    model = gmm.GMM(weights=jnp.ones(2) / 2, means=jnp.zeros((2, 29)),
                    precisions_cholesky=jnp.broadcast_to(jnp.eye(29), (2, 29, 29)))
    _all_highest(_dot_precisions(lambda x: gmm.log_prob(model, x), jnp.zeros((4, 29))))


def test_soft_argmax_coordinates_at_full_precision():
    heatmaps = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 16)), jnp.float32)
    _all_highest(_dot_precisions(lambda h: landmarks.soft_argmax(h, 4), heatmaps))


def test_matmul_precision_config_is_checked():
    import pytest
    from configs import default

    from kpn_jax import train

    config = default.get_config()
    assert config.matmul_precision == "default"
    train.validate_config(config)
    config.matmul_precision = "highest"
    train.validate_config(config)
    config.matmul_precision = "hihgest"
    with pytest.raises(ValueError, match="config.matmul_precision must be one of"):
        train.validate_config(config)
