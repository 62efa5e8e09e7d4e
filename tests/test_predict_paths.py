"""--mode=predict's inputs: files, folders and globs; skipped images listed in the summary."""

import csv

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
