"""The OAI image indexes and tree, BoneFinder ``.pts`` files, KNEEL's CSV.

Image releases, as users unpack them (one folder per visit)::

    <root>/00m/contents.csv                                  (or contents.0E1.csv, ...)
    <root>/00m/0.C.2/9000099/20040909/10249506/001       <- DICOM, no suffix
    <root>/12m/1.C.2/9000099/20050913/11300203/001
    ...

``contents*.csv`` has the columns ``Folder, ParticipantID, StudyDate, Barcode`` (or
``AccessionNumber``)``, StudyDescription, SeriesDescription``; ``Folder`` is relative to
the index's folder (also found one or two visit folders deeper, as in ``48m/48m/48m``).
Per-package indexes (``contents.0E1.csv``, ...) may share one folder. The NIMH Data
Archive route ships no contents file: ``image03.txt`` (tab-separated, a description row)
lists ``src_subject_id, image_description, image_file, interview_date`` with
``image_file`` = ``s3://NDAR_Central_1/submission_<n>/00m/0.E.1/<ID>/<date>/<series>.tar.gz``,
one archive per series holding ``<series>/001``; the archive (or its unpacked folder) is
found by the longest tail of that path that exists under the root.

A series' visit comes from the first part of its folder (``0.C.2`` -> V00, ``1.x`` -> V01,
``2.D.x`` -> V02 (18 m), ``3`` V03, ``4.G.x`` V04 (30 m), ``5`` V05, ``6`` V06, ``8`` V08,
``10`` V10), else from the visit folder's name (``00m``, ``OAI_12m``...). Series whose
visit is none of these are skipped and counted.

BoneFinder points: a folder whose path ENDS with the last three parts of ``Folder``
(``<ParticipantID>/<StudyDate>/<series>``) holds ``001.pts`` (the left knee, found on
the radiograph as is) and ``001_f.pts`` (the right knee, found on the mirrored
radiograph), named after the DICOM file. KNEEL's layout
(``landmarks_oai/00/0.C.2/<any>/9000099/20040909/10249506/001.pts``) and ``.pts`` files
put beside the DICOMs both match.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

from kpn_jax import pts as pts_lib
from data_prep.oai import readings as readings_lib

logger = logging.getLogger(__name__)

CONTENTS_PATTERN = re.compile(r"^contents(\.[\w\-]+)?\.csv$", re.IGNORECASE)
IMAGE03_PATTERN = re.compile(r"^image03.*\.txt$", re.IGNORECASE)
BILATERAL_PA = "Bilateral PA Fixed Flexion Knee"
RIGHT_PA = "PA Fixed Flexion Right Knee"
LEFT_PA = "PA Fixed Flexion Left Knee"
KNEE_PA_SERIES = (BILATERAL_PA, RIGHT_PA, LEFT_PA)
DICOM_FILE = "001"
VISIT_CODES = frozenset(readings_lib.MONTHS_TO_VISIT.values())
_VISIT_FOLDER = re.compile(r"^(?:OAI_?)?(\d+)m$", re.IGNORECASE)
_RELEASE_FOLDER = re.compile(r"^(\d+)\.[A-Za-z]\.\d+$")
_ARCHIVE_SUFFIX = re.compile(r"\.tar(\.gz)?$|\.tgz$")   # how the NDA ships a series
INDEX_SEARCH_DEPTH = 3   # root/48m/48m/48m: index files are never deeper

# KNEEL's bf_landmarks_1_0.3.csv: ROIs of 140 mm cut from the radiograph resampled to
# 0.3 mm/pixel and zero-padded by 100 pixels (scripts/create_datasets_from_via.py).
KNEEL_ROI_SPACING_MM = 0.3
KNEEL_PAD_PX = 100


class TreeError(ValueError):
    """The image tree or a keypoint file cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Series:
    """One knee radiograph (bilateral or one knee) listed in an image index."""

    subject_id: str
    visit: str            # two-digit OAI visit code, '00', '01', ...
    folder: str           # <release>/<ID>/<date>/<series>, as the index names it
    dicom_path: Path      # the DICOM file, or the .tar.gz holding it; may not exist
    study_date: str
    barcode: str          # digits; '' when the index has none (then the DICOM's is used)
    description: str = BILATERAL_PA
    member: str | None = None   # the DICOM inside ``dicom_path`` when that is an archive
    index_file: str = ""

    @property
    def key(self) -> tuple[str, ...]:
        """``(ParticipantID, StudyDate, series, file stem)``: how ``.pts`` files are found."""
        stem = Path(self.member).name if self.member else self.dicom_path.name
        return tuple(Path(self.folder).parts[-3:]) + (stem,)

    @property
    def series_id(self) -> str:
        return Path(self.folder).name

    @property
    def sides(self) -> tuple[str, ...]:
        """The knees on the film: both for a bilateral view, else the one named."""
        return sides_of_description(self.description)


def sides_of_description(description: str) -> tuple[str, ...]:
    """``('R', 'L')`` for a bilateral film, ``('R',)`` / ``('L',)`` for one knee's."""
    text = description.lower()
    if "bilateral" in text:
        return ("R", "L")
    if "right" in text:
        return ("R",)
    if "left" in text:
        return ("L",)
    return ("R", "L")


def visit_of_folder(name: str) -> str | None:
    """``'00m'``/``'OAI_12m'`` -> ``'00'``/``'01'``; None for other names, including
    ``NNm`` folders of months that are no OAI visit."""
    match = _VISIT_FOLDER.match(name)
    if not match:
        return None
    return readings_lib.MONTHS_TO_VISIT.get(int(match.group(1)))


def is_months_folder(name: str) -> bool:
    """Whether ``name`` looks like a visit folder (``96m``, ``OAI_120m``), known or not."""
    return _VISIT_FOLDER.match(name) is not None


def visit_of_release(folder: str) -> str | None:
    """The visit code of a release folder path's first part: ``'0.C.2/...'`` -> ``'00'``."""
    first = Path(folder.strip("/")).parts[0] if folder.strip("/") else ""
    match = _RELEASE_FOLDER.match(first)
    if not match:
        return None
    code = f"{int(match.group(1)):02d}"
    return code if code in VISIT_CODES else None


def find_index_files(root: str | os.PathLike,
                     max_depth: int = INDEX_SEARCH_DEPTH) -> tuple[list[Path], list[Path]]:
    """``(contents files, image03 files)`` at most ``max_depth`` folders below ``root``,
    without entering release folders (``0.C.2``: the images themselves)."""
    root = Path(root)
    contents, image03 = [], []
    for directory, subdirs, files in os.walk(root):
        depth = len(Path(directory).relative_to(root).parts)
        subdirs[:] = sorted(d for d in subdirs if depth < max_depth
                            and not _RELEASE_FOLDER.match(d) and not d.isdigit())
        for name in sorted(files):
            if CONTENTS_PATTERN.match(name):
                contents.append(Path(directory) / name)
            elif IMAGE03_PATTERN.match(name):
                image03.append(Path(directory) / name)
    return contents, image03


def _dicom_in(folder: Path) -> Path:
    """The series' DICOM: ``001``, or the folder's only file."""
    preferred = folder / DICOM_FILE
    if preferred.exists() or not folder.is_dir():
        return preferred
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".pts")
    return files[0] if len(files) == 1 else preferred


def _nested_bases(directory: Path, depth: int = 2) -> list[Path]:
    """``directory`` and the visit folders nested in it (``48m/48m/48m``), shallowest first."""
    bases, frontier = [directory], [directory]
    for _ in range(depth):
        frontier = [child for parent in frontier if parent.is_dir()
                    for child in sorted(parent.iterdir())
                    if child.is_dir() and is_months_folder(child.name)]
        bases += frontier
    return bases


def _locate_folder(bases: list[Path], folder: str) -> Path:
    """``<base>/<folder>`` for the first base where it exists (else under the first base)."""
    for base in bases:
        if (base / folder).exists():
            return base / folder
    return bases[0] / folder


def _folder_visit(path: Path) -> str | None:
    """The visit named by the index's folder or one above it (``00m/``, ``OAI_00m/``)."""
    for parent in (path.parent, path.parent.parent):
        visit = visit_of_folder(parent.name)
        if visit is not None:
            return visit
    return None


def _matches(description: str, descriptions) -> bool:
    return description.strip().lower() in {d.strip().lower() for d in descriptions}


def read_contents(contents_csv: str | os.PathLike, descriptions=KNEE_PA_SERIES,
                  skipped: collections.Counter | None = None) -> list[Series]:
    """The series of one ``contents*.csv`` whose SeriesDescription is one of ``descriptions``.

    Args:
      skipped: counts series skipped and why (``series_of_unknown_visit``).

    Raises:
      TreeError: naming the file when a needed column is missing.
    """
    contents_csv = Path(contents_csv)
    skipped = skipped if skipped is not None else collections.Counter()
    try:
        table = pd.read_csv(contents_csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise TreeError(f"{contents_csv}: cannot read ({e})") from e
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in ("Folder", "ParticipantID", "SeriesDescription")
               if c not in table.columns]
    if missing:
        raise TreeError(f"{contents_csv}: columns {missing} missing; has {list(table.columns)}")
    barcode_column = next((c for c in ("Barcode", "AccessionNumber") if c in table.columns), None)
    folder_visit = _folder_visit(contents_csv)
    bases = _nested_bases(contents_csv.parent)
    series = []
    for _, row in table.iterrows():
        description = row["SeriesDescription"].strip()
        if not _matches(description, descriptions):
            continue
        folder = row["Folder"].strip().strip("/")
        visit = visit_of_release(folder) or folder_visit
        if visit is None:
            skipped["series_of_unknown_visit"] += 1
            continue
        series.append(Series(
            subject_id=readings_lib.normalise_id(row["ParticipantID"]),
            visit=visit, folder=folder,
            dicom_path=_dicom_in(_locate_folder(bases, folder)),
            study_date=str(row.get("StudyDate", "")).strip(),
            barcode=readings_lib.normalise_barcode(row[barcode_column]) if barcode_column else "",
            description=description, index_file=str(contents_csv)))
    return series


def _archive_member(archive: Path) -> str:
    """The DICOM inside a series archive: the member named ``001``, else the only file; ``001``
    when neither is found (reading it then fails and names the archive)."""
    try:
        with tarfile.open(archive) as tar:
            files = [m.name for m in tar.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError):
        return DICOM_FILE
    named = [f for f in files if Path(f).name == DICOM_FILE]
    if len(named) == 1:
        return named[0]
    if len(files) == 1:
        return files[0]
    return DICOM_FILE


def _locate_nda_file(roots: list[Path], parts: tuple[str, ...]) -> tuple[Path, str | None]:
    """``(path, member)`` of an ``image_file``: the archive and the DICOM inside it, or the
    DICOM of the folder it was unpacked to (member None), found under any root by the
    longest tail of its path; when absent, where it was expected."""
    is_archive = _ARCHIVE_SUFFIX.search(parts[-1]) is not None
    unpacked = list(parts[:-1]) + [_ARCHIVE_SUFFIX.sub("", parts[-1])]
    for start in range(len(parts)):
        for root in roots:
            path = root.joinpath(*parts[start:])
            if path.is_file():
                return path, _archive_member(path) if is_archive else None
            folder = root.joinpath(*unpacked[start:])
            if folder.is_dir():
                return _dicom_in(folder), None
    return roots[0].joinpath(*parts), DICOM_FILE if is_archive else None


def read_image03(image03: str | os.PathLike, root: str | os.PathLike,
                 descriptions=KNEE_PA_SERIES,
                 skipped: collections.Counter | None = None) -> list[Series]:
    """The knee series listed in an NDA ``image03.txt`` (module docstring).

    Raises:
      TreeError: naming the file when a needed column is missing.
    """
    image03 = Path(image03)
    skipped = skipped if skipped is not None else collections.Counter()
    try:
        table = pd.read_csv(image03, sep="\t", dtype=str, keep_default_na=False,
                            encoding="latin-1")
    except (OSError, ValueError) as e:
        raise TreeError(f"{image03}: cannot read ({e})") from e
    table.columns = [c.strip().lower() for c in table.columns]
    missing = [c for c in ("src_subject_id", "image_description", "image_file")
               if c not in table.columns]
    if missing:
        raise TreeError(f"{image03}: columns {missing} missing; has {list(table.columns)}")
    if len(table) and not table["src_subject_id"].iloc[0].strip().isdigit():
        table = table.iloc[1:]   # the NDA's second line: the columns' descriptions
    roots = [Path(root), image03.parent]
    series = []
    for _, row in table.iterrows():
        description = row["image_description"].strip()
        if not _matches(description, descriptions):
            continue
        path = re.sub(r"^[a-z0-9]+://[^/]+/", "", row["image_file"].strip())  # s3://bucket/
        parts = Path(path).parts   # submission_<n>/00m/0.E.1/<ID>/<date>/<series>.tar.gz
        months = next((visit_of_folder(p) for p in parts if is_months_folder(p)), None)
        release = next((i for i, p in enumerate(parts) if _RELEASE_FOLDER.match(p)), None)
        folder = "/".join(parts[release:]) if release is not None else "/".join(parts)
        folder = _ARCHIVE_SUFFIX.sub("", folder)
        visit = visit_of_release(folder) or months
        if visit is None:
            skipped["series_of_unknown_visit"] += 1
            continue
        dicom_path, member = _locate_nda_file(roots, parts)
        series.append(Series(
            subject_id=readings_lib.normalise_id(row["src_subject_id"]), visit=visit,
            folder=folder, dicom_path=dicom_path,
            study_date=str(row.get("interview_date", "")).strip(),
            barcode=readings_lib.normalise_barcode(row.get("barcode", "")),
            description=description, member=member, index_file=str(image03)))
    return series


def read_image_indexes(root: str | os.PathLike, descriptions=KNEE_PA_SERIES
                       ) -> tuple[list[Series], dict]:
    """Every knee series of every image index under ``root``, each film once.

    Returns:
      ``(series, report)``: the report lists the index files and counts series skipped
      (unknown visit), listed twice, and visit folders that hold images but no index.

    Raises:
      FileNotFoundError: when ``root`` has no image index at all.
    """
    root = Path(root)
    contents, image03 = find_index_files(root)
    if not contents and not image03:
        raise FileNotFoundError(f"{root}: no image index (contents*.csv in a visit folder such "
                                f"as 00m/, or the NDA's image03.txt)")
    skipped: collections.Counter = collections.Counter()
    listed = [s for f in contents for s in read_contents(f, descriptions, skipped)]
    listed += [s for f in image03 for s in read_image03(f, root, descriptions, skipped)]
    unique, seen = [], set()
    for s in listed:
        key = (s.subject_id, s.visit, s.folder)
        if key in seen:
            skipped["series_listed_twice"] += 1
            continue
        seen.add(key)
        unique.append(s)
    covered = {s.visit for s in unique}
    unindexed = sorted(str(d) for d in root.iterdir() if d.is_dir()
                       and visit_of_folder(d.name) not in covered | {None})
    for d in unindexed:
        logger.warning("%s: a visit folder, but no image index lists a series of its visit "
                       "(no contents*.csv, no image03.txt row); its images are not used", d)
    unknown = sorted(str(d) for d in root.iterdir()
                     if d.is_dir() and is_months_folder(d.name) and visit_of_folder(d.name) is None)
    for d in unknown:
        logger.warning("%s: not an OAI visit (%s); its images are not used", d,
                       sorted(readings_lib.MONTHS_TO_VISIT))
    report = {"index_files": [str(p) for p in contents + image03],
              "visit_folders_without_index": unindexed, "folders_of_unknown_visits": unknown,
              **dict(skipped)}
    return unique, report


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
