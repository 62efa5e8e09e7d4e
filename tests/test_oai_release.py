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

import collections
import csv
import logging
import tarfile

import numpy as np
import pytest
import scipy.ndimage

from data_prep.oai import builder as oai_builder
from data_prep.oai import readings as oai_readings
from data_prep.oai import tree as oai_tree
from kpn_jax import landmarks_predict
from tests.oai_fixture import (IMAGE_SIZE, ROI_MM, SPACING, draw_radiograph, subjects_by_split,
                               write_bonefinder, write_dicom, write_wide)

FULL = (2, 1, 1, 1, 1, 0, 1)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tree described in the module docstring; returns (root, facts)."""
    root = tmp_path_factory.mktemp("oai_release")
    rng = np.random.default_rng(1)
    a, b, c = subjects_by_split({"train": 3, "validation": 0, "test": 0})["train"]
    index_rows = collections.defaultdict(list)

    def film(visit_dir, release_folder, sid, date, series, barcode, description=None,
             nested="", accession=None, index="contents.csv"):
        description = description or oai_tree.BILATERAL_PA
        one_knee = "Bilateral" not in description
        folder = f"{release_folder}/{sid}/{date}/{series}"
        write_dicom(root / visit_dir / nested / folder / "001", draw_radiograph(rng, one_knee),
                    accession=accession)
        write_bonefinder(root / "landmarks_oai" / visit_dir[:2] / release_folder / "x" / sid
                         / date / series, rng, one_knee)
        index_rows[(visit_dir, index)].append(
            [folder, sid, date, barcode, "OAI^XRAY^KNEE", description + "  "])  # trailing blanks
        return folder

    # 00m: two package indexes in one folder; subject A has a screening and a repeat film.
    film("00m", "0.C.2", a, "20040901", "10000001", "016610000001", index="contents.0C2.csv")
    film("00m", "0.C.2", a, "20040915", "10000002", "016610000002", index="contents.0C2.csv")
    film("00m", "0.E.1", b, "20040902", "10000003", "16610000003", index="contents.0E1.csv")
    # 12m: a one-knee film of B's right knee.
    film("12m", "1.C.2", b, "20050902", "10000004", "016610000004",
         description=oai_tree.RIGHT_PA)
    # 48m nested, its index at the top.
    film("48m", "6.C.1", c, "20080903", "10000005", "016610000005", nested="48m/48m")
    # 120m: not an OAI visit; 24m: images but no index.
    film("120m", "12.E.1", c, "20140903", "10000008", "016610000008")
    write_dicom(root / "24m" / "3.C.1" / c / "20060903" / "10000009" / "001",
                draw_radiograph(rng))
    for (visit_dir, name), rows in index_rows.items():
        barcode_column = "AccessionNumber" if name == "contents.0E1.csv" else "Barcode"
        with open(root / visit_dir / name, "w", newline="") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_ALL)
            writer.writerow(["Folder", "ParticipantID", "StudyDate", barcode_column,
                             "StudyDescription", "SeriesDescription"])
            writer.writerows(rows)

    # 96m from the NDA: image03.txt + one archive per series; the barcode only in the DICOM.
    staging = tmp_path_factory.mktemp("staging")
    write_dicom(staging / "10000006" / "001", draw_radiograph(rng), accession="016610000006")
    write_bonefinder(root / "landmarks_oai" / "10" / "10.E.1" / "x" / a / "20130901" / "10000006",
                     rng)
    archive = root / "submission_13364" / "96m" / "10.E.1" / a / "20130901" / "10000006.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "10000006", arcname="10000006")
    with open(root / "image03.txt", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        columns = ["subjectkey", "src_subject_id", "interview_date", "image_description",
                   "image_file", "comments_misc"]
        writer.writerow(columns)
        writer.writerow([f"description of {c}" for c in columns])
        writer.writerow([f"NDAR_INV{a}", a, "09/01/2013", oai_tree.BILATERAL_PA,
                         f"s3://NDAR_Central_1/submission_13364/96m/10.E.1/{a}/20130901/"
                         "10000006.tar.gz", ""])
        writer.writerow([f"NDAR_INV{a}", a, "09/01/2013", "Lateral Left Knee",
                         f"s3://NDAR_Central_1/submission_13364/96m/10.E.1/{a}/20130901/"
                         "10000007.tar.gz", ""])

    ascii_dir = root / "X-Ray Image Assessments_ASCII" / "Semi-Quant Scoring_ASCII"
    missing = ".: Missing Form/Incomplete Workbook"
    v00 = {(a, "R", "15"): FULL, (a, "L", "15"): FULL,
           (a, "R", "42"): (4, 2, 2, 2, 2, 2, 2),       # project 37 (42 recoded): loses to 15
           (b, "R", "15"): (1, 0, 0, None, None, " ", None),   # no OA: osteophytes blank
           (b, "L", "15"): (0, 0, missing, None, None, None, None)}
    barcodes00 = {(a, "R", "15"): "016610000002", (a, "L", "15"): "016610000002",
                  (a, "R", "42"): "016610000002", (b, "R", "15"): "016610000003",
                  (b, "L", "15"): "016610000003"}
    write_wide(ascii_dir / "kxr_sq_bu00.txt", "00", v00, barcodes00)
    write_wide(root / "copy" / "kXR_SQ_BU00.txt", "00", v00, barcodes00)   # the same table
    write_wide(ascii_dir / "kxr_sq_rel_bu00.txt", "00", {(a, "R", "15"): (4,) * 7})
    write_wide(ascii_dir / "kxr_sq_bu01.txt", "01", {(b, "R", "15"): (".5", 0, 0, None, None,
                                                                      None, None)})
    write_wide(ascii_dir / "kxr_sq_bu06.txt", "06",
               {(c, "R", "15"): (None, 1, 1, 1, 1, 1, 1), (c, "L", "15"): FULL},
               {(c, "R", "15"): "016610000005", (c, "L", "15"): "016610000005"})
    write_wide(ascii_dir / "kxr_sq_bu10.txt", "10", {(a, "R", "37"): FULL, (a, "L", "37"): FULL},
               {(a, "R", "37"): "016610000006", (a, "L", "37"): "016610000006"})
    return root, dict(a=a, b=b, c=c, archive=archive)


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
