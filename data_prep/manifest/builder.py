"""TFDS builder for radiographs listed in a CSV manifest (a hospital's own data).

One row per knee. Columns (header names; others are ignored):

- ``image`` (required): PNG, JPEG, 16-bit PNG, TIFF or DICOM, as acquired (not mirrored);
  relative paths are taken from the manifest's folder (or ``image_root``).
- ``subject_id`` (required): the person; splits never separate a person's knees. Ids
  that differ only in case or spaces are one person (the build summary lists them).
- ``side`` (required): ``R``/``L`` (also right/left, 1/2 as in the OAI).
- grades, any subset of ``kl, jsn_lateral, jsn_medial, ost_femur_lateral,
  ost_femur_medial, ost_tibia_lateral, ost_tibia_medial``; blank, ``NA``, ``N/A``, ``nan``,
  ``none``, ``null``, ``missing``, ``-`` or ``.`` = not graded (that grade only).
- keypoints (optional), either ``keypoints``: 32 numbers ``x0 y0 ... x15 y15`` (kneel16,
  pixels of the image as given; separated by spaces, commas or semicolons) or ``pts``:
  a ``.pts`` file (16 kneel16 points, or a BoneFinder shape; ``*_f.pts`` = found on the
  mirrored image; in mm when the image has a pixel spacing, see ``pts_units``).
- ``keypoints_predicted`` (optional, 1/0): default 1 for ``pts`` (a detector wrote it),
  0 for inline keypoints.
- ``split`` (optional): train, validation (or val), test, unlabeled; blank = automatic:
  graded rows by a hash of ``subject_id`` (2:1:1), ungraded rows to ``unlabeled``.
- ``image_id`` (optional): default ``<image path without suffix>-<side>``.

With an id salt (``--id_salt_file``), ``subject_id`` and ``image_id`` are stored as salted
pseudonyms (:mod:`kpn_jax.identifiers`), never as written in the manifest.

A row with keypoints is cut around the joint centre: ``roi_px`` pixels, else ``roi_mm``
when the image has a pixel spacing; otherwise (and for rows without keypoints, which
must then be single-knee images) the whole image is used, padded to a square. Left
knees are mirrored. Each row problem is reported with its row number (header = row 1);
``strict`` makes any of them fatal.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_prep import features as features_lib
from kpn_jax import framing as framing_lib
from kpn_jax import identifiers, image_io
from kpn_jax import pts as pts_lib
from data_prep import tfds_util
from kpn_jax import grades as grades_lib
from kpn_jax import keypoints as kp_lib

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "subject_id", "side")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation",
               "test": "test", "unlabeled": "unlabeled", "unlabelled": "unlabeled"}
WINDOWS = framing_lib.WINDOWS
PTS_UNITS = framing_lib.PTS_UNITS
UNLABELED_SUBJECTS = ("train", "all")
KEYPOINT_SOURCES = ("given", "detector")
_SIDES = {"r": "R", "right": "R", "1": "R", "l": "L", "left": "L", "2": "L"}
_TRUE = {"1", "true", "yes", "y"}
_FALSE = {"0", "false", "no", "n"}


class ManifestError(ValueError):
    """The manifest cannot be used (strict mode, or a missing column); names the rows."""


@dataclasses.dataclass(frozen=True)
class ManifestOptions:
    """What defines the dataset's content (also the TFDS config's fields)."""

    image_size: int = 320
    roi_mm: float = 140.0
    roi_px: float = 0.0          # > 0: ROI side in source pixels, overrides roi_mm
    window: str = "auto"         # auto: 8-bit images as they are, others like 'image'
    window_percentiles: tuple[float, float] = image_io.DEFAULT_PERCENTILES
    pts_units: str = "auto"      # auto: mm when the image has a pixel spacing
    unlabeled_subjects: str = "train"
    split_seed: int = 0
    # Non-empty: subject and image ids are stored as salted pseudonyms
    # (kpn_jax.identifiers); the salt's fingerprint, never the salt.
    id_salt_fingerprint: str = ""
    # 'given': rows without keypoints are stored whole; 'detector': a landmark detector
    # finds their knee on the film (named by detector_digest), which is then cut out.
    keypoints: str = "given"
    detector_digest: str = ""

    def framing(self) -> framing_lib.KneeFraming:
        """How each knee is cut out, windowed and sized (recorded in the build summary)."""
        return framing_lib.KneeFraming(
            image_size=self.image_size, roi_mm=self.roi_mm, roi_px=self.roi_px,
            window=self.window, window_percentiles=tuple(self.window_percentiles),
            pts_units=self.pts_units)

    def __post_init__(self):
        if self.image_size <= 0 or self.roi_mm <= 0 or self.roi_px < 0:
            raise ValueError(f"image_size and roi_mm must be positive and roi_px >= 0, got "
                             f"{self.image_size}, {self.roi_mm}, {self.roi_px}")
        self.framing()  # checks window and pts_units as every framing is checked
        for name, value, choices in (("unlabeled_subjects", self.unlabeled_subjects,
                                      UNLABELED_SUBJECTS),
                                     ("keypoints", self.keypoints, KEYPOINT_SOURCES)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.keypoints == "detector" and not self.detector_digest:
            raise ValueError("keypoints='detector' needs a landmark detector (detector_digest)")


@dataclasses.dataclass(frozen=True)
class RowJob:
    """One manifest row that passed the checks."""

    row: int                           # as a spreadsheet numbers it (header = 1)
    image_path: Path
    image_id: str
    subject_id: str
    side: str
    grades: np.ndarray                 # int32 [7], -1 = not graded
    keypoints: np.ndarray | None       # [16, 2] inline, pixels of the image as given
    pts_path: Path | None
    keypoints_predicted: bool
    split: str
    knees_on_film: int = 1             # rows of the manifest with this image


def new_summary() -> dict:
    return {"rows": 0, "row_problems": [], "subject_ids_merged": {},
            "planned": collections.Counter(),
            "written": collections.Counter(), "with_keypoints": collections.Counter(),
            "keypoints_detected": collections.Counter(), "detections_low_confidence": [],
            "unlabeled_rows_of_held_out_subjects": 0}


summary_as_json = tfds_util.summary_as_json


# How spreadsheets and hospital exports write "not graded" (compared case-insensitively).
MISSING_SPELLINGS = frozenset({"", "na", "n/a", "nan", "none", "null", "missing", "-", "."})


def parse_grade(text: str, task: str) -> int:
    """A grade cell -> int; blank or a missing-value spelling (NA, N/A, nan, ...) -> -1.

    Raises:
      ValueError: for a non-integer, infinite or out-of-range grade, naming the task's range.
    """
    text = text.strip()
    if text.lower() in MISSING_SPELLINGS:
        return grades_lib.MISSING
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not np.isfinite(value):
        raise ValueError(f"{text!r} is not a finite grade (blank or NA = not graded)")
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole grade")
    if not 0 <= value < grades_lib.NUM_CLASSES[task]:
        raise ValueError(f"{int(value)} out of range 0..{grades_lib.NUM_CLASSES[task] - 1} "
                         "(blank = not graded)")
    return int(value)


def parse_keypoints(text: str) -> np.ndarray:
    """``'x0 y0 x1 y1 ...'`` (spaces, commas or semicolons) -> float32 ``[16, 2]``.

    Raises:
      ValueError: for non-numbers or a count other than 32.
    """
    fields = [f for f in re.split(r"[\s,;]+", text.strip()) if f]
    try:
        values = np.asarray([float(f) for f in fields], dtype=np.float32)
    except ValueError:
        raise ValueError("not a list of numbers") from None
    expected = 2 * kp_lib.KNEEL16.num_points
    if len(values) != expected:
        raise ValueError(f"{len(values)} numbers; expected {expected} (x y of the "
                         f"{kp_lib.KNEEL16.num_points} kneel16 points)")
    if not np.all(np.isfinite(values)):
        raise ValueError("a value is NaN or inf")
    return values.reshape(-1, 2)


def _resolve(path_text: str, root: Path) -> Path:
    path = Path(path_text.strip()).expanduser()
    return path if path.is_absolute() else root / path


def _check_row(number: int, row: dict, root: Path):
    """One row -> (fields for a RowJob without split, [problems]); problems name the row."""
    problems = []

    def problem(column, message):
        problems.append(f"row {number}: {column}: {message}")

    image_text = (row.get("image") or "").strip()
    image_path = _resolve(image_text, root) if image_text else None
    if not image_text:
        problem("image", "empty")
    elif not image_path.is_file():
        problem("image", f"file not found: {image_path}")
    subject = " ".join((row.get("subject_id") or "").split())
    if not subject:
        problem("subject_id", "empty")
    side = _SIDES.get((row.get("side") or "").strip().lower())
    if side is None:
        problem("side", f"{row.get('side')!r} is not R or L")
    grades = []
    for task in grades_lib.TASKS:
        try:
            grades.append(parse_grade(row.get(task) or "", task))
        except ValueError as e:
            problem(task, str(e))
            grades.append(grades_lib.MISSING)
    keypoints, pts_path = None, None
    inline = (row.get("keypoints") or "").strip()
    pts_text = (row.get("pts") or "").strip()
    if inline and pts_text:
        problem("keypoints", "give either keypoints or pts, not both")
    elif inline:
        try:
            keypoints = parse_keypoints(inline)
        except ValueError as e:
            problem("keypoints", str(e))
    elif pts_text:
        pts_path = _resolve(pts_text, root)
        try:  # read now so that a wrong file is a row problem before any image is decoded
            pts_lib.to_kneel16(pts_lib.read_pts(pts_path), source=str(pts_path))
        except pts_lib.PtsError as e:
            problem("pts", str(e))
    predicted_text = (row.get("keypoints_predicted") or "").strip().lower()
    if predicted_text in _TRUE | _FALSE:
        predicted = predicted_text in _TRUE
    else:
        if predicted_text:
            problem("keypoints_predicted", f"{predicted_text!r} is not 1 or 0")
        predicted = pts_path is not None
    split_text = (row.get("split") or "").strip().lower()
    split = SPLIT_NAMES.get(split_text) if split_text else None
    if split_text and split is None:
        problem("split", f"{row.get('split')!r} is not one of {sorted(set(SPLIT_NAMES))}")
    image_id = (row.get("image_id") or "").strip()
    if not image_id and image_text and side:
        image_id = f"{Path(image_text).with_suffix('').as_posix()}-{side}"
    fields = dict(row=number, image_path=image_path, image_id=image_id, subject_id=subject,
                  side=side, grades=np.asarray(grades, np.int32), keypoints=keypoints,
                  pts_path=pts_path, keypoints_predicted=predicted, split=split)
    return fields, problems


def _has_keypoints(fields: dict) -> bool:
    return fields["keypoints"] is not None or fields["pts_path"] is not None


def by_row(problems: list[str]) -> list[str]:
    """Row problems (``'row N: ...'``) in the manifest's row order."""
    return sorted(problems, key=lambda p: int(re.match(r"row (\d+)", p).group(1)))


def _duplicate_problems(fields: dict, seen_ids: dict, seen_images: dict,
                        detector: bool = False) -> list[str]:
    """A row that repeats an earlier knee: the same ``image_id``, or the same whole image
    (no keypoints to cut a knee from it, and no ``detector`` to find them) under another
    side."""
    number, image_id = fields["row"], fields["image_id"]
    first = seen_ids.get(image_id)
    if first is not None:
        sides = (f" (side {first['side']} there, {fields['side']} here: give each knee its own "
                 "image_id)" if first["side"] != fields["side"] else "")
        return [f"row {number}: image_id: {image_id!r} is also row {first['row']}{sides}"]
    first = seen_images.get(fields["image_path"].resolve())
    if first is not None and not detector and not (_has_keypoints(first)
                                                   and _has_keypoints(fields)):
        return [f"row {number}: image: {fields['image_path']} is also row {first['row']} "
                f"(side {first['side']} there, {fields['side']} here); without keypoints on "
                "both rows the whole image is one knee, so it cannot be listed twice (give "
                "keypoints to cut each knee of a bilateral film)"]
    return []


def read_manifest_rows(manifest_path: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """The manifest's header and rows (as text).

    Raises:
      ManifestError: naming the file when it cannot be read or lacks a required column.
    """
    manifest_path = Path(manifest_path)
    try:
        with open(manifest_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{manifest_path}: cannot read ({e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(f"{manifest_path}: required columns {missing} missing; has {header}")
    rows = [{(k or "").strip(): v for k, v in row.items()} for row in rows]
    return header, rows


def plan_manifest(manifest_path: str | os.PathLike, options: ManifestOptions = ManifestOptions(),
                  image_root: str | os.PathLike | None = None,
                  strict: bool = False, id_salt: bytes | None = None
                  ) -> tuple[dict[str, list[RowJob]], dict]:
    """Checks every row (reads .pts files, no image) and assigns splits (from the real
    subject ids, so the splits do not depend on the salt). With ``id_salt`` (which must
    match ``options.id_salt_fingerprint``) the jobs carry pseudonymous subject and image
    ids.

    Returns:
      ``({split: [RowJob]}, summary)``; rows with problems are left out and listed in
      ``summary['row_problems']``.

    Raises:
      ManifestError: a required column is missing; or, when ``strict``, listing every
        row problem.
    """
    manifest_path = Path(manifest_path)
    root = Path(image_root) if image_root is not None else manifest_path.parent
    salted = identifiers.salt_fingerprint(id_salt) if id_salt is not None else ""
    if salted != options.id_salt_fingerprint:
        raise ManifestError(f"the id salt ({salted or 'none'}) does not match the dataset's "
                            f"options ({options.id_salt_fingerprint or 'none'})")
    header, rows = read_manifest_rows(manifest_path)
    summary = new_summary()
    summary["rows"] = len(rows)
    checked, problems = [], []
    seen_ids: dict[str, dict] = {}
    seen_images: dict[Path, dict] = {}
    for number, row in enumerate(rows, start=2):
        fields, row_problems = _check_row(number, row, root)
        if not row_problems:
            row_problems += _duplicate_problems(fields, seen_ids, seen_images,
                                                detector=options.keypoints == "detector")
        if row_problems:
            problems += row_problems
            continue
        seen_ids[fields["image_id"]] = fields
        seen_images.setdefault(fields["image_path"].resolve(), fields)
        checked.append(fields)

    # One person, one id: ids that differ only in case or spaces (S13, s13) are merged into
    # the first spelling, and the summary lists the merges.
    spellings: dict[str, list[str]] = {}
    for fields in checked:
        known = spellings.setdefault(fields["subject_id"].casefold(), [fields["subject_id"]])
        if fields["subject_id"] not in known:
            known.append(fields["subject_id"])
        fields["subject_id"] = known[0]
    summary["subject_ids_merged"] = {names[0]: names for names in spellings.values()
                                     if len(names) > 1}

    # Splits: a person's graded knees stay in one split.
    subject_split: dict[str, tuple[str, int]] = {}
    for fields in checked:
        graded = bool(np.any(fields["grades"] != grades_lib.MISSING))
        if fields["split"] is None and graded:
            fields["split"] = features_lib.subject_split(fields["subject_id"], options.split_seed)
        if fields["split"] in ("train", "validation", "test"):
            first = subject_split.setdefault(fields["subject_id"], (fields["split"], fields["row"]))
            if first[0] != fields["split"]:
                problems.append(f"row {fields['row']}: split: subject {fields['subject_id']!r} is in "
                                f"{first[0]!r} at row {first[1]}, here in {fields['split']!r}")
                fields["split"] = "conflict"
    knees_on_film = collections.Counter(fields["image_path"].resolve() for fields in checked)
    jobs: dict[str, list[RowJob]] = {}
    for fields in checked:
        if fields["split"] == "conflict":
            continue
        fields["knees_on_film"] = knees_on_film[fields["image_path"].resolve()]
        if fields["split"] is None or fields["split"] == "unlabeled":
            held_out = subject_split.get(fields["subject_id"], ("train",))[0] != "train"
            if options.unlabeled_subjects == "train" and held_out:
                summary["unlabeled_rows_of_held_out_subjects"] += 1
                continue
            fields["split"] = "unlabeled"
        if id_salt is not None:
            fields["subject_id"] = identifiers.pseudonym(fields["subject_id"], id_salt)
            fields["image_id"] = identifiers.pseudonym(fields["image_id"], id_salt)
        job = RowJob(**fields)
        jobs.setdefault(job.split, []).append(job)
        summary["planned"][job.split] += 1
        if job.keypoints is not None or job.pts_path is not None:
            summary["with_keypoints"][job.split] += 1
    summary["row_problems"] = by_row(problems)
    if problems:
        if strict:
            raise ManifestError(f"{manifest_path}: {len(problems)} row problem(s):\n  "
                                + "\n  ".join(problems))
        for p in problems:  # the command line prints them all after the build
            logger.debug("%s: %s (row skipped)", manifest_path.name, p)
    return jobs, summary


def row_example(job: RowJob, options: ManifestOptions, detector=None,
                summary: dict | None = None) -> dict:
    """Reads one row's image and returns its example, framed by
    :func:`kpn_jax.framing.frame_knee` (what predict does to a file too); with
    ``options.keypoints == 'detector'`` a row without keypoints gets the ``detector``'s.

    Raises:
      image_io.ImageReadError: naming the file.
      pts_lib.PtsError: naming the .pts file.
    """
    framing = options.framing()
    radiograph = image_io.read_image(job.image_path)
    height, width = radiograph.shape
    keypoints = job.keypoints
    if job.pts_path is not None:
        in_mm = framing.pts_in_mm(radiograph)
        if in_mm and radiograph.spacing_mm is None:
            raise pts_lib.PtsError(f"{job.pts_path}: in mm but {job.image_path} has no pixel "
                                   "spacing")
        keypoints = pts_lib.read_knee_pts(job.pts_path, radiograph.spacing_mm if in_mm else None,
                                          image_width=width)
    if keypoints is not None:
        keypoints = kp_lib.validate_keypoints(
            keypoints, name=str(job.pts_path) if job.pts_path is not None else "inline points",
            image_shape=(height, width))
    predicted = job.keypoints_predicted
    if keypoints is None and options.keypoints == "detector":
        if detector is None:
            raise ValueError("keypoints='detector' but no landmark detector was given")
        keypoints, shift_mm = framing_lib.locate_knee(radiograph, job.side, framing, detector,
                                                     job.knees_on_film)
        predicted = True
        if summary is not None:
            summary["keypoints_detected"][job.split] += 1
            if shift_mm > framing_lib.LOW_CONFIDENCE_SHIFT_MM:
                summary["detections_low_confidence"].append(
                    f"row {job.row}: {job.image_id} (moved {shift_mm:.1f} mm in the last pass)")
    knee, out_points = framing_lib.frame_knee(radiograph, keypoints, job.side, framing)
    num_points = kp_lib.KNEEL16.num_points
    valid = np.full(num_points, out_points is not None)
    if out_points is None:
        out_points = np.zeros((num_points, 2), np.float32)
    return features_lib.make_example(
        knee, out_points, job.grades, subject_id=job.subject_id,
        image_id=job.image_id, side=job.side, keypoints_valid=valid,
        keypoints_predicted=predicted and bool(valid.any()))


def generate_examples(jobs: Iterable[RowJob], options: ManifestOptions, summary: dict,
                      strict: bool = False, detector=None) -> Iterator[tuple[str, dict]]:
    """``(key, example)`` per row whose image reads; the others are row problems.

    Raises:
      ManifestError: in strict mode at the first unreadable row; or when no row of the
        split could be read.
    """
    jobs = list(jobs)
    written = 0
    for job in jobs:
        try:
            example = row_example(job, options, detector, summary)
        except (image_io.ImageReadError, pts_lib.PtsError, ValueError) as e:
            column = ("image" if isinstance(e, image_io.ImageReadError) else
                      "pts" if isinstance(e, pts_lib.PtsError) else "keypoints")
            problem = f"row {job.row}: {column}: {e}"
            if strict:
                raise ManifestError(problem) from e
            logger.debug("%s (row skipped)", problem)
            # Found while writing, after the table's problems: kept in row order.
            summary["row_problems"] = by_row(summary["row_problems"] + [problem])
            continue
        summary["written"][job.split] += 1
        written += 1
        yield job.image_id, example
    if jobs and not written:
        raise ManifestError(f"split {jobs[0].split!r}: none of its {len(jobs)} rows could be read")


@dataclasses.dataclass
class ManifestConfig(tfds.core.BuilderConfig):
    """A TFDS config: a name and the :class:`ManifestOptions` it stands for."""

    options: ManifestOptions = ManifestOptions()


class Manifest(tfds.core.GeneratorBasedBuilder):
    """Knee radiographs listed in a CSV (see the module docstring for its columns).

    Constructor arguments beside TFDS's: ``manifest_path`` (required to build),
    ``image_root`` (default: the manifest's folder), ``strict``, ``id_salt``, ``detector``
    (a loaded landmark detector, for ``keypoints='detector'``). After
    ``download_and_prepare``, ``summary`` holds the build summary.
    """

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "2.0.0": "Images stored as raw uint8 pixels instead of PNG (no decoding when read)."}
    BUILDER_CONFIGS = [ManifestConfig(name="default", description="320 px, 140 mm ROI")]

    def __init__(self, *, manifest_path=None, image_root=None, strict=False, id_salt=None,
                 detector=None, **kwargs):
        self._detector = detector
        self._manifest_path = manifest_path
        self._image_root = image_root
        self._strict = strict
        self._id_salt = id_salt
        self.summary = new_summary()
        super().__init__(**kwargs)

    @property
    def options(self) -> ManifestOptions:
        return self.builder_config.options

    def _info(self):
        return tfds_util.example_info(self)

    def _split_generators(self, dl_manager):
        if self._manifest_path is None:
            raise ManifestError("Manifest builder: pass manifest_path=<the CSV>")
        jobs, self.summary = plan_manifest(self._manifest_path, self.options, self._image_root,
                                           self._strict, self._id_salt)
        return tfds_util.split_generators(self, jobs, self._manifest_path, "row",
                                          error=ManifestError)

    def _generate_examples(self, jobs):
        yield from generate_examples(jobs, self.options, self.summary, self._strict,
                                     self._detector)
