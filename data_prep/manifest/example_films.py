"""A synthetic hospital: DICOM films of both knees, BoneFinder-style keypoint files in mm, a
manifest of expert grades and a folder of unread films, to try the manifest workflow end
to end (docs/DATASETS.md, "A hospital's radiographs, end to end") before using real ones.

  python -m data_prep.manifest.example_films --out=/tmp/hospital

Writes, under ``--out``:

* ``films/<patient>.dcm``: one 16-bit PA film per graded person, right knee on the image
  left, ImageLaterality B, PatientID, 140 mm of knee per ``--knee_px`` pixels (the pixel
  spacing follows), every third film MONOCHROME1;
* ``keypoints/<patient>_R.pts`` and ``_L.pts``: each knee's kneel16 points in mm of its film;
* ``knees.csv``: two rows per film (all seven grades, keypoint files; splits left to the
  builder's subject hash);
* ``unread/<patient>.dcm``: films of ``--unread`` other people, without grades or keypoints.

The knees are the embedded synthetic knees (:mod:`data_prep.synthetic_knee`), with their
grades; nothing here is a real patient.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from data_prep.synthetic_knee import generator
from kpn_jax import pts as pts_lib
from kpn_jax import grades as grades_lib

# The manifest's grade columns are named like the tasks.
MANIFEST_GRADE_COLUMNS = grades_lib.TASKS
ROI_MM = 140.0


def film_of(seed: int, subject: int, knee_px: int) -> dict:
    """One person's PA film: ``pixels`` uint16 ``[H, W]`` (bone bright), the two knees'
    ``keypoints`` ``{side: [16, 2]}`` in film pixels and ``grades`` ``{side: [7]}``."""
    margin = knee_px // 4
    film = np.zeros((knee_px + 2 * margin, 2 * knee_px + 3 * margin), np.float32)
    rng = np.random.default_rng([seed, subject])
    keypoints, grades = {}, {}
    for side, left in (("R", margin), ("L", 2 * margin + knee_px)):
        knee = generator.generate_knee(seed, 2 * subject + (side == "L"), knee_px)
        film[margin:margin + knee_px, left:left + knee_px] = knee["image"]
        keypoints[side] = knee["keypoints"] + np.asarray([left, margin], np.float32)
        grades[side] = knee["grades"]
    # 12-bit detector values: an offset, the knees' grey levels scaled, a little noise.
    pixels = 300.0 + film * 14.0 + rng.normal(0, 6, film.shape)
    return {"pixels": np.clip(pixels, 0, 4095).astype(np.uint16), "keypoints": keypoints,
            "grades": grades}


def write_film(path: Path, pixels: np.ndarray, patient_id: str, spacing_mm: float,
               monochrome1: bool) -> None:
    """A one-frame DX DICOM of both knees (ImageLaterality B)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.ImageLaterality = "DX", patient_id, "B"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    stored = (4095 - pixels) if monochrome1 else pixels
    ds.PixelData = np.asarray(stored, "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_hospital(out: Path, graded: int = 120, unread: int = 60, knee_px: int = 256,
                   seed: int = 7) -> dict:
    """Writes the folders and ``knees.csv`` under ``out``; returns counts."""
    spacing = ROI_MM / knee_px
    for folder in ("films", "keypoints", "unread"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for subject in range(graded + unread):
        patient = f"H{subject:05d}"
        film = film_of(seed, subject, knee_px)
        is_graded = subject < graded
        path = out / ("films" if is_graded else "unread") / f"{patient}.dcm"
        write_film(path, film["pixels"], patient, spacing, monochrome1=subject % 3 == 2)
        if not is_graded:
            continue
        for side in ("R", "L"):
            pts_path = out / "keypoints" / f"{patient}_{side}.pts"
            pts_lib.write_pts(pts_path, film["keypoints"][side] * spacing)  # in mm
            grades = dict(zip(MANIFEST_GRADE_COLUMNS, (str(int(g)) for g in film["grades"][side])))
            rows.append({"image": f"films/{patient}.dcm", "pts": f"keypoints/{pts_path.name}",
                         "subject_id": patient, "side": side, **grades})
    with (out / "knees.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "pts", "subject_id", "side",
                                    *MANIFEST_GRADE_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    return {"graded_films": graded, "graded_knees": len(rows), "unread_films": unread,
            "pixel_spacing_mm": spacing}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.manifest.example_films",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (created)")
    parser.add_argument("--graded", type=int, default=120, help="films with graded knees")
    parser.add_argument("--unread", type=int, default=60, help="films without grades")
    parser.add_argument("--knee_px", type=int, default=256, help="pixels per 140 mm")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    counts = write_hospital(Path(args.out).expanduser(), args.graded, args.unread,
                            args.knee_px, args.seed)
    print(f"{counts['graded_films']} graded films ({counts['graded_knees']} knees) and "
          f"{counts['unread_films']} unread films, {counts['pixel_spacing_mm']:.3f} mm per "
          f"pixel -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
