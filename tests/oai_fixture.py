"""Writers of a fake OAI release for the builder's tests: DICOMs (pydicom), BoneFinder
``.pts``, readings in the OAI's ASCII form and the NDA's, drawn so that every keypoint sits
on a bright disk of the radiograph."""

import csv

import numpy as np

from data_prep import features
from kpn_jax import pts

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
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [spacing, spacing]
    if accession is not None:
        ds.AccessionNumber = accession
    if photometric == "MONOCHROME1":
        pixels = 4095 - pixels
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


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
