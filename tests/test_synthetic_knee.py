"""The synthetic knee generator and its TFDS builder (data_prep.synthetic_knee)."""

import csv
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from data_prep import features as features_lib
from kpn_jax import roi as roi_lib
from data_prep import tfds_util
from data_prep.synthetic_knee import __main__ as cli
from data_prep.synthetic_knee import builder as builder_lib
from data_prep.synthetic_knee import generator as gen
from kpn_jax import grades as grades_lib

SHARED_LANDMARKS = (Path(__file__).resolve().parents[2] / "shared" / "data" / "kneeKL224"
                    / "landmarks16.csv")


def _right(knee):
    """(image, keypoints) of a generated knee in right-knee orientation."""
    return roi_lib.to_right_orientation(knee["image"], knee["keypoints"], knee["side"])


@pytest.fixture(scope="module")
def grade_sample():
    """Grades of 2,500 knees (no images): clean, noisy, and the lipping flags."""
    knees = [gen.sample_grades(5, i, rater_noise=0.1) for i in range(2500)]
    return (np.array([k.grades_clean for k in knees]), np.array([k.grades for k in knees]),
            np.array([k.lipping for k in knees]))


@pytest.fixture(scope="module")
def knees_128():
    return [gen.generate_knee(11, i, 128) for i in range(200)]


# ---------------------------------------------------------------------------------------
# Generator.


def test_example_depends_only_on_seed_and_index():
    first = gen.generate_knee(3, 7, 64)
    gen.generate_knee(3, 8, 64)  # other knees in between change nothing
    again = gen.generate_knee(3, 7, 64)
    for key in ("image", "keypoints", "grades", "grades_clean"):
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    assert first["image_id"] == again["image_id"]
    other_seed = gen.generate_knee(4, 7, 64)
    assert not np.array_equal(first["image"], other_seed["image"])
    # Grades do not depend on the image size; the anatomy scales with it.
    big = gen.generate_knee(3, 7, 128)
    np.testing.assert_array_equal(first["grades_clean"], big["grades_clean"])
    np.testing.assert_allclose((big["keypoints"] + 0.5) / 128, (first["keypoints"] + 0.5) / 64,
                               atol=1e-4)


def test_batch_stacks_knees():
    batch = gen.generate_batch(1, [4, 9], image_size=48)
    assert batch["image"].shape == (2, 48, 48) and batch["keypoints"].shape == (2, 16, 2)
    assert batch["grades"].shape == (2, 7) and batch["side"] == ["R", "L"]
    np.testing.assert_array_equal(batch["image"][1], gen.generate_knee(1, 9, 48)["image"])


@pytest.mark.parametrize("size", [48, 64, 320])
def test_grades_keypoints_and_image_are_in_range(size):
    for index in range(6 if size == 320 else 30):
        knee = gen.generate_knee(2, index, size)
        assert knee["image"].dtype == np.uint8 and knee["image"].shape == (size, size)
        assert knee["image"].std() > 10, "an image with no contrast"
        grades_lib.validate(knee["grades"])
        grades_lib.validate(knee["grades_clean"])
        assert np.all(knee["grades"] >= 0) and np.all(knee["grades_clean"] >= 0)
        assert np.all(np.abs(knee["grades"] - knee["grades_clean"]) <= 1)
        points = knee["keypoints"]
        assert points.shape == (16, 2) and points.dtype == np.float32
        assert np.all(points >= 0) and np.all(points <= size - 1)
        subject, side = gen.subject_of(index)
        assert knee["side"] == side == ("R", "L")[index % 2]
        assert knee["subject_id"] == gen.subject_id(2, subject)
        assert knee["image_id"] == knee["subject_id"] + side


def test_both_knees_of_a_subject_share_the_subject_and_correlate(grade_sample):
    clean, _, _ = grade_sample
    assert gen.generate_knee(0, 6, 48)["subject_id"] == gen.generate_knee(0, 7, 48)["subject_id"]
    assert gen.generate_knee(0, 7, 48)["subject_id"] != gen.generate_knee(0, 8, 48)["subject_id"]
    right, left = clean[0::2, 0], clean[1::2, 0]
    assert np.corrcoef(right, left)[0, 1] > 0.3


def test_keypoints_follow_the_anatomy_and_the_mirror():
    for index in range(8):
        knee = gen.generate_knee(0, index, 96)
        raw = knee["keypoints"]
        lateral_left = raw[0, 0] < raw[6, 0] and raw[7, 0] < raw[15, 0]
        assert lateral_left == (knee["side"] == "R"), "a left knee must be mirrored (lateral right)"
        image, points = _right(knee)
        assert points[0, 0] < points[3, 0] < points[6, 0]
        assert points[7, 0] < points[11, 0] < points[15, 0]
        assert points[3, 1] < points[1, 1] and points[3, 1] < points[5, 1]  # notch above condyles
        assert np.all(points[[8, 14], 1] > points[[1, 5], 1])  # tibia below femur
        # Mirroring is its own inverse (the builder relies on it).
        back_image, back_points = roi_lib.to_right_orientation(image, points, knee["side"])
        np.testing.assert_array_equal(back_image, knee["image"])
        np.testing.assert_allclose(back_points, raw, atol=1e-5)


def test_keypoints_sit_on_bone_edges_in_the_raw_image():
    # Just inside the femur above point 1 and the tibia below point 8 it is brighter than
    # in the joint space between them, on either side, in raw (unflipped) coordinates.
    for index in range(12):
        knee = gen.generate_knee(1, index, 160)
        image, points = knee["image"].astype(float), knee["keypoints"]
        for femur, tibia in ((1, 8), (5, 14)):
            a, b = points[femur], points[tibia]
            if np.linalg.norm(b - a) < 3:
                continue  # bone on bone: no gap to look at
            gap = image[int(round((a[1] + b[1]) / 2)), int(round((a[0] + b[0]) / 2))]
            above = image[int(round(a[1] - 3)), int(round(a[0]))]
            below = image[int(round(b[1] + 3)), int(round(b[0]))]
            assert above > gap + 15 and below > gap + 15, (index, femur, gap, above, below)


def test_kl_follows_the_kl_rules_before_rater_noise(grade_sample):
    clean, _, lipping = grade_sample
    kl, oarsi = clean[:, 0], clean[:, 1:]
    max_jsn, max_ost = oarsi[:, :2].max(1), oarsi[:, 2:].max(1)
    assert np.all(kl[max_jsn == 3] == 4)
    assert np.all(kl[max_jsn == 2] == 3)
    assert np.all(kl[(max_ost >= 1)] >= 2)
    assert np.all(kl[(max_ost >= 1) & (max_jsn <= 1)] == 2)
    assert np.all(kl[(max_ost == 0) & (max_jsn == 1)] == 1)
    assert np.all(kl[(max_ost == 0) & (max_jsn == 0) & lipping] == 1)
    assert np.all(kl[(max_ost == 0) & (max_jsn == 0) & ~lipping] == 0)
    np.testing.assert_array_equal(gen.kl_from_oarsi(oarsi, lipping), kl)
    assert set(np.unique(kl)) == {0, 1, 2, 3, 4}


def test_rater_noise_moves_a_share_of_grades_by_one(grade_sample):
    clean, noisy, _ = grade_sample
    change = noisy - clean
    assert np.all(np.abs(change) <= 1)
    assert 0.07 < np.mean(change != 0) < 0.13  # rater_noise=0.1
    quiet = gen.sample_grades(5, 17, rater_noise=0.0)
    np.testing.assert_array_equal(quiet.grades, quiet.grades_clean)
    # Noise draws are their own stream: more noise keeps the clean grades.
    np.testing.assert_array_equal(gen.sample_grades(5, 17, rater_noise=0.3).grades_clean,
                                  quiet.grades_clean)


@pytest.mark.parametrize("which", ["clean", "noisy"])
def test_marginals_are_close_to_table1(grade_sample, which):
    grades = grade_sample[0] if which == "clean" else grade_sample[1]
    for t, task in enumerate(grades_lib.TASKS):
        expected = gen.TABLE1_PREVALENCE[task]
        observed = np.bincount(grades[:, t], minlength=len(expected)) / len(grades)
        assert np.abs(observed - expected).max() < 0.04, (task, observed.round(3),
                                                          expected.round(3))


def _image_statistics(image):
    image = image.astype(np.float32) / 255.0
    half = image.shape[0] // 2
    return np.concatenate([
        [image.mean(), image.std(), image[:half].mean(), image[half:].mean(),
         image[:, :half].mean(), image[:, half:].mean(),
         np.abs(np.diff(image, axis=0)).mean(), np.abs(np.diff(image, axis=1)).mean()],
        np.percentile(image, [5, 25, 50, 75, 95]),
        np.histogram(image, 16, (0.0, 1.0))[0] / image.size])


def test_image_statistics_do_not_solve_the_task():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    knees = [gen.generate_knee(7, i, 64) for i in range(400)]
    features = np.array([_image_statistics(k["image"]) for k in knees])
    kl = np.array([k["grades_clean"][0] for k in knees])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features[:250], kl[:250])
    accuracy = float(np.mean(model.predict(features[250:]) == kl[250:]))
    majority = float(np.mean(kl[250:] == np.bincount(kl[:250]).argmax()))
    assert accuracy < 0.6 and accuracy < majority + 0.15, (accuracy, majority)


def _bilinear(image, x, y):
    x0 = np.clip(np.floor(x).astype(int), 0, image.shape[1] - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, image.shape[0] - 2)
    dx, dy = x - x0, y - y0
    return (image[y0, x0] * (1 - dx) * (1 - dy) + image[y0, x0 + 1] * dx * (1 - dy)
            + image[y0 + 1, x0] * (1 - dx) * dy + image[y0 + 1, x0 + 1] * dx * dy)


def _dark_gap_width(image, femur_point, tibia_point):
    """Length (pixels) of the dark run on the line through two keypoints, from the image."""
    direction = tibia_point - femur_point
    length = max(float(np.linalg.norm(direction)), 1.0)
    steps = np.arange(-0.6 * length - 3, 1.6 * length + 3, 0.1)
    points = femur_point[None] + steps[:, None] * direction[None] / length
    profile = _bilinear(image.astype(np.float32), points[:, 0], points[:, 1])
    threshold = 0.5 * (np.percentile(profile, 90) + profile.min())
    return 0.1 * np.count_nonzero(profile < threshold)


@pytest.mark.parametrize("compartment, points, task", [
    ("lateral", (1, 8), 1), ("medial", (5, 14), 2)])
def test_joint_space_measured_in_the_image_orders_jsn(knees_128, compartment, points, task):
    widths, grades = [], []
    for knee in knees_128:
        image, keypoints = _right(knee)
        widths.append(_dark_gap_width(image, keypoints[points[0]], keypoints[points[1]]))
        grades.append(knee["grades_clean"][task])
    widths, grades = np.array(widths), np.array(grades)
    narrower, wider = np.nonzero(grades[:, None] > grades[None, :])
    assert len(narrower) > 100, "too few knees with different grades to judge"
    concordance = np.mean(widths[narrower] < widths[wider])
    assert concordance > 0.85, (compartment, concordance)
    # Adjacent grades overlap, as readers disagree: not a perfect ordering.
    assert concordance < 0.9999


@pytest.mark.parametrize("task", list(gen.OSTEOPHYTE_SITES))
def test_osteophytes_are_small_spurs_at_their_margin_keypoint(task):
    # The same knee drawn without and with one osteophyte: the pixels that change lie
    # next to that compartment's margin keypoint, and more of them as the grade grows.
    size = 160
    knee = gen.sample_grades(0, 21)
    shape = dataclasses.replace(gen.sample_shape(0, 21, knee), osteophytes={})
    plain, keypoints = gen.render(shape, size, np.random.default_rng(0))
    point = gen.OSTEOPHYTE_SITES[task][0]
    changed_counts = []
    for grade in (1, 2, 3):
        length = gen.OSTEOPHYTE_LENGTH[grade]
        spur = (length, 0.45 * length + 0.003, 30.0, 0.0)
        image, same_points = gen.render(dataclasses.replace(shape, osteophytes={task: spur}), size,
                                        np.random.default_rng(0))
        np.testing.assert_array_equal(same_points, keypoints)
        rows, cols = np.nonzero(np.abs(image.astype(int) - plain) > 10)
        assert len(rows) > 0, "the osteophyte is not visible"
        distance = np.hypot(cols - keypoints[point, 0], rows - keypoints[point, 1])
        assert distance.max() <= 1.6 * length * size + 3, (grade, distance.max())
        changed_counts.append(len(rows))
    assert changed_counts[0] < changed_counts[1] < changed_counts[2], changed_counts


@pytest.mark.skipif(not SHARED_LANDMARKS.is_file(), reason=f"{SHARED_LANDMARKS} not present")
def test_keypoint_layout_resembles_real_crops():
    with open(SHARED_LANDMARKS, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["ok"] == "1"]
    real = []
    for row in rows:
        points = np.array([[float(row[f"x{i}"]), float(row[f"y{i}"])] for i in range(16)])
        real.append(roi_lib.to_right_orientation(np.zeros((224, 224)), points, row["side"])[1])
    real = (np.array(real) + 0.5) / 224.0
    synthetic = np.array([(_right(gen.generate_knee(0, i, 224))[1] + 0.5) / 224.0
                          for i in range(40)])
    difference = np.abs(synthetic.mean(0) - real.mean(0))
    assert difference.max() < 0.05, difference.round(3)


@pytest.mark.parametrize("kwargs, field", [
    (dict(seed=-1, index=0), "seed"), (dict(seed=0, index=-3), "index"),
    (dict(seed=0, index=0, image_size=8), "image_size"),
    (dict(seed=0, index=0, rater_noise=0.9), "rater_noise")])
def test_bad_generator_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        gen.generate_knee(**kwargs)


# ---------------------------------------------------------------------------------------
# Builder and command line.


def test_split_indices_are_per_subject_and_exact():
    params = builder_lib.SyntheticKneeParams(num_train=5, num_validation=2, num_test=3,
                                             num_unlabeled=4)
    splits = builder_lib.split_indices(params)
    assert {s: len(i) for s, i in splits.items()} == params.split_counts
    subjects = {s: {gen.subject_of(int(i))[0] for i in idx} for s, idx in splits.items()}
    for a in subjects:
        for b in subjects:
            assert a == b or not subjects[a] & subjects[b], (a, b)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    logging.getLogger("absl").setLevel(logging.ERROR)
    data_dir = tmp_path_factory.mktemp("tfds")
    kwargs = dict(image_size=64, num_train=5, num_validation=2, num_test=2, num_unlabeled=3,
                  seed=9, rater_noise=0.1)
    return data_dir, kwargs, builder_lib.build(data_dir, **kwargs)


def test_build_writes_the_example_format(small_build):
    data_dir, kwargs, name = small_build
    assert name == "synthetic_knee/px64_tr5_va2_te2_un3_seed9_noise0.1"
    sources, info = tfds_util.data_sources(data_dir, name)
    assert {s: len(sources[s]) for s in sources} == {"train": 5, "validation": 2, "test": 2,
                                                     "unlabeled": 3}
    assert info.metadata["keypoint_schema"] == "kneel16"
    assert info.metadata["image_size"] == 64
    assert set(info.features.keys()) == set(features_lib.FEATURE_NAMES)
    indices = builder_lib.split_indices(builder_lib.SyntheticKneeParams(**kwargs))
    for split, source in sources.items():
        stored = {source[i]["image_id"].decode(): source[i] for i in range(len(source))}
        for index in indices[split]:
            knee = gen.generate_knee(9, int(index), 64, 0.1)
            example = stored[knee["image_id"]]
            image, keypoints = _right(knee)
            np.testing.assert_array_equal(example["image"][..., 0], image)
            np.testing.assert_allclose(example["keypoints"], keypoints, atol=1e-5)
            assert example["side"].decode() == knee["side"]
            assert example["subject_id"].decode() == knee["subject_id"]
            assert np.all(example["keypoints_valid"]) and not example["keypoints_predicted"]
            expected = knee["grades"] if split != "unlabeled" else np.full(7, -1)
            np.testing.assert_array_equal(example["grades"], expected)


def test_build_reuses_an_identical_build(small_build):
    data_dir, kwargs, name = small_build
    info_file = next((Path(data_dir) / name).glob("*/dataset_info.json"))
    before = info_file.stat().st_mtime_ns
    assert builder_lib.build(data_dir, **kwargs) == name
    assert info_file.stat().st_mtime_ns == before


def test_build_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="num_workers"):
        builder_lib.build(tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="num_test"):
        builder_lib.build(tmp_path, num_test=-1)
    with pytest.raises(ValueError, match="image_size"):
        builder_lib.build(tmp_path, image_size=16)
    with pytest.raises(ValueError, match="rater_noise"):
        builder_lib.build(tmp_path, rater_noise=0.8)
    assert not any(tmp_path.iterdir())


def test_cli_builds_and_prints_the_name(small_build, capsys):
    data_dir, kwargs, name = small_build
    argv = [f"--data_dir={data_dir}"] + [f"--{k}={v}" for k, v in kwargs.items()]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == name
    summary = json.loads(out[out.index("{"):])
    assert summary["dataset"] == name
    assert {s: v["examples"] for s, v in summary["splits"].items()} == {
        "train": 5, "validation": 2, "test": 2, "unlabeled": 3}
    assert summary["splits"]["unlabeled"]["kl_share"] is None
    assert sum(summary["splits"]["train"]["kl_share"]) == pytest.approx(1.0)


def test_default_parameters_make_a_builder(tmp_path):
    # The default config is registered in the builder class; asking for it must work
    # (TFDS refuses an unregistered config object of the same name).
    builder = builder_lib.make_builder(tmp_path, builder_lib.SyntheticKneeParams())
    assert builder.builder_config.params == builder_lib.SyntheticKneeParams()
    assert builder.info.metadata["image_size"] == 320


def test_cli_benchmark_reports_speed(capsys):
    assert cli.main(["--benchmark=4", "--image_size=48"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images_per_s"] > 0 and result["count"] == 4 and result["image_size"] == 48


def test_worker_processes_make_the_same_examples():
    jobs = [(4, index, 48, 0.1, index % 3 != 0) for index in range(5)]
    serial = list(builder_lib._make_examples(jobs, num_workers=1))
    parallel = list(builder_lib._make_examples(jobs, num_workers=2))
    assert len(parallel) == len(serial) == 5
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["image_id"] == b["image_id"]
        np.testing.assert_array_equal(a["grades"], b["grades"])
        np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
