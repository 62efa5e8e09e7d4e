"""The landmark detector: soft-argmax decoding, loss, metrics, training, detect, predict."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.compiles import train_step_compiles

from kpn_jax import landmarks_predict
from kpn_jax.models import landmarks as lm

pytestmark = pytest.mark.slow  # trains a landmark detector end to end


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


# ----------------------------------------------------------------------------- training


def _tiny_config(data_dir, num_steps: int):
    """64 px synthetic knees, a width-8 ResNet-18 trunk: a minute on a CPU."""
    from configs import landmarks as landmarks_config

    config = landmarks_config.get_config()
    config.data_dir = str(data_dir)
    config.synthetic.update(dict(image_size=64, num_train=48, num_validation=16, num_test=4,
                                 num_unlabeled=4))
    config.sources.real.batch_size = 0
    config.sources.synthetic.update(dict(batch_size=8, dev_fraction=0.25))
    config.model.update(dict(width=8, head_channels=16, input_size=0))
    config.augment.update(dict(max_translation_px=3.0, max_rotation_deg=5.0,
                               scale_range=(0.95, 1.05)))
    config.num_steps = num_steps
    config.learning_rate = 5e-3
    config.warmup_steps = 5
    config.log_every_steps = 10
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 20
    config.eval_batch_size = 16
    config.best_metric = "dev/synthetic/mean"
    config.montage_images = 4
    from data_prep import synthetic_knee

    synthetic_knee.build_for_config(config)  # as run.py does before training
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny detector trained for 40 steps, then resumed to 50: ``(config, workdir, results)``."""
    from kpn_jax import landmarks_train

    root = tmp_path_factory.mktemp("landmarks")
    workdir = root / "workdir"
    config = _tiny_config(root / "data", num_steps=40)
    # One compile of the train step per run, fresh and resumed: the carried state keeps its
    # dtypes.
    _, compiles = train_step_compiles(
        lambda: landmarks_train.train_and_evaluate_landmarks(config, str(workdir)))
    assert compiles == 1
    config.num_steps = 50  # a longer schedule: a config change the user must allow
    with pytest.raises(ValueError, match="allow_config_change"):
        landmarks_train.train_and_evaluate_landmarks(config, str(workdir))
    results, compiles = train_step_compiles(lambda: landmarks_train.train_and_evaluate_landmarks(
        config, str(workdir), allow_config_change=True))
    assert compiles == 1
    assert (workdir / "config.before_step40.json").exists()
    return config, workdir, results


def test_a_few_training_steps_reduce_the_error_on_held_out_knees(trained):
    from kpn_jax import input_pipeline, landmarks_train

    config, workdir, results = trained
    validation = results["validation/synthetic"]
    assert validation["num_images"] == 16 and validation["num_points"] == 16 * 16
    # Before training, the zero-initialised head puts every point at the image centre.
    handle = input_pipeline.open_dataset(landmarks_train._dataset_view(config, config.sources.synthetic))
    true = input_pipeline.read_field(handle.split("validation"), "keypoints")
    untrained = lm.radial_errors(np.full_like(true, (64 - 1) / 2.0), true).mean()
    assert validation["mean"] < 0.6 * untrained, (validation["mean"], untrained)
    # The dev holdout picked the checkpoint; validation was only evaluated.
    best = json.loads((workdir / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "dev/synthetic/mean"
    report = (workdir / "report" / "landmarks.md").read_text()
    assert "validation/synthetic" in report and "femur_0" in report
    assert (workdir / "report" / "landmarks_montage_validation_synthetic.png").stat().st_size > 0
    # --mode=evaluate on the same workdir gives the same numbers.
    again = landmarks_train.evaluate_landmarks(config, str(workdir))
    assert again["validation/synthetic"]["mean"] == pytest.approx(validation["mean"], abs=1e-4)


def test_training_resumes_from_the_latest_checkpoint(trained):
    _, workdir, _ = trained
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    # 40 steps, then 10 more from the step-40 checkpoint: no step logged twice, none missing.
    assert train_steps == [10, 20, 30, 40, 50]
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)


def test_detect_returns_keypoints_in_the_pixels_of_any_image_size(trained):
    from kpn_jax import landmarks_train

    config, workdir, _ = trained
    detector = landmarks_predict.load_detector(workdir)
    from data_prep import tfds_util

    sources, _ = tfds_util.data_sources(config.data_dir, _synthetic_name(config))
    example = sources["validation"][0]
    image = example["image"][None]                                  # [1, 64, 64, 1]
    at_64 = landmarks_predict.detect(detector, image)
    assert at_64.shape == (1, 16, 2) and at_64.dtype == np.float32
    np.testing.assert_allclose(landmarks_predict.detect(str(workdir), image), at_64, atol=1e-4)
    # The same knee at twice the size: points in the big image's pixels, same anatomy.
    big = np.repeat(np.repeat(image, 2, axis=1), 2, axis=2)
    at_128 = landmarks_predict.detect(detector, big)
    np.testing.assert_allclose((at_128 + 0.5) / 2 - 0.5, at_64, atol=1.0)
    with pytest.raises(ValueError, match="uint8"):
        landmarks_predict.detect(detector, image.astype(np.float32))


def _synthetic_name(config) -> str:
    from kpn_jax import input_pipeline, landmarks_train

    return input_pipeline.resolve_dataset_name(
        landmarks_train._dataset_view(config, config.sources.synthetic))


def test_predict_finds_keypoints_of_an_image_without_a_keypoint_file(trained, tmp_path):
    from PIL import Image

    from data_prep import tfds_util
    from kpn_jax import image_io, roi as roi_lib
    from kpn_jax import landmarks_train

    config, workdir, _ = trained
    sources, _ = tfds_util.data_sources(config.data_dir, _synthetic_name(config))
    example = sources["validation"][1]
    right = example["image"][..., 0]
    # Stored as a raw left knee would be: mirrored, and not square (padding at the bottom).
    left = np.concatenate([right[:, ::-1], np.zeros((8, 64), np.uint8)], axis=0)
    Image.fromarray(right).save(tmp_path / "knee_r.png")
    Image.fromarray(left).save(tmp_path / "knee_l.png")
    out = tmp_path / "out"
    records = landmarks_predict.predict_landmark_files(
        workdir, [str(tmp_path / "knee_r.png"), str(tmp_path / "knee_l.png")], ["R", "L"],
        output_dir=str(out))
    saved = json.loads((out / "knee_r.landmarks.json").read_text())
    assert saved["keypoints_source"] == "detected" and len(saved["keypoints"]) == 16
    assert (out / "knee_l.landmarks.png").stat().st_size > 0
    right_points = np.asarray(records[0]["keypoints"])
    left_points = np.asarray(records[1]["keypoints"])
    detector = landmarks_predict.load_detector(workdir)
    np.testing.assert_allclose(right_points, landmarks_predict.detect(detector, right[None, ..., None])[0],
                               atol=2e-3)
    # The left file's points, taken back into the frame the detector saw (mirrored, padded
    # to a square, resized) by the builders' own transforms, are the detector's output there.
    oriented, seen = roi_lib.to_right_orientation(left, left_points, "L")
    square, seen = image_io.resize_whole(oriented, seen, 64)
    square = np.clip(np.round(square), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(seen, landmarks_predict.detect(detector, square[None, ..., None])[0],
                               atol=2e-3)
    assert np.all((left_points >= 0) & (left_points <= [63, 71]))
    with pytest.raises(ValueError, match="sides"):
        landmarks_predict.predict_landmark_files(workdir, [str(tmp_path / "knee_r.png")], ["X"])


def test_config_errors_name_the_field():
    from configs import landmarks as landmarks_config
    from kpn_jax import landmarks_train

    config = landmarks_config.get_config()
    config.sources.real.batch_size = 0
    config.sources.synthetic.batch_size = 0
    with pytest.raises(ValueError, match="config.sources"):
        landmarks_train.validate_config(config)
    config = landmarks_config.get_config()
    config.model.stages = 1
    with pytest.raises(ValueError, match="config.model.stages"):
        landmarks_train.validate_config(config)
    config = landmarks_config.get_config()
    config.task = "grading"
    with pytest.raises(ValueError, match="config.task"):
        landmarks_train.validate_config(config)


def test_source_mix_stream_is_a_pure_function_of_the_step():
    from kpn_jax import landmarks_train

    pools = [[{"k": 0, "i": i} for i in range(5)], [{"k": 1, "i": i} for i in range(3)]]
    stream = landmarks_train.SourceMixStream(pools, [2, 1], num_steps=10, seed=3)
    assert stream.local_batch == 3 and len(stream) == 30
    batches = [[stream[s * 3 + j] for j in range(3)] for s in range(10)]
    assert all([e["k"] for e in b] == [0, 0, 1] for b in batches)
    # Every example of pool 0 once per epoch (5 examples = 2.5 batches).
    first_epoch = sorted(e["i"] for b in batches[:2] for e in b[:2]) + [batches[2][0]["i"]]
    assert sorted(first_epoch) == [0, 1, 2, 3, 4]
    # Two processes read the two halves of the one-process global batches, in order (each
    # process holds a contiguous block of rows): the same batch whatever the process count.
    halves = [landmarks_train.SourceMixStream(pools, [2, 2], 4, 3, p, 2) for p in range(2)]
    whole = landmarks_train.SourceMixStream(pools, [2, 2], 4, 3)
    for s in range(4):
        merged = [halves[p][s * 2 + j] for p in range(2) for j in range(2)]
        assert merged == [whole[s * 4 + j] for j in range(4)]
        assert [e["k"] for e in merged] == [0, 0, 1, 1]


def test_dev_holdout_is_per_subject():
    from kpn_jax import landmarks_train

    subjects = [f"s{i // 2}" for i in range(400)]
    mask = landmarks_train.dev_mask(subjects, 0.2, seed=0)
    assert 0.1 < mask.mean() < 0.3
    assert np.all(mask[0::2] == mask[1::2])
    assert not landmarks_train.dev_mask(subjects, 0.0, seed=0).any()


# ----------------------------------------------------------------------------- fill_keypoints


def _fake_knee_kl224(root, images: list, keypoints: dict):
    """A kneeKL224-layout folder: ``train/2/<id>.png`` and a landmarks16.csv for some ids."""
    from PIL import Image

    names = []
    for i, image in enumerate(images):
        name = f"90000{i:02d}R"
        folder = root / "train" / "2"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{name}.png")
        names.append(name)
    header = ["path", "split", "kl_grade", "side"] + [f"{a}{n}" for n in range(16) for a in "xy"] \
        + ["ok", "score", "inverted_polarity", "reject_reasons"]
    rows = [",".join(header)]
    for i, points in keypoints.items():
        rows.append(",".join([f"train/2/{names[i]}.png", "train", "2", "R"]
                             + [f"{v:.3f}" for v in np.asarray(points).reshape(-1)]
                             + ["1", "0.9", "0", ""]))
    (root / "landmarks16.csv").write_text("\n".join(rows) + "\n")
    return names


def test_fill_keypoints_fills_only_the_missing_ones_and_marks_them(trained, tmp_path):
    from data_prep import fill_keypoints, tfds_util
    from data_prep.knee_kl224 import __main__ as knee_kl224_main
    from kpn_jax import landmarks_train

    config, workdir, _ = trained
    sources, _ = tfds_util.data_sources(config.data_dir, _synthetic_name(config))
    examples = [sources["validation"][i] for i in range(4)]
    images = [e["image"][..., 0] for e in examples]
    _fake_knee_kl224(tmp_path / "kl", images, {0: examples[0]["keypoints"],
                                               2: examples[2]["keypoints"]})
    data_dir = tmp_path / "data"
    knee_kl224_main.build(knee_kl224_main.parse_args(
        ["--manual_dir", str(tmp_path / "kl"), "--data_dir", str(data_dir), "--image_size", "64",
         "--keep_polarity", "--config_name", "tiny"]))

    name = fill_keypoints.fill_keypoints(data_dir, "knee_kl224/tiny", workdir)
    assert name.startswith("keypoints_filled/knee_kl224-tiny-missing-det")
    filled, info = tfds_util.data_sources(data_dir, name)
    assert info.metadata["keypoints_filled"]["mode"] == "missing"
    records = {r["image_id"].decode(): r for r in (filled["train"][i] for i in range(4))}
    detector = landmarks_predict.load_detector(workdir)
    for i, image in enumerate(images):
        record = records[f"90000{i:02d}R"]
        np.testing.assert_array_equal(record["image"][..., 0], image)
        assert record["keypoints_valid"].all()
        if i in (0, 2):   # annotated: copied as they were
            assert not record["keypoints_predicted"]
            np.testing.assert_allclose(record["keypoints"], examples[i]["keypoints"], atol=1e-3)
        else:             # filled by the detector
            assert record["keypoints_predicted"]
            np.testing.assert_allclose(record["keypoints"],
                                       landmarks_predict.detect(detector, image[None, ..., None])[0],
                                       atol=1e-3)
    # Same source, detector and mode: the build is found, not redone.
    assert fill_keypoints.fill_keypoints(data_dir, "knee_kl224/tiny", workdir) == name
    # A detector never trains on predicted keypoints.
    assert landmarks_train.usable_indices(filled["train"]).tolist() == sorted(
        i for i in range(4) if not filled["train"][i]["keypoints_predicted"])


def test_needs_keypoints_modes():
    from data_prep import fill_keypoints

    valid = np.array([[True, True], [True, False], [False, False]])
    assert fill_keypoints.needs_keypoints(valid, "missing").tolist() == [False, True, True]
    assert fill_keypoints.needs_keypoints(valid, "all").tolist() == [True, True, True]
    with pytest.raises(ValueError, match="mode"):
        fill_keypoints.needs_keypoints(valid, "some")
