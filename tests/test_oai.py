"""The OAI builder on a small fake OAI tree written by the test (data_prep.oai).

The tree follows the published layouts: <visit>m/contents.csv + <batch>/<ID>/<date>/<series>/001
DICOMs (pydicom), KL/OARSI readings as the OAI's kxr_sq_bu??.txt and as the NDA's
oai_kxrsemiquant01.txt, BoneFinder .pts (mm; 001_f = right knee on the mirrored image).
"""

import csv
import logging

import numpy as np
import pytest

from data_prep.oai import builder as oai_builder
from data_prep.oai import readings as oai_readings
from data_prep.oai import tree as oai_tree
from kpn_jax import grades as grades_lib

from tests.oai_fixture import (IMAGE_SIZE, ROI_MM, draw_radiograph, subjects_by_split,
                               write_bonefinder, write_dicom, write_nda, write_wide)


@pytest.fixture(scope="module")
def fake_oai(tmp_path_factory):
    """A fake OAI tree; returns (root, info about what is in it)."""
    root = tmp_path_factory.mktemp("oai")
    rng = np.random.default_rng(0)
    ids = subjects_by_split({"train": 4, "validation": 2, "test": 0})
    graded, mono1, truncated, garbage = ids["train"]
    held_out, never_graded = ids["validation"]
    contents = {"00m": [], "12m": []}

    def add_series(visit_dir, batch, sid, date, series, photometric="MONOCHROME2", pts_too=True):
        folder = f"{batch}/{sid}/{date}/{series}"
        write_dicom(root / visit_dir / folder / "001", draw_radiograph(rng), photometric)
        contents[visit_dir].append([folder, sid, date, f"0{series[:7]}", "OAI^XRAY^KNEE",
                                    oai_tree.BILATERAL_PA])
        if pts_too:  # KNEEL's layout: landmarks_oai/<vv>/<batch>/<any>/<ID>/<date>/<series>/
            write_bonefinder(root / "landmarks_oai" / visit_dir[:2] / batch / "x" / sid / date
                             / series, rng)
        return root / visit_dir / folder / "001"

    add_series("00m", "0.C.2", graded, "20040901", "10000001")
    add_series("12m", "1.C.2", graded, "20050901", "10000002")
    add_series("00m", "0.C.2", mono1, "20040902", "10000003", photometric="MONOCHROME1")
    truncated_path = add_series("00m", "0.C.2", truncated, "20040903", "10000004")
    truncated_path.write_bytes(truncated_path.read_bytes()[:-20000])   # pixel data cut short
    garbage_path = add_series("00m", "0.C.2", garbage, "20040904", "10000005")
    garbage_path.write_bytes(b"not a dicom at all" * 10)
    add_series("00m", "0.C.2", held_out, "20040905", "10000006")
    add_series("12m", "1.C.2", mono1, "20050902", "10000007", pts_too=False)
    add_series("00m", "0.C.2", never_graded, "20040906", "10000008")
    # A series of another kind must be ignored, and a missing-keypoints one counted.
    contents["00m"].append([f"0.C.2/{graded}/20040901/10000009", graded, "20040901", "0999",
                            "OAI^XRAY^KNEE", "Lateral Right Knee"])
    for visit_dir, rows in contents.items():
        with open(root / visit_dir / "contents.csv", "w", newline="") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_ALL)
            writer.writerow(["Folder", "ParticipantID", "StudyDate", "Barcode", "StudyDescription",
                             "SeriesDescription"])
            writer.writerows(rows)

    v00 = {
        (graded, "R", "15"): (2, 0, 1, 0, 1, 0, 2),
        (graded, "R", "37"): (3, 0, 1, 0, 1, 0, None),   # less complete: loses to project 15
        (graded, "L", "37"): (1, 0, 0, 0, 0, 1, 0),
        (graded, "L", "42"): (4, 0, 0, 0, 0, 1, 0),      # equally complete: 37 comes first
        (mono1, "R", "15"): (0, 0, 0, 0, 0, 0, 0),       # mono1's left knee has no reading
        (truncated, "R", "15"): (1, 0, 0, 0, 0, 0, 0),
        (truncated, "L", "15"): (1, 0, 0, 0, 0, 0, 0),
        (held_out, "R", "15"): (3, 1, 2, 1, 1, 1, 1),    # held_out's left knee: no reading
    }
    v01 = {(graded, "R", "15"): (2, 0, 1.5, 0, 1, 0, 9),  # 1.5 -> 1, 9 out of range -> -1
           (graded, "L", "15"): (1, 0, 0, 0, 0, 1, 0)}
    (root / "readings").mkdir()
    write_wide(root / "readings" / "kxr_sq_bu00.txt", "00", v00)
    write_wide(root / "readings" / "kxr_sq_bu01.txt", "01", v01)
    info = dict(graded=graded, mono1=mono1, truncated=truncated, garbage=garbage,
                held_out=held_out, never_graded=never_graded, truncated_path=truncated_path,
                garbage_path=garbage_path,
                v00=v00, v01=v01)
    return root, info


def test_visit_folders_map_to_oai_visit_codes():
    assert [oai_tree.visit_of_folder(n) for n in ("00m", "12m", "24m", "OAI_36m", "48m", "72m",
                                                  "96m")] == ["00", "01", "03", "05", "06", "08",
                                                              "10"]
    assert oai_tree.visit_of_folder("landmarks_oai") is None
    assert oai_tree.visit_of_folder("13m") is None and oai_tree.is_months_folder("120m")
    # The release folder, the first part of contents.csv's Folder, names the visit too.
    assert [oai_tree.visit_of_release(f"{r}/9000099/20040909/10249506") for r in
            ("0.C.2", "1.E.1", "2.D.2", "3.E.1", "4.G.1", "5.E.1", "6.C.1", "8.E.1", "10.E.1",
             "12.E.1", "x")] == ["00", "01", "02", "03", "04", "05", "06", "08", "10", None, None]


def test_readings_both_published_forms_agree(fake_oai, tmp_path):
    root, info = fake_oai
    wide = oai_readings.load_readings(sorted((root / "readings").glob("kxr_sq_bu*.txt")))
    write_nda(tmp_path / "oai_kxrsemiquant01.txt", {"00": info["v00"], "01": info["v01"]})
    report = oai_readings.ReadingsReport()
    nda = oai_readings.load_readings([tmp_path / "oai_kxrsemiquant01.txt"], report=report)
    assert set(wide) == set(nda)
    for key in wide:
        np.testing.assert_array_equal(wide[key].grades, nda[key].grades)
        assert wide[key].readprj == nda[key].readprj
    graded = info["graded"]
    # READPRJ choice: the project order 15, 37 first (42 is read as 37), then completeness.
    assert nda[(graded, "00", "R")].readprj == "15"
    np.testing.assert_array_equal(nda[(graded, "00", "R")].grades, [2, 0, 1, 0, 1, 0, 2])
    assert nda[(graded, "00", "L")].readprj == "37"
    np.testing.assert_array_equal(nda[(graded, "00", "L")].grades, [1, 0, 0, 0, 0, 1, 0])
    # Visit 01 (12 months); 1.5 rounded half to even, 9 out of range -> not graded.
    np.testing.assert_array_equal(nda[(graded, "01", "R")].grades, [2, 0, 2, 0, 1, 0, -1])
    assert report.fractional_grades == 1 and report.out_of_range_grades == 1
    assert report.duplicate_readings == 2 and report.readprj_recoded == 1
    assert report.bad_side_rows == 0    # the description line is not counted as a bad row
    # Floored instead, on request.
    floored = oai_readings.load_readings([tmp_path / "oai_kxrsemiquant01.txt"], fractions="floor")
    np.testing.assert_array_equal(floored[(graded, "01", "R")].grades, [2, 0, 1, 0, 1, 0, -1])


def test_readings_values_as_sas_gives_them():
    """pandas.read_sas returns numbers as floats and text as bytes/str: both are handled."""
    assert oai_readings.normalise_id(9000099.0) == "9000099"
    assert oai_readings.normalise_id(b"9000099") == "9000099"
    assert [oai_readings.parse_side(v) for v in (1.0, 2.0, "1: Right", "2: Left", "left", 3)] == \
        ["R", "L", "R", "L", "L", None]
    report = oai_readings.ReadingsReport()
    import pandas as pd
    got = oai_readings.parse_grades(
        pd.Series([2.0, np.nan, b"3: 3", ".: Missing", 0.5, 5.0, ".5", "1.5", ".A: Not Expected",
                   " ", "X"]), 5, report)
    # Rounded half to even as np.round (0.5 -> 0, 1.5 -> 2); '.5' is a number; 'X' is counted.
    np.testing.assert_array_equal(got, [2, -1, 3, -1, 0, -1, 0, 2, -1, -1, -1])
    assert report.fractional_grades == 3 and report.out_of_range_grades == 1
    assert report.unparsable_grades == 1
    assert [oai_readings.normalise_readprj(v) for v in ("15", 15.0, "42", "37: Incidence")] == \
        ["15", "15", "37", "37"]


def test_readings_file_without_grade_columns_is_refused(tmp_path):
    path = tmp_path / "kxr_sq_bu00.txt"
    path.write_text("ID|SIDE|SOMETHING\n9000001|1|2\n")
    with pytest.raises(oai_readings.ReadingsError, match="kxr_sq_bu00.txt"):
        oai_readings.read_readings(path)


def test_kneel_csv_roi_maps_back_to_the_radiograph():
    """Inverse of KNEEL's create_datasets_from_via transform, written out here."""
    rng = np.random.default_rng(3)
    spacing, pad, roi_px = (0.14, 0.14), 100, int(140 / 0.3)
    for side in ("R", "L"):
        original = rng.uniform(500, 1500, size=(16, 2))
        scaled = original * (spacing[1] / 0.3) + pad              # resampled to 0.3 mm, padded
        center = scaled[7 + 4].astype(int)                          # middle tibia point
        bbox = (center[0] - roi_px // 2, center[1] - roi_px // 2,
                center[0] + roi_px // 2, center[1] + roi_px // 2)
        roi = scaled - np.asarray(bbox[:2])
        if side == "L":
            roi[:, 0] = (bbox[2] - bbox[0]) - roi[:, 0]
        back = oai_tree.kneel_roi_to_image(roi, side, bbox, spacing)
        np.testing.assert_allclose(back, original, atol=1e-3)


def test_plan_sends_knees_to_splits(fake_oai, caplog):
    root, info = fake_oai
    options = oai_builder.OaiOptions(image_size=IMAGE_SIZE, roi_mm=ROI_MM, graded="any")
    with caplog.at_level(logging.WARNING):
        jobs, summary = oai_builder.plan_oai(root, options)
    by_id = {j.image_id: j for split_jobs in jobs.values() for j in split_jobs}
    graded, mono1, held_out = info["graded"], info["mono1"], info["held_out"]
    assert by_id[f"{graded}-V01-R"].split == "train"
    assert by_id[f"{mono1}-V00-L"].split == "unlabeled"          # image but no reading
    assert by_id[f"{held_out}-V00-R"].split == "validation"
    assert f"{held_out}-V00-L" not in by_id                      # held-out subject, no reading
    assert summary["unlabeled_knees_of_held_out_subjects"] == 1
    # A subject never graded cannot be in validation/test: its knees are unlabelled data.
    assert by_id[f"{info['never_graded']}-V00-R"].split == "unlabeled"
    assert summary["images_unreadable"] == [str(info["garbage_path"])]
    assert str(info["garbage_path"]) in caplog.text
    assert summary["films_listed"] == 8                          # the lateral view is not listed
    assert summary["keypoints_source"] == {"bonefinder": 12}
    assert summary["knees_without_keypoints"] == 2               # mono1's 12m series: no .pts
    assert summary["knees_fully_graded"] == 7 and summary["knees_partly_graded"] == 1
    assert all(j.keypoints_predicted for j in by_id.values())
    # The 'all' option keeps the held-out subject's ungraded knee as unlabelled.
    jobs_all, _ = oai_builder.plan_oai(root, oai_builder.OaiOptions(
        image_size=IMAGE_SIZE, roi_mm=ROI_MM, unlabeled_subjects="all", graded="any"))
    assert f"{held_out}-V00-L" in {j.image_id for j in jobs_all["unlabeled"]}
    # graded='all' (the default): the knee with a blank grade is unlabelled data.
    jobs, summary = oai_builder.plan_oai(root, oai_builder.OaiOptions(image_size=IMAGE_SIZE,
                                                                      roi_mm=ROI_MM))
    by_id = {j.image_id: j for split_jobs in jobs.values() for j in split_jobs}
    assert by_id[f"{graded}-V01-R"].split == "unlabeled"
    assert (by_id[f"{graded}-V01-R"].grades == -1).all()
    assert summary["partly_graded_to_unlabeled"] == 1


def test_build_writes_rois_with_keypoints_on_the_bone(fake_oai, tmp_path, caplog):
    import tensorflow_datasets as tfds

    from data_prep import tfds_util

    root, info = fake_oai
    options = oai_builder.OaiOptions(image_size=IMAGE_SIZE, roi_mm=ROI_MM)
    builder = oai_builder.Oai(data_dir=str(tmp_path), config=oai_builder.OaiConfig(
        name="test", options=options))
    with caplog.at_level(logging.WARNING):
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    summary = oai_builder.summary_as_json(builder.summary)
    # The truncated DICOM passes the header check and fails to decode: named and counted.
    assert str(info["truncated_path"]) in caplog.text
    assert sorted(summary["images_unreadable"]) == sorted([str(info["garbage_path"]),
                                                           str(info["truncated_path"])])
    # graded='all': the knee with a blank grade (V01-R) is unlabelled data.
    assert summary["written"] == {"train": 4, "unlabeled": 4, "validation": 1}
    assert summary["planned"]["train"] == 6                      # 2 truncated knees not written

    sources, ds_info = tfds_util.data_sources(tmp_path, "oai/test")
    assert ds_info.metadata["image_size"] == IMAGE_SIZE
    assert ds_info.metadata["keypoint_schema"] == "kneel16"
    examples = {}
    for split, source in sources.items():
        for i in range(len(source)):
            example = dict(source[i])
            for key in ("image_id", "subject_id", "side"):   # TFDS text comes back as bytes
                example[key] = example[key].decode()
            examples[example["image_id"]] = (split, example)
    graded = info["graded"]
    assert set(examples) == {f"{graded}-V00-R", f"{graded}-V00-L", f"{graded}-V01-R",
                             f"{graded}-V01-L", f"{info['mono1']}-V00-R", f"{info['mono1']}-V00-L",
                             f"{info['held_out']}-V00-R", f"{info['never_graded']}-V00-R",
                             f"{info['never_graded']}-V00-L"}
    np.testing.assert_array_equal(examples[f"{graded}-V00-L"][1]["grades"], [1, 0, 0, 0, 0, 1, 0])
    assert examples[f"{graded}-V01-R"][0] == "unlabeled"
    np.testing.assert_array_equal(examples[f"{graded}-V01-R"][1]["grades"], [-1] * 7)
    assert examples[f"{info['mono1']}-V00-L"][0] == "unlabeled"
    assert np.all(examples[f"{info['mono1']}-V00-L"][1]["grades"] == grades_lib.MISSING)
    for image_id, (split, example) in examples.items():
        image, points = example["image"][..., 0], example["keypoints"]
        assert image.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert example["keypoints_valid"].all() and example["keypoints_predicted"]
        assert example["side"] == image_id.split("-")[2]
        # Every keypoint sits on its bright disk: mm -> px, the '_f' mirror, the left-knee
        # flip, the crop and the resize all agree (MONOCHROME1 inverted too).
        cols = np.clip(np.round(points[:, 0]).astype(int), 0, IMAGE_SIZE - 1)
        rows = np.clip(np.round(points[:, 1]).astype(int), 0, IMAGE_SIZE - 1)
        assert image[rows, cols].min() > 100, (image_id, image[rows, cols])
        assert np.median(image) < 60
        # Right-knee orientation: lateral (index 0 of each bone) on the image left.
        assert points[0, 0] < points[6, 0] and points[7, 0] < points[15, 0]
        # The joint centre is the ROI centre.
        centre = (points[:7].mean(0) + points[7:].mean(0)) / 2
        np.testing.assert_allclose(centre, (IMAGE_SIZE - 1) / 2, atol=0.01)


def test_cli_builds_and_writes_the_summary(fake_oai, tmp_path, capsys):
    import json

    from data_prep.oai import __main__ as cli

    root, info = fake_oai
    argv = [f"--manual_dir={root}", f"--data_dir={tmp_path}", f"--image_size={IMAGE_SIZE}",
            f"--roi_mm={ROI_MM:g}", "--unlabeled_subjects=all", "--num_workers=2"]
    assert cli.main(argv) == 0
    name = "image_size48-roi_mm40.0-unlabeled_subjectsall"
    summary = json.loads((tmp_path / "oai" / name / "2.0.0" / "build_summary.json").read_text())
    assert summary["dataset"] == f"oai/{name}"
    assert summary["written"]["unlabeled"] == 5          # the held-out subject's knee too
    assert str(info["truncated_path"]) in summary["images_unreadable"]
    assert f"{summary['dataset_dir']}/build_summary.json" in capsys.readouterr().out
    assert summary["framing"] == {"image_size": IMAGE_SIZE, "roi_mm": ROI_MM, "roi_px": 0.0,
                                  "window": "image", "window_percentiles": [5.0, 99.0],
                                  "pts_units": "mm"}
    # A second run finds the dataset and keeps its summary.
    assert cli.build(cli.parse_args(argv))["written"] == summary["written"]


@pytest.mark.parametrize("window", ["dicom", "roi"])
def test_other_windows_keep_bone_bright(fake_oai, window):
    from kpn_jax import image_io

    root, info = fake_oai
    options = oai_builder.OaiOptions(image_size=IMAGE_SIZE, roi_mm=ROI_MM, window=window)
    jobs, _ = oai_builder.plan_oai(root, options)
    job = next(j for j in jobs["train"] if j.image_id == f"{info['graded']}-V00-L")
    example = oai_builder.knee_example(job, image_io.read_dicom(job.dicom_path), options)
    image = example["image"][..., 0]
    cols, rows = np.round(example["keypoints"]).astype(int).T
    assert image[rows, cols].min() > 100 and np.median(image) < 60


@pytest.mark.parametrize("window", ["image", "roi"])
def test_predict_frames_a_film_as_the_builder_frames_its_knees(fake_oai, window):
    """kpn_jax.framing.frame_knee with the build's recorded framing (what predict uses)
    gives the stored knee of every film with keypoints."""
    from kpn_jax import framing, image_io

    root, _ = fake_oai
    options = oai_builder.OaiOptions(image_size=IMAGE_SIZE, roi_mm=ROI_MM, window=window)
    jobs, _ = oai_builder.plan_oai(root, options)
    recorded = framing.KneeFraming.from_dict(options.framing().to_dict())
    checked = 0
    for job in (j for split_jobs in jobs.values() for j in split_jobs):
        if job.keypoints is None:
            continue
        try:
            radiograph = image_io.read_dicom(job.dicom_path, job.member)
        except image_io.ImageReadError:
            continue
        stored = oai_builder.knee_example(job, radiograph, options)
        image, points = framing.frame_knee(radiograph, job.keypoints, job.side, recorded)
        np.testing.assert_array_equal(image, stored["image"][..., 0], err_msg=job.image_id)
        np.testing.assert_allclose(points, stored["keypoints"], atol=1e-4)
        checked += 1
    assert checked >= 4
