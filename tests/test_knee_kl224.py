"""The kneeKL224 builder on a few real crops copied from ../shared/data/kneeKL224/."""

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kpn_jax import image_io
from data_prep.knee_kl224 import builder as kl_builder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "kneeKL224"
pytestmark = pytest.mark.skipif(not (SHARED / "landmarks16.csv").is_file(),
                                reason=f"{SHARED} not present")

LEFT_OK = "train/0/9015798L.png"        # landmarks ok = 1, left knee
RIGHT_OK = "train/3/9020404R.png"       # landmarks ok = 1, right knee
NOT_OK = "train/1/9002316R.png"         # landmarks ok = 0
INVERTED = "train/0/9629713R.png"       # ok = 1 and inverted grey levels
NO_ROW = "train/0/9001695L.png"         # no landmark row
VAL_LEFT = "val/1/9086204L.png"         # ok = 1
VAL_OTHER = "val/0/9006140R.png"
COPIED = [LEFT_OK, RIGHT_OK, NOT_OK, INVERTED, NO_ROW, VAL_LEFT, VAL_OTHER]


def _stored(relative):
    return np.asarray(Image.open(SHARED / relative).convert("L"))


@pytest.fixture(scope="module")
def landmark_rows():
    with open(SHARED / "landmarks16.csv", newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def small_copy(tmp_path_factory, landmark_rows):
    """A copy with a few images, a test/ folder, a stray file, and their landmark rows."""
    root = tmp_path_factory.mktemp("kneeKL224")
    for relative in COPIED:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED / relative, root / relative)
    # The shared copy has no test/ folder; a full copy does.
    (root / "test" / "2").mkdir(parents=True)
    shutil.copyfile(SHARED / VAL_OTHER, root / "test" / "2" / "9999999R.png")
    (root / "train" / "2").mkdir()
    (root / "train" / "2" / "notes.txt").write_text("not an image")
    with open(SHARED / "landmarks16.csv", newline="") as f:
        header = next(csv.reader(f))
    with open(root / "landmarks16.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, header)
        writer.writeheader()
        writer.writerows(landmark_rows[p] for p in COPIED if p in landmark_rows)
    return root


def _points(row):
    return np.asarray([[float(row[f"x{i}"]), float(row[f"y{i}"])] for i in range(16)], np.float32)


def test_shared_landmark_rows_are_what_the_test_assumes(landmark_rows):
    assert landmark_rows[LEFT_OK]["ok"] == "1" and landmark_rows[LEFT_OK]["side"] == "L"
    assert landmark_rows[NOT_OK]["ok"] == "0"
    assert landmark_rows[INVERTED]["inverted_polarity"] == "1"
    assert NO_ROW not in landmark_rows
    assert image_io.centre_minus_border(_stored(INVERTED)) < 0
    assert image_io.centre_minus_border(_stored(RIGHT_OK)) > 0


def test_plan_keeps_the_published_split_and_ok_landmarks(small_copy, caplog):
    with caplog.at_level(logging.WARNING):
        jobs, summary = kl_builder.plan_knee_kl224(small_copy)
    assert {k: len(v) for k, v in jobs.items()} == {"train": 5, "validation": 2, "test": 1}
    assert summary["files_skipped"] == ["train/2/notes.txt"] and "notes.txt" in caplog.text
    by_name = {j.relative: j for split_jobs in jobs.values() for j in split_jobs}
    assert by_name[NOT_OK].keypoints is None and by_name[NO_ROW].keypoints is None
    assert by_name[LEFT_OK].keypoints is not None
    assert (by_name[LEFT_OK].subject_id, by_name[LEFT_OK].side, by_name[LEFT_OK].kl) == \
        ("9015798", "L", 0)
    assert summary["with_keypoints"] == {"train": 3, "validation": 1}
    jobs_all, _ = kl_builder.plan_knee_kl224(small_copy, kl_builder.KneeKl224Options(landmarks="all"))
    assert {j.relative: j for j in jobs_all["train"]}[NOT_OK].keypoints is not None
    jobs_none, _ = kl_builder.plan_knee_kl224(small_copy,
                                              kl_builder.KneeKl224Options(landmarks="none"))
    assert all(j.keypoints is None for js in jobs_none.values() for j in js)


def test_resizing_moves_keypoints_with_the_image(small_copy, landmark_rows):
    jobs, summary = kl_builder.plan_knee_kl224(small_copy)
    job = {j.relative: j for j in jobs["train"]}[RIGHT_OK]
    example = kl_builder.image_example(job, kl_builder.KneeKl224Options(image_size=112), summary)
    assert example["keypoints"].shape == (16, 2)
    # Halving: pixel centre x -> (x + 0.5) / 2 - 0.5.
    np.testing.assert_allclose(example["keypoints"], (_points(landmark_rows[RIGHT_OK]) + 0.5) / 2
                               - 0.5, atol=1e-4)


def test_build_flips_left_knees_fixes_polarity_and_stores_keypoints(small_copy, landmark_rows,
                                                                   tmp_path):
    from data_prep.knee_kl224 import __main__ as cli
    from data_prep import tfds_util

    summary = cli.build(cli.parse_args([f"--manual_dir={small_copy}", f"--data_dir={tmp_path}"]))
    assert summary["dataset"] == "knee_kl224/default"
    assert summary["written"] == {"test": 1, "train": 5, "validation": 2}
    assert summary["polarity_inverted"] == [INVERTED] and summary["polarity_fixed"]
    sources, info = tfds_util.data_sources(tmp_path, "knee_kl224/default")
    assert set(sources) == {"train", "validation", "test"}
    assert info.metadata["image_size"] == 224
    examples = {}
    for split, source in sources.items():
        for i in range(len(source)):
            example = source[i]
            examples[example["image_id"].decode()] = (split, example)
    assert examples["9999999R"][0] == "test" and examples["9086204L"][0] == "validation"

    def stored_example(relative):
        return examples[Path(relative).stem][1]

    # Left knee: the stored PNG mirrored, exactly (224 px: no resampling); x -> 223 - x.
    left = stored_example(LEFT_OK)
    np.testing.assert_array_equal(left["image"][..., 0], _stored(LEFT_OK)[:, ::-1])
    expected = _points(landmark_rows[LEFT_OK])
    expected[:, 0] = 223 - expected[:, 0]
    np.testing.assert_allclose(left["keypoints"], expected, atol=1e-4)
    assert left["keypoints_valid"].all() and left["side"] == b"L"
    assert not left["keypoints_predicted"]
    # After flipping every knee is lateral-left.
    for relative in (LEFT_OK, RIGHT_OK, VAL_LEFT):
        points = stored_example(relative)["keypoints"]
        assert points[0, 0] < points[6, 0] and points[7, 0] < points[15, 0], relative
    right = stored_example(RIGHT_OK)
    np.testing.assert_array_equal(right["image"][..., 0], _stored(RIGHT_OK))
    np.testing.assert_allclose(right["keypoints"], _points(landmark_rows[RIGHT_OK]), atol=1e-4)
    # KL from the folder, OARSI not graded.
    np.testing.assert_array_equal(right["grades"], [3, -1, -1, -1, -1, -1, -1])
    # ok = 0 and unannotated images: no keypoints.
    for relative in (NOT_OK, NO_ROW):
        example = stored_example(relative)
        assert not example["keypoints_valid"].any() and not example["keypoints"].any()
    # Inverted grey levels are inverted back.
    np.testing.assert_array_equal(stored_example(INVERTED)["image"][..., 0],
                                  255 - _stored(INVERTED))
