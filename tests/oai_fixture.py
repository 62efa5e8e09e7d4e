"""Writers of a fake OAI release for the builder's tests: DICOMs (pydicom), BoneFinder
``.pts``, readings in the OAI's ASCII form and the NDA's, drawn so that every keypoint sits
on a bright disk of the radiograph."""

import collections
import csv
import pathlib
import tarfile

import numpy as np

from data_prep import features
from data_prep.oai import tree as oai_tree
from kpn_jax import pts
from tests import dicom_files

SPACING = 0.5                   # mm per pixel
HEIGHT, WIDTH = 120, 200        # a 60 x 100 mm "bilateral" radiograph
ROI_MM, IMAGE_SIZE = 40.0, 48
TASK_COLUMNS = ["XRKL", "XRJSL", "XRJSM", "XROSFL", "XROSFM", "XROSTL", "XROSTM"]


def subjects_by_split(count_per_split):
    """OAI-like IDs whose hash split is known, so the test does not depend on the hash."""
    found = {"train": [], "validation": [], "test": []}
    for number in range(9000001, 9001000):
        split = features.subject_split(str(number))
        if len(found[split]) < count_per_split[split]:
            found[split].append(str(number))
    return found


def right_knee_points(center_x):
    """kneel16 of a right knee in image pixels: lateral (index 0) on the image left."""
    femur_x = center_x + np.linspace(-27, 27, 7)
    femur_y = 50 + 4 * np.abs(np.linspace(-1, 1, 7))
    tibia_x = center_x + np.linspace(-30, 30, 9)
    tibia_y = np.full(9, 70.0)
    return np.stack([np.concatenate([femur_x, tibia_x]), np.concatenate([femur_y, tibia_y])], -1)


def one_knee_points():
    """kneel16 of the right knee of a one-knee film: in the middle of the image."""
    return right_knee_points((WIDTH - 1) / 2.0)


def knee_points(side):
    """Both knees of the fake radiograph: the right knee on the image left (PA view).

    The left knee is a mirrored right knee (lateral on the image right), placed a little
    differently so that swapping the two knees' files would show.
    """
    if side == "R":
        return right_knee_points(50.0)
    left = right_knee_points(46.0)
    left[:, 0] = WIDTH - 1 - left[:, 0]
    left[:, 1] += 6.0
    return left


def draw_radiograph(rng, one_knee=False):
    """uint16 [H, W]: noise, and a bright disk (radius 3 px) at every keypoint of both knees
    (or of the right knee of a one-knee film)."""
    image = 400 + rng.integers(0, 100, size=(HEIGHT, WIDTH))
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    points = [one_knee_points()] if one_knee else [knee_points("R"), knee_points("L")]
    for x, y in np.concatenate(points):
        image[(xx - x) ** 2 + (yy - y) ** 2 <= 9] = 3000
    return image.astype(np.uint16)


def write_dicom(path, pixels, photometric="MONOCHROME2", spacing=SPACING, accession=None):
    """A CR DICOM of ``pixels`` (bone bright); MONOCHROME1 files store them inverted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = 4095 - pixels if photometric == "MONOCHROME1" else pixels
    dicom_files.write_dicom(path, stored, photometric, spacing=spacing, accession=accession,
                            modality="CR")


def write_bonefinder(directory, rng, one_knee=False):
    """001.pts (left knee, as is) and 001_f.pts (right knee, on the mirrored image), in mm;
    only 001_f.pts for a one-knee (right) film."""
    directory.mkdir(parents=True, exist_ok=True)
    files = (("R", "001_f.pts"),) if one_knee else (("L", "001.pts"), ("R", "001_f.pts"))
    for side, name in files:
        points = (one_knee_points() if one_knee else knee_points(side)).copy()
        if side == "R":  # BoneFinder saw the mirrored radiograph
            points[:, 0] = WIDTH - 1 - points[:, 0]
        shape = rng.uniform(0, 50, size=(74, 2))   # the other BoneFinder points
        shape[list(pts.BONEFINDER_TO_KNEEL16)] = points
        pts.write_pts(directory / name, shape * SPACING)


def reading_rows(visit, visit_grades):
    """Wide OAI rows (ID, SIDE, READPRJ, V{vv}XR..) of {(id, side, prj): grades}."""
    return [{"ID": sid, "SIDE": {"R": "1: Right", "L": "2: Left"}[side], "READPRJ": prj,
             **{f"V{visit}{c}": ("" if g is None else str(g)) for c, g in zip(TASK_COLUMNS, grades)}}
            for (sid, side, prj), grades in visit_grades.items()]


def write_wide(path, visit, visit_grades, barcodes=None):
    """The OAI's ASCII kxr_sq_bu{visit}.txt; ``barcodes``: {(id, side, prj): V{vv}BARCDBU}."""
    rows = reading_rows(visit, visit_grades)
    columns = ["ID", "SIDE", "READPRJ", "VERSION"] + [f"V{visit}{c}" for c in TASK_COLUMNS]
    if barcodes is not None:
        columns.insert(4, f"V{visit}BARCDBU")
        for row, key in zip(rows, visit_grades):
            row[f"V{visit}BARCDBU"] = barcodes.get(key, "")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter="|", restval="1.2")
        writer.writeheader()
        writer.writerows(rows)


def write_nda(path, readings_by_visit):
    columns = ["subjectkey", "src_subject_id", "interview_date", "visit", "readprj", "side",
               "barcode"] + [c.lower() for c in TASK_COLUMNS]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL)
        writer.writerow(columns)
        writer.writerow([f"Description of {c}" for c in columns])  # NDA's second header line
        for visit, visit_grades in readings_by_visit.items():
            for (sid, side, prj), grades in visit_grades.items():
                writer.writerow([f"NDAR_INV{sid}", sid, "01/01/2005", f"V{visit}", prj,
                                 {"R": "1", "L": "2"}[side], "0166"]
                                + ["" if g is None else str(g) for g in grades])


FULL = (2, 1, 1, 1, 1, 0, 1)


def write_release(root, staging):
    """A multi-visit tree laid out like the real OAI release (tests/test_oai_release.py
    lists what it holds) under ``root``; ``staging`` is scratch space. Returns facts about it."""
    root, staging = pathlib.Path(root), pathlib.Path(staging)
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
    return dict(a=a, b=b, c=c, archive=archive)
