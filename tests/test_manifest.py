"""The CSV-manifest builder (data_prep.manifest) and the image readers (kpn_jax.image_io)."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from kpn_jax import image_io, pts
from data_prep.manifest import builder as mf
from tests.dicom_files import write_dicom

IMAGE_SIZE = 48


def knee_points(center, side):
    """kneel16 of one knee in image pixels; lateral (index 0) on the image left for R."""
    cx, cy = center
    femur = np.stack([np.linspace(-20, 20, 7), -8 + 3 * np.abs(np.linspace(-1, 1, 7))], -1)
    tibia = np.stack([np.linspace(-22, 22, 9), np.full(9, 8.0)], -1)
    points = np.concatenate([femur, tibia])
    if side == "L":
        points[:, 0] = -points[:, 0]
    return points + np.asarray([cx, cy])


def draw(shape, point_sets, background=40.0, value=250.0, rng=None):
    """float [H, W]: background noise and a disk (radius 3) at each point."""
    rng = rng or np.random.default_rng(0)
    image = background + rng.uniform(0, 10, size=shape)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for points in point_sets:
        for x, y in points:
            image[(xx - x) ** 2 + (yy - y) ** 2 <= 9] = value
    return image


# ---------------------------------------------------------------- image_io


def test_raster_formats_keep_their_values(tmp_path):
    ramp = (np.arange(40 * 30).reshape(40, 30) * 50).astype(np.uint16)  # up to 59950
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    deep = image_io.read_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(deep.pixels, ramp)
    assert deep.bit_depth == 16 and deep.spacing_mm is None
    grey = (np.arange(40 * 30).reshape(40, 30) % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert image_io.read_image(tmp_path / "grey.png").bit_depth == 8
    np.testing.assert_array_equal(image_io.read_image(tmp_path / "grey.png").pixels, grey)
    smooth = np.tile(np.linspace(0, 255, 30), (40, 1)).astype(np.uint8)
    Image.fromarray(smooth).convert("RGB").save(tmp_path / "colour.jpg", quality=95)
    jpeg = image_io.read_image(tmp_path / "colour.jpg")
    assert jpeg.pixels.shape == (40, 30) and np.abs(jpeg.pixels - smooth).max() < 8


def test_dicom_monochrome1_is_inverted_and_spacing_read(tmp_path):
    raw = np.full((20, 24), 3000, np.uint16)
    raw[5:15, 6:18] = 500                  # MONOCHROME1: low values display bright (bone)
    write_dicom(tmp_path / "m1", raw, "MONOCHROME1", spacing_tag="PixelSpacing", spacing=0.2,
                window=(1000, 1000))
    assert image_io.is_dicom(tmp_path / "m1")          # no suffix, found by the DICM magic
    image = image_io.read_image(tmp_path / "m1")
    assert image.pixels[10, 10] > image.pixels[0, 0]   # bone bright after inversion
    assert image.spacing_mm == (0.2, 0.2) and image.bit_depth == 12
    # The window (500..1500 raw) follows the inversion: pivot 3500 -> 2000..3000.
    assert image.window == (2000.0, 3000.0)
    np.testing.assert_allclose(image.pixels, 3500 - raw.astype(np.float32))
    write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2", spacing=0.15)
    both = image_io.read_dicom_header(tmp_path / "m2.dcm")
    assert (both.rows, both.columns, both.spacing_mm) == (20, 24, (0.15, 0.15))


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    raw = np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 8          # 0 .. 3832
    lut = np.round(4095 * np.sqrt(np.arange(4096) / 4095)).astype(np.uint16)  # non-linear
    write_dicom(tmp_path / "voi.dcm", raw, window=(100, 50), voi_lut=lut)
    image = image_io.read_image(tmp_path / "voi.dcm")
    np.testing.assert_array_equal(image.pixels, lut[raw].astype(np.float32))
    assert image.window == (0.0, 4095.0)        # the LUT's output range, not the linear window


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 300)
    for name in ("broken.png", "broken.dcm", "missing.png"):
        with pytest.raises(image_io.ImageReadError, match=name):
            image_io.read_image(tmp_path / name)


def test_window_and_polarity_score():
    image = draw((60, 60), [knee_points((30, 30), "R")], background=20, value=200)
    low, high = image_io.window_limits(image, (5, 99))
    assert low < 30 and high == pytest.approx(200)
    assert image_io.to_uint8(image, (low, high)).max() == 255
    bright_centre = np.full((40, 40), 30.0)
    bright_centre[10:30, 10:30] = 200
    assert image_io.centre_minus_border(bright_centre) > 0
    assert image_io.centre_minus_border(255 - bright_centre) < 0


# ---------------------------------------------------------------- manifest


def write_manifest(path, rows, columns=None):
    columns = columns or sorted({k for row in rows for k in row})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def inline(points):
    return " ".join(f"{v:.3f}" for v in np.asarray(points).reshape(-1))


@pytest.fixture()
def radiographs(tmp_path):
    """A bilateral DICOM with BoneFinder files, a 16-bit PNG, an 8-bit PNG and a JPEG."""
    rng = np.random.default_rng(0)
    bilateral_r, bilateral_l = knee_points((50, 60), "R"), knee_points((150, 62), "L")
    pixels = draw((120, 200), [bilateral_r, bilateral_l], background=400, value=3000, rng=rng)
    write_dicom(tmp_path / "bilateral.dcm", pixels.astype(np.uint16), spacing=0.5)
    shape = rng.uniform(0, 50, size=(74, 2))
    shape[list(pts.BONEFINDER_TO_KNEEL16)] = bilateral_l
    pts.write_pts(tmp_path / "bilateral.pts", shape * 0.5)            # left knee, in mm
    mirrored = bilateral_r.copy()
    mirrored[:, 0] = 199 - mirrored[:, 0]
    shape[list(pts.BONEFINDER_TO_KNEEL16)] = mirrored
    pts.write_pts(tmp_path / "bilateral_f.pts", shape * 0.5)          # right knee, mirrored
    deep_points = knee_points((45, 40), "L")
    deep = draw((80, 90), [deep_points], background=9000, value=50000, rng=rng)
    Image.fromarray(deep.astype(np.uint16)).save(tmp_path / "deep.png")
    grey_points = knee_points((32, 30), "L")
    grey = draw((64, 64), [grey_points], rng=rng).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(draw((50, 70), [], rng=rng).astype(np.uint8)).save(tmp_path / "plain.jpg")
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    return dict(bilateral_r=bilateral_r, bilateral_l=bilateral_l, deep_points=deep_points,
                grey_points=grey_points)


def test_row_problems_are_reported_with_row_numbers(tmp_path, radiographs):
    good = inline(radiographs["grey_points"])
    rows = [
        dict(image="grey.png", subject_id="s1", side="L", kl="2", keypoints=good),    # row 2
        dict(image="nope.png", subject_id="s2", side="R", kl="1"),                     # row 3
        dict(image="grey.png", subject_id="s3", side="R", kl="7", image_id="x3"),      # row 4
        dict(image="grey.png", subject_id="s4", side="R", image_id="x4",
             keypoints=" ".join(["1"] * 30)),                                           # row 5
        dict(image="grey.png", subject_id="s5", side="sideways", image_id="x5"),       # row 6
        dict(image="grey.png", subject_id="s6", side="R", image_id="x6", keypoints=good,
             pts="bilateral.pts"),                                                      # row 7
        dict(image="grey.png", subject_id="s1", side="L", kl="1"),                     # row 8
        dict(image="deep.png", subject_id="s7", side="R", kl="1", split="train",
             image_id="x9"),                                                            # row 9
        dict(image="plain.jpg", subject_id="s7", side="L", kl="1", split="test"),      # row 10
        dict(image="grey.png", subject_id="s8", side="R", image_id="x11", split="holdout"),
    ]
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, rows)
    jobs, summary = mf.plan_manifest(manifest)
    problems = summary["row_problems"]
    expected = {3: "file not found", 4: "kl: 7 out of range 0..4", 5: "30 numbers; expected 32",
                6: "'sideways' is not R or L", 7: "either keypoints or pts",
                8: "'grey-L' is also row 2", 10: "subject 's7' is in 'train' at row 9",
                11: "'holdout' is not one of"}
    assert len(problems) == len(expected)
    for row, text in expected.items():
        assert any(p.startswith(f"row {row}: ") and text in p for p in problems), (row, problems)
    assert {j.row for js in jobs.values() for j in js} == {2, 9}
    with pytest.raises(mf.ManifestError) as info:
        mf.plan_manifest(manifest, strict=True)
    assert all(f"row {row}: " in str(info.value) for row in expected)
    # An unreadable image is found when the rows are built: a row problem too.
    write_manifest(manifest, [dict(image="garbage.png", subject_id="s9", side="R", kl="1"),
                              dict(image="grey.png", subject_id="s9", side="L", kl="1")])
    jobs, summary = mf.plan_manifest(manifest)
    (split, split_jobs), = jobs.items()
    written = list(mf.generate_examples(split_jobs, mf.ManifestOptions(image_size=IMAGE_SIZE),
                                        summary))
    assert [key for key, _ in written] == ["grey-L"]
    assert summary["row_problems"][0].startswith("row 2: image:") and \
        "garbage.png" in summary["row_problems"][0]
    with pytest.raises(mf.ManifestError, match="row 2: image"):
        list(mf.generate_examples(split_jobs, mf.ManifestOptions(), summary, strict=True))
    # Found while writing, after the table's problems, it still takes its row's place.
    summary = dict(summary, row_problems=["row 1: x", "row 3: y"])
    list(mf.generate_examples(split_jobs, mf.ManifestOptions(image_size=IMAGE_SIZE), summary))
    assert [p[:6] for p in summary["row_problems"]] == ["row 1:", "row 2:", "row 3:"]


def test_missing_values_ids_sides_and_points_are_never_silently_wrong(tmp_path, radiographs):
    good = radiographs["grey_points"]
    outside = good.copy()
    outside[4] = (64 + 30, 20)                                    # 30 px right of a 64 px image
    rows = [
        dict(image="grey.png", subject_id="s13", side="L", kl="NA", jsn_medial="2",
             keypoints=inline(good), split="train"),                                    # row 2
        dict(image="deep.png", subject_id=" S13 ", side="R", kl="n/a", jsn_medial="nan"),  # row 3
        dict(image="plain.jpg", subject_id="s2", side="R", kl="inf"),                  # row 4
        dict(image="plain.jpg", subject_id="s2", side="L", kl="3", image_id="p-L"),    # row 5
        dict(image="grey.png", subject_id="s4", side="L", kl="1", image_id="g2",
             keypoints=inline(outside)),                                                # row 6
        dict(image="deep.png", subject_id="s5", side="L", kl="2", image_id="grey-L"),  # row 7
    ]
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, rows)
    jobs, summary = mf.plan_manifest(manifest)
    by_row = {j.row: j for js in jobs.values() for j in js}
    # NA-like spellings: that grade only is "not graded"; the knee stays.
    np.testing.assert_array_equal(by_row[2].grades, [-1, -1, 2, -1, -1, -1, -1])
    assert (by_row[3].grades == -1).all()
    # One person whatever the case or spaces: the first spelling, one split, listed.
    assert by_row[2].subject_id == by_row[3].subject_id == "s13"
    assert summary["subject_ids_merged"] == {"s13": ["s13", "S13"]}
    problems = summary["row_problems"]
    assert any(p.startswith("row 4: kl: 'inf' is not a finite grade") for p in problems), problems
    # The same whole image as a right knee (row 4 was refused, so row 5 is the first) is fine
    # once; row 7 reuses row 2's image_id with another side, and says so.
    assert any(p.startswith("row 7: image_id: 'grey-L' is also row 2") for p in problems)
    assert 5 in by_row
    # Points outside the image: a row problem when the row's image is read, naming the point.
    written = list(mf.generate_examples([by_row[2], by_row[6]],
                                        mf.ManifestOptions(image_size=IMAGE_SIZE), summary))
    assert [key for key, _ in written] == ["grey-L"]
    assert summary["row_problems"][1] == (                              # in row order
        "row 6: keypoints: inline points: keypoint 4 at (94.0, 20.0) lies outside the 64x64 "
        "image; are the keypoints in pixels of this image?")

    write_manifest(manifest, [dict(image="plain.jpg", subject_id="a", side="R", kl="1"),
                              dict(image="plain.jpg", subject_id="a", side="L", kl="2",
                                   image_id="other")])
    _, summary = mf.plan_manifest(manifest)
    assert summary["row_problems"] == [
        f"row 3: image: {tmp_path / 'plain.jpg'} is also row 2 (side R there, L here); without "
        "keypoints on both rows the whole image is one knee, so it cannot be listed twice (give "
        "keypoints to cut each knee of a bilateral film)"]


def test_cli_exit_code_problem_list_and_edited_manifest(tmp_path, radiographs, capsys):
    from data_prep.manifest import __main__ as cli

    manifest = tmp_path / "manifest.csv"
    rows = [dict(image="grey.png", subject_id="a", side="L", kl="2",
                 keypoints=inline(radiographs["grey_points"]), split="train"),
            dict(image="nope.png", subject_id="b", side="R", kl="1", split="train")]
    write_manifest(manifest, rows)
    argv = [f"--manifest={manifest}", f"--data_dir={tmp_path / 'tfds'}",
            f"--image_size={IMAGE_SIZE}", "--roi_px=40"]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert "row 3: image: file not found" in err.splitlines()[1]   # after the build, listed
    assert err.strip().splitlines()[-1].startswith("error: rows were skipped")
    assert cli.main([*argv, "--allow_row_problems"]) == 0
    assert "built from this manifest (same SHA-256): reused" in capsys.readouterr().out
    # An edited manifest under the same name: refused in one line, or rebuilt when asked.
    rows[0]["kl"] = "3"
    write_manifest(manifest, rows[:1])
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "was built from another version of the manifest" in err and "--rebuild" in err
    assert cli.main([*argv, "--rebuild"]) == 0
    out = capsys.readouterr().out
    assert "replacing" in out and '"train": 1' in out
    from data_prep import tfds_util

    dataset = cli.build(cli.parse_args(argv))["dataset"]              # reused, not rebuilt
    sources, _ = tfds_util.data_sources(tmp_path / "tfds", dataset)
    assert sources["train"][0]["grades"][0] == 3


def test_salted_pseudonyms_replace_subject_and_image_ids(tmp_path, radiographs):
    from data_prep import tfds_util
    from data_prep.manifest import __main__ as cli
    from kpn_jax import identifiers

    (tmp_path / "salt.bin").write_bytes(bytes(range(32)))
    (tmp_path / "short.bin").write_bytes(b"tiny")
    rows = [dict(image="grey.png", subject_id="MRN-0042", side="L", kl="2",
                 keypoints=inline(radiographs["grey_points"])),
            dict(image="deep.png", subject_id="mrn-0042", side="L", kl="1",
                 keypoints=inline(radiographs["deep_points"]))]
    write_manifest(tmp_path / "m.csv", rows)
    args = [f"--manifest={tmp_path / 'm.csv'}", f"--data_dir={tmp_path / 'tfds'}",
            f"--image_size={IMAGE_SIZE}", "--roi_px=40"]
    plain = cli.build(cli.parse_args(args))
    salted = cli.build(cli.parse_args([*args, f"--id_salt_file={tmp_path / 'salt.bin'}"]))
    assert salted["dataset"] != plain["dataset"] and salted["planned"] == plain["planned"]
    sources, info = tfds_util.data_sources(tmp_path / "tfds", salted["dataset"])
    salt = identifiers.read_salt(tmp_path / "salt.bin")
    stored = [source[i] for source in sources.values() for i in range(len(source))]
    assert {e["subject_id"].decode() for e in stored} == {identifiers.pseudonym("MRN-0042", salt)}
    assert {e["image_id"].decode() for e in stored} == {identifiers.pseudonym("grey-L", salt),
                                                        identifiers.pseudonym("deep-L", salt)}
    assert "0042" not in json.dumps(info.metadata, default=str)
    assert cli.main([*args, f"--id_salt_file={tmp_path / 'short.bin'}"]) == 1
    with pytest.raises(mf.ManifestError, match="does not match"):
        mf.plan_manifest(tmp_path / "m.csv", mf.ManifestOptions(), id_salt=salt)


def test_missing_required_column_is_fatal(tmp_path):
    write_manifest(tmp_path / "m.csv", [dict(image="a.png", side="R")])
    with pytest.raises(mf.ManifestError, match="subject_id"):
        mf.plan_manifest(tmp_path / "m.csv")


def test_build_every_format_with_keypoints_on_the_bone(tmp_path, radiographs):
    from data_prep import tfds_util
    from data_prep.manifest import __main__ as cli

    rows = [
        dict(image="bilateral.dcm", pts="bilateral.pts", subject_id="p1", side="L",
             kl="3", jsn_lateral="0", jsn_medial="2", ost_femur_lateral="1", ost_femur_medial="2",
             ost_tibia_lateral="0", ost_tibia_medial="3", split="train"),
        dict(image="bilateral.dcm", pts="bilateral_f.pts", subject_id="p1", side="R", kl="1",
             split="train"),
        dict(image="deep.png", keypoints=inline(radiographs["deep_points"]), subject_id="p2",
             side="L", kl="0", split="val"),
        dict(image="grey.png", keypoints=inline(radiographs["grey_points"]), subject_id="p3",
             side="L", jsn_medial="1", split="test"),
        dict(image="plain.jpg", subject_id="p4", side="R"),                  # no grade, no keypoints
    ]
    write_manifest(tmp_path / "manifest.csv", rows)
    summary = cli.build(cli.parse_args([
        f"--manifest={tmp_path / 'manifest.csv'}", f"--data_dir={tmp_path / 'tfds'}",
        f"--image_size={IMAGE_SIZE}", "--roi_mm=40", "--strict"]))
    assert summary["written"] == {"test": 1, "train": 2, "unlabeled": 1, "validation": 1}
    assert summary["row_problems"] == []
    sources, info = tfds_util.data_sources(tmp_path / "tfds", summary["dataset"])
    assert info.metadata["image_size"] == IMAGE_SIZE
    examples = {}
    for split, source in sources.items():
        for i in range(len(source)):
            example = source[i]
            examples[example["image_id"].decode()] = (split, example)
    assert set(examples) == {"bilateral-L", "bilateral-R", "deep-L", "grey-L", "plain-R"}
    np.testing.assert_array_equal(examples["bilateral-L"][1]["grades"], [3, 0, 2, 1, 2, 0, 3])
    np.testing.assert_array_equal(examples["grey-L"][1]["grades"], [-1, -1, 1, -1, -1, -1, -1])
    assert examples["plain-R"][0] == "unlabeled"
    assert not examples["plain-R"][1]["keypoints_valid"].any()
    assert examples["bilateral-R"][1]["keypoints_predicted"]          # from a .pts file
    assert not examples["deep-L"][1]["keypoints_predicted"]           # inline
    for image_id in ("bilateral-L", "bilateral-R", "deep-L", "grey-L"):
        example = examples[image_id][1]
        image, points = example["image"][..., 0], example["keypoints"]
        assert example["keypoints_valid"].all()
        cols = np.clip(np.round(points[:, 0]).astype(int), 0, IMAGE_SIZE - 1)
        rows_ = np.clip(np.round(points[:, 1]).astype(int), 0, IMAGE_SIZE - 1)
        assert image[rows_, cols].min() > 100, (image_id, image[rows_, cols])
        assert np.median(image) < 90, image_id
        assert points[0, 0] < points[6, 0] and points[7, 0] < points[15, 0], image_id
    # The DICOM knees are 40 mm ROIs around the joint: its centre is the image centre.
    points = examples["bilateral-L"][1]["keypoints"]
    np.testing.assert_allclose((points[:7].mean(0) + points[7:].mean(0)) / 2,
                               (IMAGE_SIZE - 1) / 2, atol=0.01)


def test_shared_config_naming_of_the_builder_clis():
    """data_prep.tfds_util's config names, as the OAI, kneeKL224 and manifest CLIs use them."""
    from data_prep import tfds_util

    defaults = mf.ManifestOptions()
    assert tfds_util.config_name(defaults, None) == "default"
    assert tfds_util.config_name(defaults, "site_a") == "site_a"
    changed = mf.ManifestOptions(image_size=224, window_percentiles=(1.0, 99.0))
    assert tfds_util.config_name(changed, None) == "image_size224-window_percentiles1.0+99.0"
    # The registered 'default' config goes by name; any other name by a config object.
    assert tfds_util.builder_config(mf.ManifestConfig, "default", defaults) == "default"
    config = tfds_util.builder_config(mf.ManifestConfig, "default", changed)
    assert isinstance(config, mf.ManifestConfig) and config.options == changed
    config = tfds_util.builder_config(mf.ManifestConfig, "site_a", defaults)
    assert config.name == "site_a" and config.options == defaults


def test_unread_films_become_the_unlabelled_pool_with_detected_knees(tmp_path, radiographs,
                                                                     capsys):
    """A folder of DICOM films without a manifest: listed as unlabelled rows (person from
    PatientID, side from ImageLaterality, both knees of a bilateral film), then built with
    the shipped detector finding each knee; a film of a person graded in validation stays
    out of the pool, and files whose person or side is unknown are listed, never guessed."""
    from data_prep import tfds_util
    from data_prep.manifest import __main__ as cli
    from data_prep.manifest import list_films
    from kpn_jax import model_folder

    films = tmp_path / "unread" / "2026"
    films.mkdir(parents=True)
    rng = np.random.default_rng(1)
    both = draw((120, 200), [knee_points((50, 60), "R"), knee_points((150, 60), "L")],
                background=400, value=3000, rng=rng).astype(np.uint16)
    one = draw((100, 100), [knee_points((50, 50), "L")], background=400, value=3000,
               rng=rng).astype(np.uint16)
    write_dicom(films / "film1", both, spacing=0.5, laterality="B", patient_id="q1")
    write_dicom(films / "film2.dcm", one, spacing=0.5, laterality="L", patient_id="q2")
    write_dicom(films / "film3.dcm", one, spacing=0.5, laterality="R", patient_id="p3")
    write_dicom(films / "no_side.dcm", one, spacing=0.5, patient_id="q4")
    write_dicom(films / "no_person.dcm", one, spacing=0.5, laterality="R")
    Image.fromarray(one.astype(np.uint8)).save(films / "photo.png")

    rows = [dict(image="bilateral.dcm", pts="bilateral.pts", subject_id="p1", side="L", kl="3",
                 split="train"),
            dict(image="deep.png", keypoints=inline(radiographs["deep_points"]),
                 subject_id="p2", side="L", kl="0", split="val"),
            dict(image="grey.png", keypoints=inline(radiographs["grey_points"]),
                 subject_id="p3", side="L", kl="2", split="val")]
    write_manifest(tmp_path / "knees.csv", rows)
    listed = tmp_path / "lists" / "knees_and_films.csv"
    listed.parent.mkdir()
    assert list_films.main([f"--films={tmp_path / 'unread'}", f"--out={listed}",
                            f"--append_to={tmp_path / 'knees.csv'}"]) == 0
    printed = capsys.readouterr().out
    assert "4 unlabelled knee rows from 3 films (1 show both knees)" in printed
    for name in ("no_side.dcm: no ImageLaterality", "no_person.dcm: no PatientID",
                 "photo.png: not a DICOM"):
        assert name in printed
    table = list(csv.DictReader(listed.open()))
    assert [(r["image"], r["subject_id"], r["side"], r["split"]) for r in table[3:]] == [
        ("../unread/2026/film1", "q1", "R", "unlabeled"),
        ("../unread/2026/film1", "q1", "L", "unlabeled"),
        ("../unread/2026/film2.dcm", "q2", "L", "unlabeled"),
        ("../unread/2026/film3.dcm", "p3", "R", "unlabeled")]
    assert table[0]["image"] == "../bilateral.dcm" and table[0]["kl"] == "3"

    summary = cli.build(cli.parse_args([
        f"--manifest={listed}", f"--data_dir={tmp_path / 'tfds'}", f"--image_size={IMAGE_SIZE}",
        "--roi_mm=40", "--keypoints=detector",
        f"--landmark_workdir={model_folder.SHIPPED_DETECTOR}", "--strict"]))
    assert summary["written"] == {"train": 1, "validation": 2, "unlabeled": 3}
    assert summary["unlabeled_rows_of_held_out_subjects"] == 1     # p3 is graded in validation
    assert summary["keypoints_detected"] == {"unlabeled": 3}
    assert summary["dataset"].startswith("manifest/") and "keypointsdetector" in summary["dataset"]
    sources, _ = tfds_util.data_sources(tmp_path / "tfds", summary["dataset"])
    pool = [sources["unlabeled"][i] for i in range(len(sources["unlabeled"]))]
    assert sorted(e["image_id"].decode() for e in pool) == [
        "../unread/2026/film1-L", "../unread/2026/film1-R", "../unread/2026/film2-L"]
    for example in pool:
        assert example["keypoints_valid"].all() and example["keypoints_predicted"]
        assert (example["grades"] == -1).all()
        # Cut out around the detected joint: its centre is the knee's centre.
        points = example["keypoints"]
        np.testing.assert_allclose((points[:7].mean(0) + points[7:].mean(0)) / 2,
                                   (IMAGE_SIZE - 1) / 2, atol=0.01)
