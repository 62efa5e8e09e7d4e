"""Training-recipe options: cosine schedule with warm-up, label smoothing, a moving average of
the weights, mirrored knees in training and evaluation (grades without a side), mixup."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax import augment, evaluate, losses, train, trainer


def _config(**fields):
    from configs import default

    config = default.get_config()
    for dotted, value in fields.items():
        target = config
        *parents, last = dotted.split(".")
        for part in parents:
            target = target[part]
        target[last] = value
    return config


def test_cosine_schedule_with_warm_up_matches_its_formula():
    config = _config(lr_schedule="cosine", lr_warmup_epochs=2.0, num_epochs=10,
                     learning_rate=1e-3)
    steps_per_epoch, warmup, total = 5, 10, 50
    for step in (0, 3, 10, 20, 35, 50):
        if step < warmup:
            want = 1e-3 * step / warmup
        else:
            want = 1e-3 * 0.5 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))
        assert train.learning_rate_at(config, steps_per_epoch, step) == pytest.approx(want, abs=1e-9)
    plain = _config(lr_schedule="cosine", num_epochs=10, learning_rate=1e-3)
    assert train.learning_rate_at(plain, 5, 0) == pytest.approx(1e-3)
    assert train.learning_rate_at(plain, 5, 25) == pytest.approx(5e-4)


def test_step_schedule_is_unchanged():
    config = _config(learning_rate=1e-3, lr_decay_epochs=(2, 4), lr_decay_factor=0.5)
    assert [train.learning_rate_at(config, 10, s) for s in (0, 19, 20, 39, 40)] == pytest.approx(
        [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])


def test_label_smoothing_matches_float64():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (12, 5))
    labels = rng.integers(-1, 5, 12)
    weights = rng.uniform(0.5, 2.0, 5)
    e = 0.1
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    present = labels >= 0
    target = np.full((12, 5), e / 5)
    target[np.arange(12), np.maximum(labels, 0)] += 1 - e
    per_example = -(target * log_p).sum(-1)
    w = np.where(present, weights[np.maximum(labels, 0)], 0.0)
    want = (w * per_example).sum() / w.sum()
    got = losses.weighted_cross_entropy(logits.astype(np.float32), labels,
                                        weights.astype(np.float32), label_smoothing=e)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(
        float(losses.weighted_cross_entropy(logits.astype(np.float32), labels, None, 0.0)),
        float(losses.weighted_cross_entropy(logits.astype(np.float32), labels)))


def test_soft_ordinal_labels_match_float64():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (12, 5))
    labels = rng.integers(-1, 5, 12)
    labels[:2] = (-1, 2)
    weights = rng.uniform(0.5, 2.0, 5)
    present = labels >= 0
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    w = np.where(present, weights[np.maximum(labels, 0)], 0.0)
    for sigma, e in ((0.4, 0.0), (0.7, 0.1)):
        closeness = np.exp(-(np.arange(5)[None, :] - np.maximum(labels, 0)[:, None]) ** 2
                           / (2 * sigma ** 2))
        target = (1 - e) * closeness / closeness.sum(-1, keepdims=True) + e / 5
        want = (w * -(target * log_p).sum(-1)).sum() / w.sum()
        got = losses.weighted_cross_entropy(logits.astype(np.float32), labels,
                                            weights.astype(np.float32), label_smoothing=e,
                                            ordinal_label_sigma=sigma)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # sigma 0.4 keeps on a middle grade what label smoothing 0.1 keeps, on its neighbours.
    middle = np.asarray(losses.ordinal_targets(jnp.asarray([2]), 5, 0.4))[0]
    np.testing.assert_allclose(middle, [0, 0.04, 0.92, 0.04, 0], atol=0.005)
    with pytest.raises(ValueError, match="ordinal_label_sigma must be a number >= 0"):
        train.validate_config(_config(ordinal_label_sigma=-0.5))
    with pytest.raises(ValueError, match="ordinal_label_sigma must be a number >= 0"):
        train.validate_config(_config(ordinal_label_sigma=float("inf")))


def test_mixup_loss_is_cross_entropy_against_mixed_smoothed_targets_in_float64():
    rng = np.random.default_rng(1)
    batch, e, lam = 10, 0.1, 0.3
    logits = rng.normal(0, 2, (batch, 5))
    grades = np.full((batch, 7), -1)
    grades[:, 0] = rng.integers(0, 5, batch)
    permutation = rng.permutation(batch)
    labeled = np.ones(batch, bool)
    got, metrics = losses.mixup_loss(
        lambda g, m: losses.total_loss({"kl": jnp.asarray(logits, jnp.float32)}, g, None,
                                       labeled_mask=m, tasks=("kl",), label_smoothing=e),
        jnp.asarray(grades), jnp.asarray(labeled), jnp.float32(lam), jnp.asarray(permutation))

    def smoothed(labels):
        target = np.full((batch, 5), e / 5)
        target[np.arange(batch), labels] += 1 - e
        return target

    target = lam * smoothed(grades[:, 0]) + (1 - lam) * smoothed(grades[permutation, 0])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -(target * log_p).sum(-1).mean()
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["cls/kl"]), want, rtol=1e-5)


def test_mixup_blends_each_image_with_its_partner():
    images = jnp.asarray(np.random.default_rng(2).uniform(0, 1, (6, 4, 4, 1)), jnp.float32)
    lam, permutation = augment.mixup_params(jax.random.PRNGKey(0), 6, alpha=0.4)
    assert 0.0 <= float(lam) <= 1.0
    assert sorted(np.asarray(permutation).tolist()) == list(range(6))
    mixed = np.asarray(augment.mix_images(images, lam, permutation))
    x = np.asarray(images, np.float64)
    np.testing.assert_allclose(mixed, float(lam) * x + (1 - float(lam)) * x[np.asarray(permutation)],
                               rtol=1e-6, atol=1e-6)
    draws = [float(augment.mixup_params(jax.random.PRNGKey(k), 6, alpha=0.4)[0]) for k in range(200)]
    # Beta(0.4, 0.4) is symmetric about 1/2 with most of its mass near 0 and 1.
    assert abs(np.mean(draws) - 0.5) < 0.08
    assert np.mean([min(d, 1 - d) < 0.2 for d in draws]) > 0.4
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        augment.mixup_params(jax.random.PRNGKey(0), 6, alpha=0.0)


def test_mixup_is_refused_where_a_blend_has_no_meaning():
    global_kl = {"tasks": ("kl",), "coherence.enabled": False, "model.pooling": "global"}
    train.validate_config(_config(mixup_alpha=0.2, **global_kl))
    with pytest.raises(ValueError, match="mixup_alpha must be a number >= 0"):
        train.validate_config(_config(mixup_alpha=-0.1, **global_kl))
    with pytest.raises(ValueError, match="mixup_alpha needs config.model.pooling='global'"):
        train.validate_config(_config(mixup_alpha=0.2, **{**global_kl, "model.pooling": "keypoints"}))
    with pytest.raises(ValueError, match="coherence.enabled=False"):
        train.validate_config(_config(mixup_alpha=0.2, **{"model.pooling": "global"}))


class _State:
    def __init__(self, step, params, batch_stats, ema):
        self.step, self.params, self.batch_stats, self.ema = step, params, batch_stats, ema

    def replace(self, **changes):
        fields = dict(step=self.step, params=self.params, batch_stats=self.batch_stats,
                      ema=self.ema)
        fields.update(changes)
        return _State(**fields)


def test_moving_average_of_the_weights_follows_its_formula():
    params = {"w": jnp.asarray([1.0, 2.0])}
    stats = {"mean": jnp.asarray([4.0])}
    ema = {"params": {"w": jnp.asarray([0.0, 0.0])}, "batch_stats": {"mean": jnp.asarray([0.0])}}
    for step, decay in ((0, 0.1), (100, 0.9)):    # early: (1 + t) / (10 + t) is smaller
        state = _State(jnp.asarray(step, jnp.int32), params, stats, ema)
        updated = trainer.update_ema(state, 0.9)
        np.testing.assert_allclose(updated.ema["params"]["w"], (1 - decay) * np.array([1.0, 2.0]),
                                   rtol=1e-6)
        np.testing.assert_allclose(updated.ema["batch_stats"]["mean"], [(1 - decay) * 4.0],
                                   rtol=1e-6)
        assert trainer.eval_variables(updated) is updated.ema
    assert trainer.eval_variables(_State(0, params, stats, None)) == {"params": params,
                                                                      "batch_stats": stats}


def test_sgd_follows_torchs_nesterov_sgd_with_weight_decay_in_float64():
    # torch.optim.SGD(momentum=mu, nesterov=True, weight_decay=wd), dampening 0:
    #   g += wd * w;  b = mu * b + g;  w -= lr_t * (g + mu * b)
    config = _config(optimizer="sgd", momentum=0.9, weight_decay=5e-4, learning_rate=0.05,
                     lr_schedule="cosine", lr_warmup_epochs=1.0, num_epochs=4)
    train.validate_config(config)
    steps_per_epoch = 3
    tx = train.make_optimizer(config, steps_per_epoch)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(8)]
    params = jnp.asarray(w, jnp.float32)
    opt_state = tx.init(params)
    buf = np.zeros_like(w)
    for step, grad in enumerate(grads):
        g = grad + 5e-4 * w
        buf = 0.9 * buf + g
        w = w - train.learning_rate_at(config, steps_per_epoch, step) * (g + 0.9 * buf)
        updates, opt_state = tx.update(jnp.asarray(grad, jnp.float32), opt_state, params)
        params = params + updates
    np.testing.assert_allclose(np.asarray(params), w, rtol=1e-5, atol=1e-6)


def test_optimizer_typos_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="config.optimizer must be one of"):
        train.validate_config(_config(optimizer="sgdm"))
    with pytest.raises(ValueError, match="config.momentum"):
        train.validate_config(_config(optimizer="sgd", momentum=1.0))
    with pytest.raises(ValueError, match="weight_decay_style"):
        train.validate_config(_config(optimizer="sgd", weight_decay_style="decoupled"))
    with pytest.raises(ValueError, match=r"config.augment.contrast must be in \[0, 1\)"):
        train.validate_config(_config(**{"augment.contrast": 1.5}))


def test_mirroring_is_refused_for_grades_with_a_side():
    for field in ("augment.hflip", "eval_hflip"):
        with pytest.raises(ValueError, match=f"config.{field} mirrors knees"):
            train.validate_config(_config(**{field: True, "coherence.enabled": False}))
        train.validate_config(_config(**{field: True, "coherence.enabled": False,
                                         "tasks": ("kl",)}))
    with pytest.raises(ValueError, match="lr_warmup_epochs needs"):
        train.validate_config(_config(lr_warmup_epochs=1.0))
    with pytest.raises(ValueError, match="ema_decay"):
        train.validate_config(_config(ema_decay=1.0))


def test_mirrored_evaluation_averages_a_knee_and_its_mirror():
    from kpn_jax.models import kpn

    model = kpn.create_model("keypoints", depth=18, width=8, tasks=("kl",))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 64, 64, 1)).astype(np.uint8)
    keypoints = rng.uniform(10, 50, (2, 16, 2)).astype(np.float32)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1)),
                           jnp.full((1, 16, 2), 32.0), train=False)
    batch = {"image": images, "keypoints": keypoints}
    pred, probabilities = evaluate.make_eval_step(model, ("kl",), hflip=True)(variables, batch)

    def kl_probabilities(image, points):
        out = model.apply(variables, jnp.asarray(image, jnp.float32) / 255.0, points, train=False)
        return jax.nn.softmax(out["kl"], axis=-1)

    mirrored_points = keypoints.copy()
    mirrored_points[..., 0] = 63 - keypoints[..., 0]
    want = (kl_probabilities(images, keypoints)
            + kl_probabilities(images[:, :, ::-1], mirrored_points)) / 2
    np.testing.assert_allclose(probabilities[:, :5], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred[:, 0], np.argmax(want, axis=-1))
