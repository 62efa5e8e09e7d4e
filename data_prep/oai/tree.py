"""The OAI image tree, BoneFinder ``.pts`` files next to (or apart from) it, KNEEL's CSV.

Image tree, as the OAI image releases unpack (one folder per visit)::

    <root>/00m/contents.csv
    <root>/00m/0.C.2/9000099/20040909/10249506/001       <- DICOM, no suffix
    <root>/12m/contents.csv
    <root>/12m/1.C.2/9000099/20050913/11300203/001
    ...

``contents.csv`` has the columns ``Folder, ParticipantID, StudyDate, Barcode,
StudyDescription, SeriesDescription``; ``Folder`` is relative to the visit folder. The
visit folder's name gives the months (``00m``, ``12m``...; ``OAI_00m`` is accepted too).

BoneFinder points: a folder whose path ENDS with the last three parts of ``Folder``
(``<ParticipantID>/<StudyDate>/<series>``) holds ``001.pts`` (the left knee, found on
the radiograph as is) and ``001_f.pts`` (the right knee, found on the mirrored
radiograph), named after the DICOM file. KNEEL's layout
(``landmarks_oai/00/0.C.2/<any>/9000099/20040909/10249506/001.pts``) and ``.pts`` files
put beside the DICOMs both match.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from kpn_jax import pts as pts_lib
from data_prep.oai import readings as readings_lib

logger = logging.getLogger(__name__)

CONTENTS_FILE = "contents.csv"
CONTENTS_COLUMNS = ("Folder", "ParticipantID", "SeriesDescription")
BILATERAL_PA = "Bilateral PA Fixed Flexion Knee"
DICOM_FILE = "001"
_VISIT_FOLDER = re.compile(r"^(?:OAI_?)?(\d+)m$", re.IGNORECASE)

# KNEEL's bf_landmarks_1_0.3.csv: ROIs of 140 mm cut from the radiograph resampled to
# 0.3 mm/pixel and zero-padded by 100 pixels (scripts/create_datasets_from_via.py).
KNEEL_ROI_SPACING_MM = 0.3
KNEEL_PAD_PX = 100


class TreeError(ValueError):
    """The image tree or a keypoint file cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Series:
    """One bilateral radiograph listed in a ``contents.csv``."""

    subject_id: str
    visit: str            # two-digit OAI visit code, '00', '01', ...
    folder: str           # contents.csv's Folder
    dicom_path: Path      # the DICOM file; may not exist (then it is counted as missing)
    study_date: str
    barcode: str

    @property
    def key(self) -> tuple[str, ...]:
        """``(ParticipantID, StudyDate, series, file stem)``: how ``.pts`` files are found."""
        return tuple(Path(self.folder).parts[-3:]) + (self.dicom_path.name,)

    @property
    def series_id(self) -> str:
        return Path(self.folder).name


def visit_of_folder(name: str) -> str | None:
    """``'00m'``/``'OAI_12m'`` -> ``'00'``/``'01'``; None for other folder names."""
    match = _VISIT_FOLDER.match(name)
    if not match:
        return None
    months = int(match.group(1))
    if months not in readings_lib.MONTHS_TO_VISIT:
        raise TreeError(f"folder {name!r}: {months} months is not an OAI visit "
                        f"({sorted(readings_lib.MONTHS_TO_VISIT)})")
    return readings_lib.MONTHS_TO_VISIT[months]


def find_contents_files(root: str | os.PathLike) -> list[Path]:
    """``<root>/<visit folder>/contents.csv`` files (also ``root`` itself being a visit folder)."""
    root = Path(root)
    candidates = [root / CONTENTS_FILE] + sorted(root.glob(f"*/{CONTENTS_FILE}"))
    return [p for p in candidates if p.is_file() and visit_of_folder(p.parent.name) is not None]


def _dicom_in(folder: Path) -> Path:
    """The series' DICOM: ``001``, or the folder's only file."""
    preferred = folder / DICOM_FILE
    if preferred.exists() or not folder.is_dir():
        return preferred
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".pts")
    return files[0] if len(files) == 1 else preferred


def read_contents(contents_csv: str | os.PathLike,
                  series_description: str = BILATERAL_PA) -> list[Series]:
    """The series of one visit's ``contents.csv`` whose SeriesDescription matches.

    Raises:
      TreeError: naming the file when a needed column is missing.
    """
    contents_csv = Path(contents_csv)
    visit = visit_of_folder(contents_csv.parent.name)
    if visit is None:
        raise TreeError(f"{contents_csv}: its folder is not a visit folder like '00m'")
    try:
        table = pd.read_csv(contents_csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise TreeError(f"{contents_csv}: cannot read ({e})") from e
    missing = [c for c in CONTENTS_COLUMNS if c not in table.columns]
    if missing:
        raise TreeError(f"{contents_csv}: columns {missing} missing; has {list(table.columns)}")
    table = table[table["SeriesDescription"].str.strip() == series_description]
    series = []
    for _, row in table.iterrows():
        folder = row["Folder"].strip().strip("/")
        series.append(Series(
            subject_id=readings_lib.normalise_id(row["ParticipantID"]),
            visit=visit, folder=folder,
            dicom_path=_dicom_in(contents_csv.parent / folder),
            study_date=str(row.get("StudyDate", "")).strip(),
            barcode=str(row.get("Barcode", "")).strip()))
    return series


def index_pts(root: str | os.PathLike) -> dict[tuple[str, ...], dict[bool, Path]]:
    """All ``.pts`` files under ``root`` by ``(subject, date, series, stem)`` and flippedness.

    Returns:
      ``{key: {False: plain .pts, True: mirrored-image _f.pts}}``.
    """
    index: dict[tuple[str, ...], dict[bool, Path]] = {}
    for directory, _, files in os.walk(root):
        parts = Path(directory).parts[-3:]
        for name in files:
            if not name.lower().endswith(".pts"):
                continue
            stem = name[:-4]
            flipped = stem.endswith(pts_lib.FLIPPED_SUFFIX)
            if flipped:
                stem = stem[: -len(pts_lib.FLIPPED_SUFFIX)]
            index.setdefault(tuple(parts) + (stem,), {})[flipped] = Path(directory) / name
    return index


def bonefinder_keypoints(files: dict[bool, Path], side: str, spacing_mm, image_width: int):
    """kneel16 ``[16, 2]`` pixels of one knee from its BoneFinder file, or None.

    The left knee is the plain file, the right knee the ``_f`` file (module docstring).

    Raises:
      PtsError: naming the file when it is malformed.
    """
    path = files.get(side == "R")
    if path is None:
        return None
    return pts_lib.read_knee_pts(path, spacing_mm=spacing_mm, image_width=image_width,
                                 flipped=side == "R")


@dataclasses.dataclass(frozen=True)
class KneelRow:
    """One knee of KNEEL's CSV: 16 points in its ROI frame and the ROI box."""

    points_roi: np.ndarray      # [16, 2] kneel16 order, right-knee orientation, ROI pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in the padded 0.3 mm radiograph
    source: str


def _numbers(text: str, count: int, source: str, column: str) -> np.ndarray:
    try:
        values = np.asarray([float(v) for v in str(text).split(",")], dtype=np.float64)
    except ValueError:
        raise TreeError(f"{source}: column {column}: not a list of numbers: {text!r}") from None
    if len(values) != count:
        raise TreeError(f"{source}: column {column}: expected {count} numbers, got {len(values)}")
    return values


def read_kneel_csv(path: str | os.PathLike) -> dict[tuple[str, str], KneelRow]:
    """KNEEL's ``bf_landmarks_1_0.3.csv``: ``{(subject_id, side): KneelRow}``.

    Columns ``subject_id, side, kl, tibia (9 x,y), femur (7 x,y), bbox, center``.

    Raises:
      TreeError: naming the file and row for a malformed row.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise TreeError(f"{path}: cannot read ({e})") from e
    missing = [c for c in ("subject_id", "side", "tibia", "femur", "bbox") if c not in table.columns]
    if missing:
        raise TreeError(f"{path}: columns {missing} missing; has {list(table.columns)}")
    rows = {}
    for i, row in enumerate(table.itertuples(index=False)):
        source = f"{path.name}:row {i + 2}"
        side = readings_lib.parse_side(row.side)
        if side is None:
            raise TreeError(f"{source}: side {row.side!r} is not L or R")
        femur = _numbers(row.femur, 14, source, "femur").reshape(7, 2)
        tibia = _numbers(row.tibia, 18, source, "tibia").reshape(9, 2)
        bbox = tuple(int(round(v)) for v in _numbers(row.bbox, 4, source, "bbox"))
        rows[(readings_lib.normalise_id(row.subject_id), side)] = KneelRow(
            points_roi=np.concatenate([femur, tibia]).astype(np.float32), bbox=bbox, source=source)
    return rows


def kneel_roi_to_image(points_roi, side: str, bbox, spacing_mm,
                       pad: float = KNEEL_PAD_PX,
                       roi_spacing_mm: float = KNEEL_ROI_SPACING_MM) -> np.ndarray:
    """Undoes KNEEL's ROI transform: ROI pixels -> pixels of the original radiograph.

    KNEEL scaled the radiograph to ``roi_spacing_mm`` per pixel, padded it by ``pad``
    pixels, cut ``bbox`` and mirrored left knees (``x -> width - x``). Exact up to
    KNEEL's integer rounding (about 1 px at 0.3 mm).

    Args:
      points_roi: ``[N, 2]`` in the ROI, right-knee orientation.
      side: 'L' or 'R', the knee's side.
      bbox: ``(x0, y0, x1, y1)`` of the ROI in the padded, rescaled radiograph.
      spacing_mm: ``(row, column)`` mm per pixel of the original radiograph.

    Returns:
      float32 ``[N, 2]`` in original-radiograph pixels.
    """
    points = np.array(points_roi, dtype=np.float64, copy=True)
    if side == "L":
        points[:, 0] = (bbox[2] - bbox[0]) - points[:, 0]
    points += np.asarray(bbox[:2], dtype=np.float64)
    points -= pad
    row, column = (float(s) for s in spacing_mm)
    points[:, 0] *= roi_spacing_mm / column
    points[:, 1] *= roi_spacing_mm / row
    return points.astype(np.float32)
