"""--mode=predict's inputs: files, folders and globs; skipped images listed in the summary."""

import csv

import numpy as np

import pytest

from kpn_jax import predict


def test_files_folders_and_globs_expand_in_order(tmp_path):
    folder = tmp_path / "knees"
    folder.mkdir()
    for name in ("b.png", "a.dcm", "c", "notes.txt", ".hidden.png"):
        (folder / name).write_bytes(b"x")
    single = tmp_path / "one.jpg"
    single.write_bytes(b"x")
    got = predict.expand_image_paths([str(single), str(folder), str(folder / "*.png")])
    assert got == [str(single), str(folder / "a.dcm"), str(folder / "b.png"), str(folder / "c"),
                   str(folder / "b.png")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.expand_image_paths([str(tmp_path / "missing.png")])
    with pytest.raises(FileNotFoundError, match="no image files"):
        predict.expand_image_paths([str(tmp_path / "*.bmp")])


def test_summary_lists_grades_and_skipped_images(tmp_path):
    results = [{"image": "k1.png", "side": "R", "keypoints": {"source": "file"},
                "grades": {"kl": {"grade": 2, "probabilities": [0.1, 0.2, 0.5, 0.15, 0.05]}}}]
    predict.write_summary_csv(tmp_path / "p.csv", results, [("bad.png", "cannot read bad.png")])
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert rows[0]["kl"] == "2" and rows[0]["error"] == ""
    assert [float(rows[0][f"kl_p{g}"]) for g in range(5)] == [0.1, 0.2, 0.5, 0.15, 0.05]
    assert rows[1]["kl_p2"] == ""
    assert rows[1]["image"] == "bad.png" and rows[1]["error"] == "cannot read bad.png"


def test_side_from_dicom_laterality_then_file_name_then_assumed(tmp_path):
    from tests.dicom_files import write_dicom

    raw = np.full((32, 32), 1000, np.uint16)
    write_dicom(tmp_path / "left.dcm", raw, laterality="L")
    write_dicom(tmp_path / "both.dcm", raw, laterality="B")
    write_dicom(tmp_path / "plain.dcm", raw)
    names = [str(tmp_path / n) for n in ("left.dcm", "plain.dcm", "9001695L.png", "knee.png")]
    assert predict.knee_sides(names, None) == (
        ["L", "R", "L", "R"], ["DICOM ImageLaterality", "assumed", "file name", "assumed"])
    assert predict.knee_sides(names, ["R", "R", "R", "L"])[0] == ["R", "R", "R", "L"]
    # A film of both knees: the side is never guessed.
    assert predict.knee_sides([str(tmp_path / "both.dcm")], None)[1] == [
        predict.BILATERAL_WITHOUT_SIDE]
    from kpn_jax import image_io

    with pytest.raises(ValueError, match="both.dcm is a bilateral film"):
        predict.check_one_knee(tmp_path / "both.dcm", image_io.read_image(tmp_path / "both.dcm"))
    predict.check_one_knee(tmp_path / "left.dcm", image_io.read_image(tmp_path / "left.dcm"))


def test_pts_keypoints_in_mm_and_mirrored_files_as_the_builder_reads_them(tmp_path):
    from kpn_jax import keypoints as kp_lib
    from kpn_jax import pts

    rng = np.random.default_rng(0)
    pixels = rng.uniform(10, 90, size=(16, 2)).astype(np.float32)
    spacing = (0.2, 0.25)                                        # (row, column) mm per pixel
    mm = pixels * np.asarray([spacing[1], spacing[0]], np.float32)
    pts.write_pts(tmp_path / "knee.pts", mm)
    got = predict.read_keypoint_file(tmp_path / "knee.pts", kp_lib.KNEEL16, spacing, 100)
    np.testing.assert_allclose(got, pixels, atol=1e-4)
    np.testing.assert_allclose(predict.read_keypoint_file(tmp_path / "knee.pts", kp_lib.KNEEL16),
                               mm, atol=1e-5)                   # no spacing: pixels as written
    mirrored = kp_lib.flip_horizontal(pixels, 100)
    pts.write_pts(tmp_path / "knee_f.pts", mirrored)
    np.testing.assert_allclose(
        predict.read_keypoint_file(tmp_path / "knee_f.pts", kp_lib.KNEEL16, None, 100), pixels,
        atol=1e-4)
