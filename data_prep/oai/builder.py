"""TFDS builder for the Osteoarthritis Initiative knee radiographs (manual download).

One example per knee per bilateral PA fixed-flexion radiograph: the ROI centred on the
joint (the mean of the femur and tibia keypoint centroids), ``roi_mm`` millimetres
square, left knees mirrored, resized to ``image_size``; keypoints follow the image.
Knees with grades go to a subject-level 2:1:1 train/validation/test split; knees with
an image but no reading go to ``unlabeled``, except (by default) those of subjects whose
graded knees are in validation or test. See docs/DATASETS.md for the choices.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_prep import features as features_lib
from kpn_jax import image_io
from kpn_jax import pts as pts_lib
from kpn_jax import roi as roi_lib
from data_prep import tfds_util
from data_prep.oai import readings as readings_lib
from data_prep.oai import tree as tree_lib
from kpn_jax import grades as grades_lib
from kpn_jax import keypoints as kp_lib

logger = logging.getLogger(__name__)

WINDOWS = ("image", "dicom", "roi")
UNLABELED_SUBJECTS = ("train", "all")
# Pixel spacings that differ by more than this between rows and columns make a
# "square ROI in mm" ambiguous; such radiographs are skipped (none expected in OAI).
MAX_ANISOTROPY = 0.01

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
The OAI is not downloadable without an account: get it from the NIMH Data Archive
(https://nda.nih.gov/oai) and put in manual_dir:

  <manual_dir>/00m/contents.csv, <manual_dir>/00m/0.C.2/<ID>/<date>/<series>/001, ...
      the image releases of the visits you want (00m, 12m, 24m, 36m, 48m, 72m, 96m),
      unpacked as released (one folder per visit, each with its contents.csv);
  kxr_sq_bu00.sas7bdat ... kxr_sq_bu10.sas7bdat (X-ray assessments - SAS), or the
      ASCII kxr_sq_bu??.txt, or the NDA structure oai_kxrsemiquant01.txt, anywhere in
      manual_dir (or pass --readings);
  BoneFinder .pts files (001.pts = left knee, 001_f.pts = right knee found on the
      mirrored image, in mm) in folders ending <ID>/<date>/<series> (or pass --pts_dir),
      and/or KNEEL's bf_landmarks_1_0.3.csv (pass --kneel_csv).
Then: python -m data_prep.oai --manual_dir=<manual_dir> --data_dir=<data_dir>
"""


@dataclasses.dataclass(frozen=True)
class KneeJob:
    """One knee to write: everything but the pixels."""

    image_id: str
    subject_id: str
    side: str
    visit: str
    dicom_path: Path
    spacing_mm: tuple[float, float]
    keypoints: np.ndarray          # [16, 2] kneel16, pixels of the raw radiograph
    keypoints_predicted: bool
    grades: np.ndarray             # int32 [7], -1 = not graded
    split: str


@dataclasses.dataclass(frozen=True)
class OaiOptions:
    """What defines the dataset's content (also the TFDS config's fields)."""

    image_size: int = 320
    roi_mm: float = 140.0
    series_description: str = tree_lib.BILATERAL_PA
    readprj_priority: tuple[str, ...] = readings_lib.DEFAULT_READPRJ_PRIORITY
    window: str = "image"
    window_percentiles: tuple[float, float] = image_io.DEFAULT_PERCENTILES
    unlabeled_subjects: str = "train"
    split_seed: int = 0

    def __post_init__(self):
        if self.image_size <= 0 or self.roi_mm <= 0:
            raise ValueError(f"image_size and roi_mm must be positive, got {self.image_size}, "
                             f"{self.roi_mm}")
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {self.window!r}")
        if self.unlabeled_subjects not in UNLABELED_SUBJECTS:
            raise ValueError(f"unlabeled_subjects must be one of {UNLABELED_SUBJECTS}, "
                             f"got {self.unlabeled_subjects!r}")


def new_summary() -> dict:
    """The build summary: counts, and the files that could not be used."""
    return {
        "series_listed": 0,
        "images_missing": [],
        "images_unreadable": [],
        "images_without_pixel_spacing": [],
        "keypoint_files_unusable": [],
        "knees_without_keypoints": 0,
        "keypoints_source": collections.Counter(),
        "unlabeled_knees_of_held_out_subjects": 0,
        "readings_without_image": 0,
        "planned": collections.Counter(),
        "written": collections.Counter(),
        "readings": {},
    }


summary_as_json = tfds_util.summary_as_json


def _isotropic_spacing(spacing_mm) -> float | None:
    row, column = spacing_mm
    return column if abs(row - column) <= MAX_ANISOTROPY * max(row, column) else None


def _knee_keypoints(series: tree_lib.Series, side: str, header: image_io.DicomHeader,
                    pts_index: dict, kneel_rows: dict, kneel_ok: bool, summary: dict):
    """kneel16 pixels of one knee and whether a detector placed them, or (None, None).

    KNEEL's CSV (BoneFinder points refined by a person, baseline only) wins over a raw
    BoneFinder file. Unusable files are warned about and recorded in the summary.
    """
    kneel = kneel_rows.get((series.subject_id, side)) if series.visit == "00" else None
    if kneel is not None and kneel_ok:
        points = tree_lib.kneel_roi_to_image(kneel.points_roi, side, kneel.bbox, header.spacing_mm)
        source, predicted, name = "kneel_csv", False, kneel.source
    else:
        files = pts_index.get(series.key, {})
        try:
            points = tree_lib.bonefinder_keypoints(files, side, header.spacing_mm, header.columns)
        except pts_lib.PtsError as e:
            logger.warning("skipping the %s knee of %s: %s", side, series.dicom_path, e)
            summary["keypoint_files_unusable"].append(str(files.get(side == "R")))
            return None, None
        if points is None:
            return None, None
        source, predicted, name = "bonefinder", True, str(files.get(side == "R"))
    try:
        points = kp_lib.validate_keypoints(points, name=name,
                                           image_shape=(header.rows, header.columns))
    except ValueError as e:
        logger.warning("skipping the %s knee of %s: %s (are the .pts in mm?)", side,
                       series.dicom_path, e)
        summary["keypoint_files_unusable"].append(name)
        return None, None
    summary["keypoints_source"][source] += 1
    return points, predicted


def plan_oai(manual_dir: str | os.PathLike, options: OaiOptions = OaiOptions(),
             readings_files: Sequence[str | os.PathLike] | None = None,
             pts_dir: str | os.PathLike | None = None,
             kneel_csv: str | os.PathLike | None = None) -> tuple[dict[str, list[KneeJob]], dict]:
    """Finds every knee to write, reading only DICOM headers.

    Args:
      manual_dir: the OAI tree (see :data:`MANUAL_DOWNLOAD_INSTRUCTIONS`).
      options: the dataset's options.
      readings_files: readings files; None = every one found under ``manual_dir``.
      pts_dir: where the BoneFinder ``.pts`` files are; None = ``manual_dir``.
      kneel_csv: KNEEL's landmark CSV, or None.

    Returns:
      ``({split: [KneeJob]}, summary)``.

    Raises:
      FileNotFoundError / TreeError / ReadingsError: naming what is missing or malformed.
    """
    manual_dir = Path(manual_dir)
    summary = new_summary()
    contents_files = tree_lib.find_contents_files(manual_dir)
    if not contents_files:
        raise FileNotFoundError(f"{manual_dir}: no <visit>/contents.csv (e.g. 00m/contents.csv)"
                                f"\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")
    series = [s for f in contents_files
              for s in tree_lib.read_contents(f, options.series_description)]
    summary["series_listed"] = len(series)

    if readings_files is None:
        readings_files = readings_lib.find_readings_files(manual_dir)
    if not readings_files:
        logger.warning("%s: no readings files found; every knee goes to 'unlabeled'", manual_dir)
    report = readings_lib.ReadingsReport()
    readings = readings_lib.load_readings(readings_files, options.readprj_priority, report)
    summary["readings"] = report.as_dict()

    pts_index = tree_lib.index_pts(pts_dir if pts_dir is not None else manual_dir)
    kneel_rows = tree_lib.read_kneel_csv(kneel_csv) if kneel_csv else {}
    # KNEEL's CSV names no series: it is used only where a subject has one baseline series.
    baseline_series = collections.Counter(s.subject_id for s in series if s.visit == "00")
    per_visit = collections.Counter((s.subject_id, s.visit) for s in series)

    graded_subjects = {subject for subject, _, _ in readings}
    jobs: dict[str, list[KneeJob]] = {split: [] for split in features_lib.SPLITS}
    used_readings = set()
    for s in sorted(series, key=lambda s: (s.subject_id, s.visit, s.folder)):
        if not s.dicom_path.is_file():
            logger.warning("skipping %s: DICOM missing (listed in contents.csv)", s.dicom_path)
            summary["images_missing"].append(str(s.dicom_path))
            continue
        try:
            header = image_io.read_dicom_header(s.dicom_path)
        except image_io.ImageReadError as e:
            logger.warning("skipping unreadable DICOM %s", e)
            summary["images_unreadable"].append(str(s.dicom_path))
            continue
        if header.spacing_mm is None or _isotropic_spacing(header.spacing_mm) is None:
            logger.warning("skipping %s: pixel spacing %s is missing or not square", s.dicom_path,
                           header.spacing_mm)
            summary["images_without_pixel_spacing"].append(str(s.dicom_path))
            continue
        for side in ("R", "L"):
            points, predicted = _knee_keypoints(s, side, header, pts_index, kneel_rows,
                                                baseline_series[s.subject_id] == 1, summary)
            if points is None:
                summary["knees_without_keypoints"] += 1
                continue
            reading = readings.get((s.subject_id, s.visit, side))
            if reading is not None:
                used_readings.add((s.subject_id, s.visit, side))
                grades = reading[0]
                split = features_lib.subject_split(s.subject_id, seed=options.split_seed)
            else:
                grades = np.full(len(grades_lib.TASKS), grades_lib.MISSING, np.int32)
                # A subject with graded knees may have them in validation/test; its ungraded
                # knees must then stay out of training. Subjects never graded cannot leak.
                held_out = (s.subject_id in graded_subjects and features_lib.subject_split(
                    s.subject_id, seed=options.split_seed) != "train")
                if options.unlabeled_subjects == "train" and held_out:
                    summary["unlabeled_knees_of_held_out_subjects"] += 1
                    continue
                split = "unlabeled"
            image_id = f"{s.subject_id}-V{s.visit}-{side}"
            if per_visit[(s.subject_id, s.visit)] > 1:
                image_id += f"-{s.series_id}"
            jobs[split].append(KneeJob(
                image_id=image_id, subject_id=s.subject_id, side=side, visit=s.visit,
                dicom_path=s.dicom_path, spacing_mm=header.spacing_mm, keypoints=points,
                keypoints_predicted=predicted, grades=grades, split=split))
            summary["planned"][split] += 1
    summary["readings_without_image"] = len(set(readings) - used_readings)
    return {k: v for k, v in jobs.items() if v}, summary


def radiograph_window(radiograph: image_io.Radiograph, options: OaiOptions) -> tuple[float, float]:
    """The grey-level window of a whole radiograph ('image', or 'dicom' from its tags).

    'roi' windows are made per knee; the radiograph's window then only picks the fill
    value outside the image.
    """
    if options.window == "dicom" and radiograph.window is not None:
        return radiograph.window
    return image_io.window_limits(radiograph.pixels, options.window_percentiles)


def knee_example(job: KneeJob, radiograph: image_io.Radiograph, options: OaiOptions,
                 window: tuple[float, float] | None = None) -> dict:
    """The example of one knee from its decoded radiograph.

    Args:
      window: :func:`radiograph_window` of ``radiograph`` when already computed.
    """
    if window is None:
        window = radiograph_window(radiograph, options)
    roi_px = options.roi_mm / _isotropic_spacing(job.spacing_mm)
    roi, keypoints = roi_lib.extract_roi(radiograph.pixels, job.keypoints, job.side, roi_px,
                                         options.image_size, fill=window[0])
    if options.window == "roi":
        window = image_io.window_limits(roi, options.window_percentiles)
    return features_lib.make_example(
        image_io.to_uint8(roi, window), keypoints, job.grades, subject_id=job.subject_id,
        image_id=job.image_id, side=job.side, keypoints_predicted=job.keypoints_predicted)


def radiograph_examples(jobs: Sequence[KneeJob], options: OaiOptions):
    """The examples of the knees of ONE radiograph (one decode, one window), or the error.

    Returns:
      ``[(key, example, split)]``, or the error message (str) when the DICOM does not
      decode.
    """
    try:
        radiograph = image_io.read_dicom(jobs[0].dicom_path)
    except image_io.ImageReadError as e:
        return str(e)
    window = radiograph_window(radiograph, options)
    return [(job.image_id, knee_example(job, radiograph, options, window), job.split)
            for job in jobs]


def _ordered_thread_map(function, items: Sequence, num_workers: int) -> Iterator:
    """``map(function, items)`` on ``num_workers`` threads, in order, at most
    ``2 * num_workers`` results ahead of the consumer (bounded memory)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(num_workers) as executor:
        pending = collections.deque()
        for item in items:
            pending.append(executor.submit(function, item))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def generate_examples(jobs: Iterable[KneeJob], options: OaiOptions, summary: dict,
                      num_workers: int = 0) -> Iterator[tuple[str, dict]]:
    """``(key, example)`` for every knee whose radiograph decodes; the rest are counted.

    Args:
      num_workers: > 1 decodes radiographs in that many threads (order is kept; file
        reading, numpy's partition, PIL's resize and zlib release the GIL).

    Raises:
      RuntimeError: when not one knee of the split could be written (TFDS cannot write
        an empty split), naming the split.
    """
    by_file: dict[Path, list[KneeJob]] = collections.defaultdict(list)
    for job in jobs:
        by_file[job.dicom_path].append(job)
    groups = [sorted(by_file[path], key=lambda j: j.side) for path in sorted(by_file, key=str)]
    num_jobs = sum(len(g) for g in groups)
    if num_workers > 1 and len(groups) > 1:
        results = _ordered_thread_map(lambda group: radiograph_examples(group, options), groups,
                                      num_workers)
    else:
        results = (radiograph_examples(group, options) for group in groups)
    written = 0
    for group, result in zip(groups, results):
        if isinstance(result, str):
            logger.warning("skipping unreadable DICOM %s", result)
            summary["images_unreadable"].append(str(group[0].dicom_path))
            continue
        for key, example, split in result:
            summary["written"][split] += 1
            written += 1
            yield key, example
    if num_jobs and not written:
        raise RuntimeError(f"split {groups[0][0].split!r}: none of its {num_jobs} knees could be "
                           "read (see the warnings above); TFDS cannot write an empty split")


@dataclasses.dataclass
class OaiConfig(tfds.core.BuilderConfig):
    """A TFDS config: a name and the :class:`OaiOptions` it stands for."""

    options: OaiOptions = OaiOptions()


class Oai(tfds.core.GeneratorBasedBuilder):
    """OAI bilateral PA knee radiographs: KL + OARSI grades, kneel16 keypoints.

    Paths that do not change the dataset's content are constructor arguments:
    ``readings_files`` (default: found under manual_dir), ``pts_dir`` (default:
    manual_dir), ``kneel_csv`` and ``num_workers`` (decoding threads). After
    ``download_and_prepare``, ``summary`` holds the build summary (:func:`summary_as_json`).
    """

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "2.0.0": "Images stored as raw uint8 pixels instead of PNG (no decoding when read)."}
    BUILDER_CONFIGS = [OaiConfig(name="default", description="320 px, 140 mm ROI")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def __init__(self, *, readings_files=None, pts_dir=None, kneel_csv=None, num_workers=0,
                 **kwargs):
        self._readings_files = readings_files
        self._pts_dir = pts_dir
        self._kneel_csv = kneel_csv
        self._num_workers = num_workers
        self.summary = new_summary()
        super().__init__(**kwargs)

    @property
    def options(self) -> OaiOptions:
        return self.builder_config.options

    def _info(self):
        return tfds_util.example_info(self, homepage="https://nda.nih.gov/oai",
                                      roi_mm=self.options.roi_mm)

    def _split_generators(self, dl_manager):
        jobs, self.summary = plan_oai(dl_manager.manual_dir, self.options,
                                      self._readings_files, self._pts_dir, self._kneel_csv)
        return tfds_util.split_generators(self, jobs, dl_manager.manual_dir, "knee")

    def _generate_examples(self, jobs):
        yield from generate_examples(jobs, self.options, self.summary, self._num_workers)
