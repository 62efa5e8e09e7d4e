"""The OAI builder on a multi-visit tree laid out like the real release (data_prep.oai).

What the tree holds, each from ../shared/oai_format_notes.md:
- readings as the ASCII download names them (``X-Ray Image Assessments_ASCII/Semi-Quant
  Scoring_ASCII/kxr_sq_bu00.txt``, ``|``-separated, labelled SIDE, blank and ``.:`` missing
  codes, ``.5``, READPRJ 15 and 42, ``V{vv}BARCDBU`` barcodes with their leading 0), a
  second copy of one table and a reliability re-read that must not be read;
- osteophyte grades left blank for a participant who never reached KL 2 (1.1);
- two per-package index files in one visit folder (``contents.0C2.csv`` with ``Barcode``,
  ``contents.0E1.csv`` with ``AccessionNumber``) and two bilateral films of one knee and
  visit, of which the readings name the second (1.2);
- a one-knee film ("PA Fixed Flexion Right Knee") at 12 months, read without a barcode;
- 48 months nested as ``48m/48m/48m`` with its ``contents.csv`` at the top;
- 96 months from the NDA: ``image03.txt`` and one ``.tar.gz`` per series, whose DICOM
  carries the barcode as AccessionNumber (the index has none);
- a ``120m`` folder (no OAI visit) and a ``24m`` folder without an index;
- a knee read without KL (a knee replacement).
Where the real convention is uncertain (notes, section 5) the builder accepts either form.
"""

import logging

import numpy as np
import pytest
import scipy.ndimage

from data_prep.oai import builder as oai_builder
from data_prep.oai import readings as oai_readings
from data_prep.oai import tree as oai_tree
from kpn_jax import landmarks_predict
from tests.oai_fixture import IMAGE_SIZE, ROI_MM, SPACING, write_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tree described in the module docstring; returns (root, facts)."""
    root = tmp_path_factory.mktemp("oai_release")
    return root, write_release(root, tmp_path_factory.mktemp("staging"))


def plan(root, **options):
    return oai_builder.plan_oai(root, oai_builder.OaiOptions(image_size=IMAGE_SIZE, roi_mm=ROI_MM,
                                                             **options))


def test_indexes_of_every_layout_are_read_and_odd_folders_reported(release, caplog):
    root, facts = release
    with caplog.at_level(logging.WARNING):
        series, report = oai_tree.read_image_indexes(root)
    by_series = {s.series_id: s for s in series}
    assert sorted(by_series) == ["10000001", "10000002", "10000003", "10000004", "10000005",
                                 "10000006"]
    assert [by_series[k].visit for k in sorted(by_series)] == ["00", "00", "00", "01", "06", "10"]
    assert by_series["10000003"].barcode == "16610000003"          # AccessionNumber column
    assert by_series["10000004"].sides == ("R",)                      # one-knee film
    assert by_series["10000005"].dicom_path.is_file()                 # 48m/48m/48m
    assert by_series["10000006"].dicom_path == facts["archive"]
    assert by_series["10000006"].member == "10000006/001"
    assert report["series_of_unknown_visit"] == 1                     # 120m's row
    assert report["folders_of_unknown_visits"] == [str(root / "120m")]
    assert report["visit_folders_without_index"] == [str(root / "24m")]
    assert "120m" in caplog.text and "24m" in caplog.text


def test_readings_keep_one_form_per_table_and_skip_reliability_rereads(release):
    root, _ = release
    files = oai_readings.find_readings_files(root)
    assert not any("rel" in f.name for f in files)
    report = oai_readings.ReadingsReport()
    readings = oai_readings.load_readings(files, report=report)
    assert len(readings) == 9                      # (subject, visit, side) keys
    assert len(report.files) == 4 and len(report.files_ignored) == 1
    assert report.readprj_recoded == 1 and report.duplicate_readings == 1


def test_the_plan_counts_every_decision(release):
    root, facts = release
    a, b, c = facts["a"], facts["b"], facts["c"]
    jobs, summary = plan(root)
    by_id = {j.image_id: j for split_jobs in jobs.values() for j in split_jobs}
    assert summary["films_listed"] == 6
    assert summary["films_by_view"] == {oai_tree.BILATERAL_PA: 5, oai_tree.RIGHT_PA: 1}
    # Readings go to the film they name: A's repeat film, not the screening one.
    assert summary["reading_match"] == {"barcode": 8, "single_film_without_barcode": 1}
    assert summary["knees_on_films_not_read"] == 2
    assert f"{a}-V00-R-10000002" in by_id and f"{a}-V00-R-10000001" not in by_id
    assert summary["knees_read_without_kl"] == 1 and f"{c}-V06-R" not in by_id
    # graded='all': B never reached KL 2, so its osteophytes are blank: unlabelled data.
    assert summary["knees_fully_graded"] == 5 and summary["knees_partly_graded"] == 3
    assert summary["partly_graded_to_unlabeled"] == 3
    assert dict(summary["planned"]) == {"train": 5, "unlabeled": 3}
    assert by_id[f"{b}-V01-R"].split == "unlabeled" and by_id[f"{b}-V01-R"].knees_on_film == 1
    assert summary["keypoints_source"] == {"bonefinder": 8}
    assert summary["readings_without_image"] == 0

    # Filling the blank osteophytes of participants never at KL >= 2 makes B's knees labelled,
    # except the one whose medial JSN is missing too.
    jobs, summary = plan(root, fill_blank_osteophytes=True)
    by_id = {j.image_id: j for split_jobs in jobs.values() for j in split_jobs}
    assert summary["osteophyte_grades_filled"] == 12
    assert dict(summary["planned"]) == {"train": 7, "unlabeled": 1}
    assert by_id[f"{b}-V00-L"].split == "unlabeled"
    np.testing.assert_array_equal(by_id[f"{b}-V00-R"].grades, [1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(by_id[f"{b}-V01-R"].grades, [0, 0, 0, 0, 0, 0, 0])  # '.5'
    # graded='any': B's knees are labelled with their osteophytes not graded.
    jobs, summary = plan(root, graded="any")
    by_id = {j.image_id: j for split_jobs in jobs.values() for j in split_jobs}
    np.testing.assert_array_equal(by_id[f"{b}-V00-L"].grades, [0, 0, -1, -1, -1, -1, -1])
    assert by_id[f"{b}-V00-L"].split == "train"


def assert_keypoints_on_the_marks(example):
    """Every keypoint of the stored ROI sits on the bright disk drawn at it."""
    image, points = example["image"][..., 0], example["keypoints"]
    cols = np.clip(np.round(points[:, 0]).astype(int), 0, IMAGE_SIZE - 1)
    rows = np.clip(np.round(points[:, 1]).astype(int), 0, IMAGE_SIZE - 1)
    assert image[rows, cols].min() > 100, (example["image_id"], image[rows, cols])
    assert points[0, 0] < points[6, 0] and points[7, 0] < points[15, 0]   # lateral first


def test_films_from_an_archive_and_a_one_knee_film_give_rois_on_the_bone(release):
    from kpn_jax import image_io

    root, facts = release
    jobs, _ = plan(root)
    by_id = {j.image_id: j for split_jobs in jobs.values() for j in split_jobs}
    for image_id in (f"{facts['a']}-V10-L", f"{facts['a']}-V10-R", f"{facts['b']}-V01-R",
                     f"{facts['c']}-V06-L"):
        job = by_id[image_id]
        example = oai_builder.knee_example(job, image_io.read_dicom(job.dicom_path, job.member),
                                           oai_builder.OaiOptions(image_size=IMAGE_SIZE,
                                                                  roi_mm=ROI_MM))
        assert_keypoints_on_the_marks(example)


def disk_finder(jitter: float = 0.0, seed: int = 0) -> landmarks_predict.Detector:
    """A stand-in for a trained detector on the fixture's films: the kneel16 points are the
    centroids of the bright disks of the ROI (femur: the 7 highest, then the 9 tibia disks,
    each lateral to medial), plus ``jitter`` pixels of noise per call."""
    rng = np.random.default_rng(seed)
    size = int(round(ROI_MM / SPACING))   # the ROI arrives unscaled: one disk = one blob

    def predict(variables, images):
        out = []
        for image in np.asarray(images)[..., 0]:
            labels, count = scipy.ndimage.label(image > 128)
            centres = np.asarray(scipy.ndimage.center_of_mass(image > 128, labels,
                                                              range(1, count + 1)))[:, ::-1]
            if len(centres) != 16:
                centres = np.full((16, 2), -1000.0)   # what a lost detector might say
            centres = centres[np.argsort(centres[:, 1], kind="stable")]
            femur, tibia = centres[:7], centres[7:]
            points = np.concatenate([femur[np.argsort(femur[:, 0])], tibia[np.argsort(tibia[:, 0])]])
            out.append(points + rng.normal(0, jitter, points.shape))
        return np.asarray(out, np.float32)

    return landmarks_predict.Detector(model=None, variables={}, input_size=size, image_size=size,
                                      keypoint_schema="kneel16", workdir="disk-finder",
                                      checkpoint={"which": "best", "step": 0}, _predict=predict)


def build(root, data_dir, name, detector=None, **options):
    import tensorflow_datasets as tfds

    from data_prep import tfds_util

    options = oai_builder.OaiOptions(image_size=IMAGE_SIZE, roi_mm=ROI_MM, **options)
    builder = oai_builder.Oai(data_dir=str(data_dir), detector=detector,
                              config=oai_builder.OaiConfig(name=name, options=options))
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    sources, _ = tfds_util.data_sources(data_dir, f"oai/{name}")
    examples = {}
    for source in sources.values():
        for i in range(len(source)):
            example = dict(source[i])
            example["image_id"] = example["image_id"].decode()
            examples[example["image_id"]] = example
    return oai_builder.summary_as_json(builder.summary), examples


def test_the_detector_route_finds_every_knee_without_keypoint_files(release, tmp_path):
    root, facts = release
    files_summary, files_examples = build(root, tmp_path, "files")
    summary, examples = build(root, tmp_path, "detector", disk_finder(), keypoints="detector_all",
                              detector_digest="test")
    assert summary["keypoints_source"] == {"detector": 8}
    assert summary["written"] == files_summary["written"]
    assert summary["detections_low_confidence"] == []
    assert set(examples) == set(files_examples)
    for image_id, example in examples.items():
        assert example["keypoints_predicted"]
        assert_keypoints_on_the_marks(example)
        # The detector's ROI is the BoneFinder ROI, to within a pixel.
        np.testing.assert_allclose(example["keypoints"], files_examples[image_id]["keypoints"],
                                   atol=1.0)


def test_detections_that_keep_moving_are_flagged(release, tmp_path):
    root, _ = release
    summary, _ = build(root, tmp_path, "jitter", disk_finder(jitter=4.0), keypoints="detector_all",
                       detector_digest="jitter")
    assert summary["keypoints_source"] == {"detector": 8}
    assert len(summary["detections_low_confidence"]) == 8
    assert "mm in the last pass" in summary["detections_low_confidence"][0]


def test_detector_route_without_a_detector_is_refused():
    with pytest.raises(ValueError, match="landmark_workdir"):
        oai_builder.OaiOptions(keypoints="detector")


def test_cli_detector_route_names_the_detector_in_the_dataset(release, tmp_path, monkeypatch,
                                                             capsys):
    import json

    from data_prep.oai import __main__ as cli

    root, _ = release
    argv = [f"--manual_dir={root}", f"--data_dir={tmp_path}", f"--image_size={IMAGE_SIZE}",
            f"--roi_mm={ROI_MM:g}", "--keypoints=detector", f"--pts_dir={tmp_path / 'none'}",
            f"--landmark_workdir={tmp_path / 'detector'}"]
    (tmp_path / "none").mkdir()
    monkeypatch.setattr(cli, "load_detector", lambda args: disk_finder())
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["dataset"].startswith("oai/image_size48-roi_mm40.0-keypointsdetector-"
                                         "detector_digest")
    assert summary["keypoints_source"] == {"detector": 8}
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="--landmark_workdir"):
        cli.load_detector(cli.parse_args(argv[:-1]))
