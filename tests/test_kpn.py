"""kpn_jax.models.kpn: keypoint pooling heads, the global-pooling baseline, create_model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax import grades
from kpn_jax.keypoints import KNEEL16, densify, get_schema
from kpn_jax.models.kpn import (GlobalPoolNet, KPN, create_model, normalize_images)
from kpn_jax.models.resnet import ResNet

SIZE = 64  # small images: layer3 is 4x4, layer2 8x8
SMALL = dict(depth=18, width=8)  # layer3 has 32 channels, layer2 16


def jit_init(model, *args, seed=0):
    """``model.init`` compiled as one program with an ``rbg`` key.

    Initialising op by op compiles every parameter shape's random sampler
    separately, and threefry's sampler is slow to compile on CPU; this keeps
    the tests fast without changing what is tested (shapes, distributions).
    """
    return jax.jit(model.init)(jax.random.key(seed, impl="rbg"), *args)


def random_inputs(seed=0, batch=2, size=SIZE, n=KNEEL16.num_points):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, (batch, size, size, 1)).astype(np.float32)
    keypoints = rng.uniform(3.0, size - 4.0, (batch, n, 2)).astype(np.float32)
    return jnp.asarray(images), jnp.asarray(keypoints)


def gather_ref(feature_map, points, stride):
    """float64 bilinear sampling, ``[H, W, C]`` at ``[N, 2]`` -> ``[N, C]``.

    Pixel centre x sits at feature coordinate (x + 0.5) / stride - 0.5
    (grid_sample, align_corners=False); corners outside the map read zero.
    """
    feature_map = np.asarray(feature_map, np.float64)
    height, width, channels = feature_map.shape
    out = np.zeros((len(points), channels))
    for n, (x, y) in enumerate(np.asarray(points, np.float64)):
        u, v = (x + 0.5) / stride - 0.5, (y + 0.5) / stride - 0.5
        for j in (int(np.floor(u)), int(np.floor(u)) + 1):
            for i in (int(np.floor(v)), int(np.floor(v)) + 1):
                if 0 <= i < height and 0 <= j < width:
                    out[n] += (1 - abs(u - j)) * (1 - abs(v - i)) * feature_map[i, j]
    return out


def backbone_stages(variables):
    """Stage names present in a model's backbone, e.g. ``['layer1', 'layer2', 'layer3']``."""
    return sorted({name.split("_")[0] for name in variables["params"]["backbone"]
                   if name.startswith("layer")})


def backbone_maps(variables, images, input_mode="repeat"):
    """The backbone's feature maps, run on its own from the KPN's variables."""
    backbone = {"params": variables["params"]["backbone"],
                "batch_stats": variables["batch_stats"]["backbone"]}
    last_stage = backbone_stages(variables)[-1]
    return ResNet(SMALL["depth"], width=SMALL["width"], last_stage=last_stage).apply(
        backbone, normalize_images(images, input_mode))


# ---------------------------------------------------------------------------
# shapes and parameters


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["concat", "mean"])
def test_output_and_head_shapes(aggregation):
    images, keypoints = random_inputs()
    model = KPN(**SMALL, aggregation=aggregation)
    variables = jit_init(model, images, keypoints)
    out = model.apply(variables, images, keypoints)
    assert set(out) == set(grades.TASKS)
    for task in grades.TASKS:
        assert out[task].shape == (2, grades.NUM_CLASSES[task]) and out[task].dtype == jnp.float32
        n_points = len(KNEEL16.indices_for_task(task))
        fan_in = n_points * 32 if aggregation == "concat" else 32
        assert variables["params"][f"head_{task}"]["kernel"].shape == (
            fan_in, grades.NUM_CLASSES[task])
    if aggregation == "concat":  # all 16 points; FL 4 points, TL 5 points
        assert variables["params"]["head_kl"]["kernel"].shape[0] == 16 * 32
        assert variables["params"]["head_ost_femur_lateral"]["kernel"].shape[0] == 4 * 32
        assert variables["params"]["head_ost_tibia_lateral"]["kernel"].shape[0] == 5 * 32
    assert set(variables["params"]) == {"backbone"} | {f"head_{t}" for t in grades.TASKS}
    assert "fc" not in variables["params"]["backbone"]


@pytest.mark.slow
@pytest.mark.parametrize("feature_layer", ["layer2", "layer3", "layer4"])
def test_backbone_stops_at_the_feature_layer(feature_layer):
    images, keypoints = random_inputs()
    model = KPN(**SMALL, feature_layer=feature_layer)
    variables = jit_init(model, images, keypoints)
    last = int(feature_layer[-1])
    expected = [f"layer{k}" for k in range(1, last + 1)]
    assert backbone_stages(variables) == expected
    assert sorted({n.split("_")[0] for n in variables["batch_stats"]["backbone"]
                   if n.startswith("layer")}) == expected
    # Names of everything kept are the full ResNet's.
    full = jax.eval_shape(ResNet(**SMALL).init, jax.random.key(0),
                          normalize_images(images, "repeat"))
    for collection in ("params", "batch_stats"):
        kept = {k: v for k, v in full[collection].items()
                if not k.startswith("layer") or int(k[5]) <= last}
        assert (jax.tree.structure(variables[collection]["backbone"])
                == jax.tree.structure(kept))

    # Nothing is dead: every parameter, backbone included, gets a gradient in training.
    def loss(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             images, keypoints, train=True, mutable=["batch_stats"])
        return sum(jnp.sum(jnp.sin(out[t])) for t in grades.TASKS)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
            if not np.any(np.asarray(g) != 0)]
    assert not dead
    # The global-pooling baseline keeps layer4.
    gvars = jit_init(GlobalPoolNet(**SMALL), images, keypoints)
    assert backbone_stages(gvars) == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.slow
def test_task_subset_and_aux_regression():
    images, keypoints = random_inputs()
    tasks = ("kl", "ost_tibia_medial")
    model = KPN(**SMALL, tasks=tasks, aux_regression=True)
    variables = jit_init(model, images, keypoints)
    out = model.apply(variables, images, keypoints)
    assert set(out) == {"kl", "ost_tibia_medial", "regression"}
    assert set(out["regression"]) == set(tasks)
    for task in tasks:
        assert out["regression"][task].shape == (2,)
        assert out["regression"][task].dtype == jnp.float32
        fan_in = len(KNEEL16.indices_for_task(task)) * 32
        assert variables["params"][f"regression_{task}"]["kernel"].shape == (fan_in, 1)

    global_model = GlobalPoolNet(**SMALL, tasks=tasks, aux_regression=True)
    gvars = jit_init(global_model, images, keypoints)
    gout = global_model.apply(gvars, images, keypoints)
    assert {t: gout["regression"][t].shape for t in tasks} == {t: (2,) for t in tasks}
    assert gvars["params"]["regression_kl"]["kernel"].shape == (64, 1)


# ---------------------------------------------------------------------------
# numerics against float64 numpy


@pytest.mark.slow
@pytest.mark.parametrize("feature_layer,stride,channels", [("layer3", 16, 32), ("layer2", 8, 16)])
def test_concat_heads_match_numpy_reference(feature_layer, stride, channels):
    """Logits = Dense(flatten(bilinear(f, c_i) for the task's points)), point-major."""
    images, keypoints = random_inputs(seed=1)
    model = KPN(**SMALL, feature_layer=feature_layer, aux_regression=True)
    variables = jit_init(model, images, keypoints)
    out = model.apply(variables, images, keypoints)
    feature_map = np.asarray(backbone_maps(variables, images)[feature_layer], np.float64)
    assert feature_map.shape[-1] == channels
    for task in grades.TASKS:
        idx = list(KNEEL16.indices_for_task(task))
        features = np.stack([gather_ref(feature_map[b], np.asarray(keypoints[b])[idx], stride)
                             .reshape(-1) for b in range(2)])
        head = variables["params"][f"head_{task}"]
        expected = features @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
        np.testing.assert_allclose(np.asarray(out[task]), expected, rtol=1e-4, atol=1e-4,
                                   err_msg=task)
        reg = variables["params"][f"regression_{task}"]
        expected_reg = (features @ np.asarray(reg["kernel"], np.float64)[:, 0]
                        + float(reg["bias"][0]))
        np.testing.assert_allclose(np.asarray(out["regression"][task]), expected_reg, rtol=1e-4,
                                   atol=1e-4, err_msg=task)


def test_mean_heads_match_numpy_reference():
    images, keypoints = random_inputs(seed=2)
    model = KPN(**SMALL, aggregation="mean")
    variables = jit_init(model, images, keypoints)
    out = model.apply(variables, images, keypoints)
    feature_map = np.asarray(backbone_maps(variables, images)["layer3"])
    for task in grades.TASKS:
        idx = list(KNEEL16.indices_for_task(task))
        features = np.stack([gather_ref(feature_map[b], np.asarray(keypoints[b])[idx], 16)
                             .mean(axis=0) for b in range(2)])
        head = variables["params"][f"head_{task}"]
        expected = features @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
        np.testing.assert_allclose(np.asarray(out[task]), expected, rtol=1e-4, atol=1e-4,
                                   err_msg=task)


def test_global_pool_net_matches_reference_and_ignores_keypoints():
    images, keypoints = random_inputs(seed=3)
    model = GlobalPoolNet(**SMALL)
    variables = jit_init(model, images, keypoints)
    out = model.apply(variables, images, keypoints)
    moved = model.apply(variables, images, keypoints[:, ::-1] * 0.5 + 7.0)
    no_points = model.apply(variables, images, None)
    pooled = np.asarray(backbone_maps(variables, images)["layer4"], np.float64).mean(axis=(1, 2))
    for task in grades.TASKS:
        head = variables["params"][f"head_{task}"]
        assert head["kernel"].shape == (64, grades.NUM_CLASSES[task])
        expected = pooled @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
        np.testing.assert_allclose(np.asarray(out[task]), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(moved[task]), np.asarray(out[task]))
        np.testing.assert_array_equal(np.asarray(no_points[task]), np.asarray(out[task]))


def test_normalize_images_matches_numpy():
    images = np.random.default_rng(0).uniform(0, 1, (2, 3, 4, 1)).astype(np.float32)
    repeated = normalize_images(jnp.asarray(images), "repeat")
    expected = (np.repeat(images, 3, -1) - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225])
    assert repeated.shape == (2, 3, 4, 3)
    np.testing.assert_allclose(np.asarray(repeated), expected, rtol=1e-5, atol=1e-6)
    single = normalize_images(jnp.asarray(images), "single")
    np.testing.assert_allclose(np.asarray(single), (images - 0.449) / 0.226, rtol=1e-5, atol=1e-6)
    assert normalize_images(jnp.asarray(images), "repeat", jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="images"):
        normalize_images(jnp.zeros((2, 3, 4, 3)))
    with pytest.raises(ValueError, match="images"):
        normalize_images(jnp.zeros((2, 3, 4, 1), jnp.uint8))
    with pytest.raises(ValueError, match="input_mode"):
        normalize_images(jnp.zeros((2, 3, 4, 1)), "rgb")


@pytest.mark.slow
def test_single_input_mode_uses_one_channel_stem():
    images, keypoints = random_inputs()
    model = KPN(**SMALL, input_mode="single")
    variables = jit_init(model, images, keypoints)
    assert variables["params"]["backbone"]["conv1"]["kernel"].shape == (7, 7, 1, 8)
    out = model.apply(variables, images, keypoints)
    assert np.all(np.isfinite(np.asarray(out["kl"])))


# ---------------------------------------------------------------------------
# which points feed which head


@pytest.mark.slow
def test_osteophyte_head_depends_only_on_its_compartment():
    images, keypoints = random_inputs(seed=4)
    model = KPN(**SMALL)
    variables = jit_init(model, images, keypoints)

    def grad_wrt_points(task):
        def f(points):
            # Weighted so no softmax-like cancellation can zero a real dependence.
            weights = jnp.arange(1.0, grades.NUM_CLASSES[task] + 1.0)
            return jnp.sum(model.apply(variables, images, points)[task] * weights)
        return np.asarray(jax.grad(f)(keypoints))

    femur_lateral = set(KNEEL16.compartments["FL"])
    assert femur_lateral == {0, 1, 2, 3}
    g = np.abs(grad_wrt_points("ost_femur_lateral")).sum(axis=-1)  # [B, N]
    for n in range(KNEEL16.num_points):
        if n in femur_lateral:
            assert np.all(g[:, n] > 0), n
        else:
            assert np.all(g[:, n] == 0), n
    # The KL head reads every point.
    assert np.all(np.abs(grad_wrt_points("kl")).sum(axis=-1) > 0)


@pytest.mark.slow
def test_densify_path_equals_densified_schema():
    images, keypoints = random_inputs(seed=5)
    k = 5
    model = KPN(**SMALL, densify_k=k)
    variables = jit_init(model, images, keypoints)
    out = model.apply(variables, images, keypoints)
    assert variables["params"]["head_kl"]["kernel"].shape == (4 * k * 32, 5)
    assert variables["params"]["head_ost_tibia_medial"]["kernel"].shape == (k * 32, 4)
    # The same variables on a model that receives already densified points.
    predensified = KPN(**SMALL, schema_name=f"kneel16_dense{k}")
    dense_points = densify(keypoints, KNEEL16, k)
    assert dense_points.shape == (2, get_schema(f"kneel16_dense{k}").num_points, 2)
    again = predensified.apply(variables, images, dense_points)
    for task in grades.TASKS:
        np.testing.assert_allclose(np.asarray(out[task]), np.asarray(again[task]), rtol=1e-6,
                                   atol=1e-6)


# ---------------------------------------------------------------------------
# errors, construction, train mode


def test_bad_inputs_and_arguments_raise():
    images, keypoints = random_inputs()
    variables = jit_init(KPN(**SMALL), images, keypoints)
    with pytest.raises(ValueError, match="keypoints"):
        KPN(**SMALL).apply(variables, images, keypoints[:, :15])
    with pytest.raises(ValueError, match="keypoints"):
        KPN(**SMALL).apply(variables, images, keypoints[:1])
    with pytest.raises(ValueError, match="images"):
        KPN(**SMALL).apply(variables, images[..., 0], keypoints)
    for kwargs, field in [(dict(tasks=("kl", "womac")), "tasks"),
                          (dict(aggregation="max"), "aggregation"),
                          (dict(feature_layer="layer5"), "feature_layer"),
                          (dict(densify_k=1), "densify_k"),
                          (dict(schema_name="bonefinder160"), "schema")]:
        with pytest.raises(ValueError, match=field):
            jit_init(KPN(**SMALL, **kwargs), images, keypoints)


def test_create_model():
    assert isinstance(create_model(**SMALL), KPN)
    model = create_model("keypoints", depth=34, width=16, densify_k=6, aggregation="mean",
                         tasks=["kl"], dtype="bfloat16")
    assert (model.depth, model.width, model.densify_k, model.tasks) == (34, 16, 6, ("kl",))
    assert model.dtype == jnp.bfloat16
    # One config can switch pooling: keypoint-only fields are dropped for 'global'.
    baseline = create_model("global", depth=18, densify_k=6, feature_layer="layer2",
                            aux_regression=True)
    assert isinstance(baseline, GlobalPoolNet) and baseline.aux_regression
    with pytest.raises(ValueError, match="pooling"):
        create_model("attention")
    with pytest.raises(ValueError, match="dropout"):
        create_model("global", dropout=0.5)
    with pytest.raises(ValueError, match="dtype"):
        create_model(dtype="float13")


@pytest.mark.slow
def test_train_mode_under_jit_updates_batch_stats():
    images, keypoints = random_inputs()
    model = KPN(**SMALL, dtype=jnp.bfloat16)
    variables = jit_init(model, images, keypoints)
    step = jax.jit(lambda v, x, c: model.apply(v, x, c, train=True, mutable=["batch_stats"]))
    out, updated = step(variables, images, keypoints)
    assert out["kl"].dtype == jnp.float32 and out["kl"].shape == (2, 5)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables["params"]))
    old = variables["batch_stats"]["backbone"]["bn1"]["mean"]
    assert not np.allclose(np.asarray(updated["batch_stats"]["backbone"]["bn1"]["mean"]),
                           np.asarray(old))


@pytest.mark.slow
def test_resnet50_kpn_jit_grad_at_320px_is_finite():
    """Acceptance: jit(grad) of the paper's model (ResNet-50, layer3, 16 points) at 320 px."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(0, 1, (2, 320, 320, 1)).astype(np.float32))
    keypoints = jnp.asarray(rng.uniform(60, 260, (2, 16, 2)).astype(np.float32))
    labels = jnp.asarray([[1, 0, 2, 3, 0, 1, 2], [4, 3, 3, 0, 1, 2, 3]], jnp.int32)
    model = KPN(depth=50)
    variables = jit_init(model, images, keypoints)
    assert variables["params"]["head_kl"]["kernel"].shape == (16 * 1024, 5)
    assert "layer4_0" not in variables["params"]["backbone"]  # stops at layer3

    def loss_fn(params, batch_stats):
        out, new_state = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                     keypoints, train=True, mutable=["batch_stats"])
        loss = 0.0
        for t, task in enumerate(grades.TASKS):
            logp = jax.nn.log_softmax(out[task])
            loss -= jnp.mean(jnp.take_along_axis(logp, labels[:, t, None], axis=1))
        return loss, new_state

    (loss, new_state), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables["params"], variables["batch_stats"])
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert float(np.abs(np.asarray(grads["head_kl"]["kernel"])).max()) > 0
    assert float(np.abs(np.asarray(grads["backbone"]["conv1"]["kernel"])).max()) > 0
    assert jax.tree.structure(new_state["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"])


def _cumulative_link_reference(score, first, gaps):
    """float64 numpy: P(grade = k) of the cumulative link model, straight from its definition
    P(grade <= k) = sigmoid(t_k - s), t_0 = first, t_k = t_{k-1} + log(1 + exp(gap_k))."""
    thresholds = np.concatenate([[first], first + np.cumsum(np.log1p(np.exp(gaps)))])
    cdf = 1.0 / (1.0 + np.exp(-(thresholds[None, :] - score[:, None])))
    cdf = np.concatenate([np.zeros((len(score), 1)), cdf, np.ones((len(score), 1))], axis=1)
    return np.diff(cdf, axis=1)


def test_cumulative_link_head_matches_its_definition_and_is_ordinal():
    from kpn_jax.models.kpn import CumulativeLinkHead

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 12)).astype(np.float32)
    head = CumulativeLinkHead(5)
    params = head.init(jax.random.PRNGKey(0), x)["params"]
    assert sorted(params) == ["first_threshold", "score", "threshold_gaps"]
    assert params["threshold_gaps"].shape == (3,) and params["score"]["kernel"].shape == (12, 1)
    # Other thresholds, and scores far out in the tails: the log-probabilities stay finite.
    for first, gaps, scale in ((-1.5, [0.54, 0.54, 0.54], 1.0), (0.3, [-3.0, 2.0, 0.1], 40.0)):
        trial = {**params, "first_threshold": jnp.float32(first),
                 "threshold_gaps": jnp.asarray(gaps, jnp.float32),
                 "score": {"kernel": params["score"]["kernel"] * scale,
                           "bias": params["score"]["bias"]}}
        log_p = np.asarray(head.apply({"params": trial}, x), np.float64)
        score = (x.astype(np.float64) @ np.asarray(trial["score"]["kernel"], np.float64)[:, 0]
                 + float(trial["score"]["bias"][0]))
        expected = _cumulative_link_reference(score, first, np.asarray(gaps, np.float64))
        assert np.all(np.isfinite(log_p))
        np.testing.assert_allclose(np.exp(log_p), expected, atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(np.exp(log_p).sum(1), 1.0, atol=1e-5)
    # Ordinal: a higher score moves probability to higher grades (stochastic dominance).
    cdf_low = np.cumsum(_cumulative_link_reference(np.array([-1.0]), -1.5, np.zeros(3)), 1)
    cdf_high = np.cumsum(_cumulative_link_reference(np.array([1.0]), -1.5, np.zeros(3)), 1)
    assert np.all(cdf_high[0, :-1] < cdf_low[0, :-1])


def test_cumulative_head_trains_through_the_usual_losses():
    """Its log-probabilities are the logits of the softmax losses: cross entropy equals the
    negative log-likelihood of the true grade, and the gradient reaches every parameter."""
    model = create_model(pooling="global", depth=18, width=4, tasks=("kl", "jsn_medial"),
                         head="cumulative")
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 32, 32, 1)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), images, None)
    outputs = model.apply(variables, images, None)
    assert outputs["kl"].shape == (4, 5) and outputs["jsn_medial"].shape == (4, 4)
    # Already normalised: log_softmax changes nothing, so a softmax cross entropy is the
    # negative log-likelihood of the cumulative link model.
    np.testing.assert_allclose(jax.nn.log_softmax(outputs["kl"]), outputs["kl"], atol=1e-5)
    labels = jnp.asarray([0, 1, 4, 2])

    def loss(params):
        out = model.apply({**variables, "params": params}, images, None)
        return -jnp.mean(jnp.take_along_axis(out["kl"], labels[:, None], 1))

    grads = jax.grad(loss)(variables["params"])["head_kl"]
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="head"):
        create_model(pooling="global", depth=18, width=4, head="ordinal").init(
            jax.random.PRNGKey(0), images, None)
