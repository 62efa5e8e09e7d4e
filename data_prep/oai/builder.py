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
from kpn_jax import framing as framing_lib
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
    keypoints: np.ndarray | None   # [16, 2] kneel16, pixels of the raw radiograph; None: detect
    keypoints_predicted: bool
    grades: np.ndarray             # int32 [7], -1 = not graded
    split: str
    member: str | None = None      # the DICOM inside dicom_path when that is an archive
    knees_on_film: int = 2         # where to start looking for the knee when detecting


GRADED = ("all", "any")
KEYPOINT_SOURCES = ("files", "detector", "detector_all")


@dataclasses.dataclass(frozen=True)
class OaiOptions:
    """What defines the dataset's content (also the TFDS config's fields).

    ``graded``: a knee is labelled when its reading has ``all`` seven grades (the paper's
    graded/ungraded split fits this) or ``any``; under ``all`` a partly graded knee is
    unlabelled data. ``fill_blank_osteophytes``: osteophyte grades left blank for a
    participant whose every KL reading is below 2 become 0 (the OAI scores osteophytes
    only for participants with definite radiographic OA). ``keypoints``: ``files``
    (BoneFinder / KNEEL's CSV; knees without are skipped), ``detector`` (files, else the
    landmark detector of the build) or ``detector_all`` (the detector for every knee);
    ``detector_digest`` names the detector's checkpoint.
    """

    image_size: int = 320
    roi_mm: float = 140.0
    series_descriptions: tuple[str, ...] = tree_lib.KNEE_PA_SERIES
    readprj_priority: tuple[str, ...] = readings_lib.DEFAULT_READPRJ_PRIORITY
    reading_choice: str = "priority"
    fractional_grades: str = "round"
    graded: str = "all"
    fill_blank_osteophytes: bool = False
    window: str = "image"
    window_percentiles: tuple[float, float] = image_io.DEFAULT_PERCENTILES
    unlabeled_subjects: str = "train"
    split_seed: int = 0
    keypoints: str = "files"
    detector_digest: str = ""

    def framing(self):
        """How each knee is cut out, windowed and sized, for predict to do the same to a
        film (:class:`kpn_jax.framing.KneeFraming`; BoneFinder files are in mm)."""
        return framing_lib.KneeFraming(image_size=self.image_size, roi_mm=self.roi_mm,
                                       window=self.window,
                                       window_percentiles=tuple(self.window_percentiles),
                                       pts_units="mm")

    def __post_init__(self):
        if self.image_size <= 0 or self.roi_mm <= 0:
            raise ValueError(f"image_size and roi_mm must be positive, got {self.image_size}, "
                             f"{self.roi_mm}")
        for name, allowed in (("window", WINDOWS), ("unlabeled_subjects", UNLABELED_SUBJECTS),
                              ("graded", GRADED), ("keypoints", KEYPOINT_SOURCES),
                              ("reading_choice", readings_lib.CHOICES),
                              ("fractional_grades", readings_lib.FRACTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.keypoints != "files" and not self.detector_digest:
            raise ValueError(f"keypoints={self.keypoints!r} needs a landmark detector "
                             "(--landmark_workdir)")


def new_summary() -> dict:
    """The build summary: every decision counted, and the files that could not be used."""
    return {
        "index": {},
        "films_listed": 0,
        "films_by_view": collections.Counter(),
        "images_missing": [],
        "images_unreadable": [],
        "images_without_pixel_spacing": [],
        "keypoint_files_unusable": [],
        "knees_without_keypoints": 0,
        "keypoints_source": collections.Counter(),
        "detections_low_confidence": [],
        "reading_match": collections.Counter(),
        "knees_on_films_not_read": 0,
        "knees_ambiguous_without_barcode": 0,
        "knees_read_without_kl": 0,
        "knees_fully_graded": 0,
        "knees_partly_graded": 0,
        "partly_graded_to_unlabeled": 0,
        "osteophyte_grades_filled": 0,
        "unlabeled_knees_of_held_out_subjects": 0,
        "readings_without_image": 0,
        "planned": collections.Counter(),
        "written": collections.Counter(),
        "readings": {},
    }


summary_as_json = tfds_util.summary_as_json
OSTEOPHYTE_TASKS = tuple(t for t in grades_lib.TASKS if t.startswith("ost_"))


def _isotropic_spacing(spacing_mm) -> float | None:
    row, column = spacing_mm
    return column if abs(row - column) <= MAX_ANISOTROPY * max(row, column) else None


def _file_keypoints(series: tree_lib.Series, side: str, header: image_io.DicomHeader,
                    pts_index: dict, kneel_rows: dict, kneel_ok: bool, summary: dict):
    """kneel16 pixels of one knee from KNEEL's CSV or a BoneFinder file, with whether a
    program placed them, or ``(None, None)``.

    KNEEL's CSV (BoneFinder points refined by a person, baseline bilateral films only) wins
    over a raw BoneFinder file. Unusable files are warned about and recorded in the summary.
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
            logger.warning("skipping the %s knee of %s: %s", side, header.path, e)
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
                       header.path, e)
        summary["keypoint_files_unusable"].append(name)
        return None, None
    summary["keypoints_source"][source] += 1
    return points, predicted


def participants_with_oa(readings: dict) -> set[str]:
    """Participants with KL >= 2 in some knee at some visit (the OAI scores osteophytes only
    for participants with definite radiographic OA)."""
    return {subject for (subject, _, _), reading in readings.items()
            if reading.grades[grades_lib.TASKS.index("kl")] >= 2}


def knee_grades(reading, with_oa: set[str], subject_id: str, options: OaiOptions,
                summary: dict) -> tuple[np.ndarray, bool]:
    """``(grades [7], labelled)`` of a knee's chosen reading under the options' policy."""
    grades = np.array(reading.grades, np.int32)
    if options.fill_blank_osteophytes and subject_id not in with_oa:
        columns = [grades_lib.TASKS.index(t) for t in OSTEOPHYTE_TASKS]
        blank = [c for c in columns if grades[c] == grades_lib.MISSING]
        grades[blank] = 0
        summary["osteophyte_grades_filled"] += len(blank)
    complete = bool(np.all(grades != grades_lib.MISSING))
    summary["knees_fully_graded" if complete else "knees_partly_graded"] += 1
    if complete or options.graded == "any":
        return grades, True
    summary["partly_graded_to_unlabeled"] += 1
    return np.full(len(grades_lib.TASKS), grades_lib.MISSING, np.int32), False


def match_reading(reading, film_barcode: str, films_of_knee: int, summary: dict) -> bool:
    """Whether ``reading`` graded this film: the barcodes' last 7 digits agree; without a
    barcode on either side, only when the knee has a single film at that visit."""
    reading_key, film_key = (readings_lib.barcode_key(reading.barcode),
                             readings_lib.barcode_key(film_barcode))
    if reading_key and film_key:
        if reading_key == film_key:
            summary["reading_match"]["barcode"] += 1
            return True
        summary["knees_on_films_not_read"] += 1
        return False
    if films_of_knee == 1:
        summary["reading_match"]["single_film_without_barcode"] += 1
        return True
    summary["knees_ambiguous_without_barcode"] += 1
    return False


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
    try:
        series, summary["index"] = tree_lib.read_image_indexes(manual_dir,
                                                               options.series_descriptions)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}\n{MANUAL_DOWNLOAD_INSTRUCTIONS}") from None
    summary["films_listed"] = len(series)
    summary["films_by_view"].update(s.description for s in series)

    if readings_files is None:
        readings_files = readings_lib.find_readings_files(manual_dir)
    if not readings_files:
        logger.warning("%s: no readings files found; every knee goes to 'unlabeled'", manual_dir)
    report = readings_lib.ReadingsReport()
    readings = readings_lib.load_readings(readings_files, options.readprj_priority, report,
                                          options.reading_choice, options.fractional_grades)
    summary["readings"] = report.as_dict()
    with_oa = participants_with_oa(readings)
    read_subjects = {subject for subject, _, _ in readings}

    use_files = options.keypoints != "detector_all"
    pts_index = tree_lib.index_pts(pts_dir if pts_dir is not None else manual_dir) \
        if use_files else {}
    kneel_rows = tree_lib.read_kneel_csv(kneel_csv) if kneel_csv and use_files else {}
    # KNEEL's CSV names no series: it is used only where a subject has one baseline film.
    baseline_films = collections.Counter(s.subject_id for s in series if s.visit == "00")
    films_of_knee = collections.Counter((s.subject_id, s.visit, side)
                                        for s in series for side in s.sides)

    jobs: dict[str, list[KneeJob]] = {split: [] for split in features_lib.SPLITS}
    used_readings = set()
    for s in sorted(series, key=lambda s: (s.subject_id, s.visit, s.folder)):
        name = image_io.dicom_name(s.dicom_path, s.member)
        if not s.dicom_path.is_file():
            logger.warning("skipping %s: DICOM missing (listed in %s)", name, s.index_file)
            summary["images_missing"].append(name)
            continue
        try:
            header = image_io.read_dicom_header(s.dicom_path, s.member)
        except image_io.ImageReadError as e:
            logger.warning("skipping unreadable DICOM %s", e)
            summary["images_unreadable"].append(name)
            continue
        if header.spacing_mm is None or _isotropic_spacing(header.spacing_mm) is None:
            logger.warning("skipping %s: pixel spacing %s is missing or not square", name,
                           header.spacing_mm)
            summary["images_without_pixel_spacing"].append(name)
            continue
        barcode = s.barcode or readings_lib.normalise_barcode(header.accession_number)
        for side in s.sides:
            reading = readings.get((s.subject_id, s.visit, side))
            if reading is not None:
                if not match_reading(reading, barcode, films_of_knee[(s.subject_id, s.visit,
                                                                      side)], summary):
                    continue  # another film of this knee and day was read: not a new knee
                used_readings.add((s.subject_id, s.visit, side))
                if reading.grades[grades_lib.TASKS.index("kl")] == grades_lib.MISSING:
                    summary["knees_read_without_kl"] += 1   # e.g. a knee replacement
                    continue
            points, predicted = (None, True)
            if use_files:
                points, predicted = _file_keypoints(
                    s, side, header, pts_index, kneel_rows,
                    baseline_films[s.subject_id] == 1 and len(s.sides) == 2, summary)
            if points is None and options.keypoints == "files":
                summary["knees_without_keypoints"] += 1
                continue
            labelled = False
            if reading is not None:
                grades, labelled = knee_grades(reading, with_oa, s.subject_id, options, summary)
            else:
                grades = np.full(len(grades_lib.TASKS), grades_lib.MISSING, np.int32)
            if labelled:
                split = features_lib.subject_split(s.subject_id, seed=options.split_seed)
            else:
                # A subject with graded knees may have them in validation/test; its ungraded
                # knees must then stay out of training. Subjects never graded cannot leak.
                held_out = (s.subject_id in read_subjects and features_lib.subject_split(
                    s.subject_id, seed=options.split_seed) != "train")
                if options.unlabeled_subjects == "train" and held_out:
                    summary["unlabeled_knees_of_held_out_subjects"] += 1
                    continue
                split = "unlabeled"
            image_id = f"{s.subject_id}-V{s.visit}-{side}"
            if films_of_knee[(s.subject_id, s.visit, side)] > 1:
                image_id += f"-{s.series_id}"
            jobs[split].append(KneeJob(
                image_id=image_id, subject_id=s.subject_id, side=side, visit=s.visit,
                dicom_path=s.dicom_path, spacing_mm=header.spacing_mm, keypoints=points,
                keypoints_predicted=predicted, grades=grades, split=split, member=s.member,
                knees_on_film=len(s.sides)))
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


def detect_keypoints(job: KneeJob, film: np.ndarray, detector,
                     options: OaiOptions) -> tuple[np.ndarray, float]:
    """The detector's kneel16 pixels of one knee and their last-pass shift in mm.

    Args:
      film: the whole radiograph windowed to uint8 ``[H, W]``.
    """
    from kpn_jax import landmarks_predict

    spacing = _isotropic_spacing(job.spacing_mm)
    points, shift_px = landmarks_predict.locate_knee(
        detector, film, job.side, options.roi_mm / spacing,
        framing_lib.search_start(film.shape, job.side, job.knees_on_film))
    return points, shift_px * spacing


def knee_example(job: KneeJob, radiograph: image_io.Radiograph, options: OaiOptions,
                 window: tuple[float, float] | None = None, keypoints=None) -> dict:
    """The example of one knee from its decoded radiograph.

    Args:
      window: :func:`radiograph_window` of ``radiograph`` when already computed.
      keypoints: ``[16, 2]`` radiograph pixels when the job has none (detected).
    """
    if window is None:
        window = radiograph_window(radiograph, options)
    points = job.keypoints if job.keypoints is not None else keypoints
    roi_px = options.roi_mm / _isotropic_spacing(job.spacing_mm)
    roi, points = roi_lib.extract_roi(radiograph.pixels, points, job.side, roi_px,
                                      options.image_size, fill=window[0])
    if options.window == "roi":
        window = image_io.window_limits(roi, options.window_percentiles)
    return features_lib.make_example(
        image_io.to_uint8(roi, window), points, job.grades, subject_id=job.subject_id,
        image_id=job.image_id, side=job.side, keypoints_predicted=job.keypoints_predicted)


def radiograph_examples(jobs: Sequence[KneeJob], options: OaiOptions, detector=None):
    """The examples of the knees of ONE radiograph (one decode, one window), or the error.

    Knees without keypoints get the ``detector``'s.

    Returns:
      ``[(key, example, split, detection)]`` with ``detection`` None or ``(source,
      shift_mm)``; or the error message (str) when the DICOM does not decode.
    """
    try:
        radiograph = image_io.read_dicom(jobs[0].dicom_path, jobs[0].member)
    except image_io.ImageReadError as e:
        return str(e)
    window = radiograph_window(radiograph, options)
    film = None
    out = []
    for job in jobs:
        points, detection = None, None
        if job.keypoints is None:
            if film is None:
                film = image_io.to_uint8(radiograph.pixels, window)
            points, shift_mm = detect_keypoints(job, film, detector, options)
            try:
                points = kp_lib.validate_keypoints(points, name=f"{job.image_id} (detected)",
                                                   image_shape=radiograph.pixels.shape)
            except ValueError as e:
                out.append((job.image_id, None, job.split, ("detector_failed", str(e))))
                continue
            detection = ("detector", shift_mm)
        out.append((job.image_id, knee_example(job, radiograph, options, window, points),
                    job.split, detection))
    return out


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
                      num_workers: int = 0, detector=None) -> Iterator[tuple[str, dict]]:
    """``(key, example)`` for every knee whose radiograph decodes; the rest are counted.

    Args:
      num_workers: > 1 decodes radiographs in that many threads (order is kept; file
        reading, numpy's partition, PIL's resize and zlib release the GIL).
      detector: the landmark detector for knees planned without keypoints.

    Raises:
      RuntimeError: when not one knee of the split could be written (TFDS cannot write
        an empty split), naming the split.
    """
    by_file: dict[tuple, list[KneeJob]] = collections.defaultdict(list)
    for job in jobs:
        by_file[(str(job.dicom_path), job.member or "")].append(job)
    groups = [sorted(by_file[key], key=lambda j: j.side) for key in sorted(by_file)]
    num_jobs = sum(len(g) for g in groups)
    if any(j.keypoints is None for g in groups for j in g) and detector is None:
        raise ValueError("knees without keypoints were planned but no landmark detector given")
    make = lambda group: radiograph_examples(group, options, detector)  # noqa: E731
    if num_workers > 1 and len(groups) > 1:
        results = _ordered_thread_map(make, groups, num_workers)
    else:
        results = (make(group) for group in groups)
    written = 0
    for group, result in zip(groups, results):
        if isinstance(result, str):
            logger.warning("skipping unreadable DICOM %s", result)
            summary["images_unreadable"].append(
                image_io.dicom_name(group[0].dicom_path, group[0].member))
            continue
        for key, example, split, detection in result:
            if detection is not None and detection[0] == "detector_failed":
                logger.warning("skipping %s: %s", key, detection[1])
                summary["knees_without_keypoints"] += 1
                continue
            if detection is not None:
                summary["keypoints_source"]["detector"] += 1
                if detection[1] > framing_lib.LOW_CONFIDENCE_SHIFT_MM:
                    summary["detections_low_confidence"].append(
                        f"{key} (moved {detection[1]:.1f} mm in the last pass)")
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
    manual_dir), ``kneel_csv``, ``num_workers`` (decoding threads) and ``detector`` (a
    loaded :class:`kpn_jax.landmarks_predict.Detector`, for ``options.keypoints`` other
    than 'files'). After ``download_and_prepare``, ``summary`` holds the build summary
    (:func:`summary_as_json`).
    """

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "2.0.0": "Images stored as raw uint8 pixels instead of PNG (no decoding when read)."}
    BUILDER_CONFIGS = [OaiConfig(name="default", description="320 px, 140 mm ROI")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def __init__(self, *, readings_files=None, pts_dir=None, kneel_csv=None, num_workers=0,
                 detector=None, **kwargs):
        self._detector = detector
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
        if not jobs and self.summary["knees_without_keypoints"]:
            raise RuntimeError(
                f"{dl_manager.manual_dir}: none of the {self.summary['knees_without_keypoints']} "
                "knees found has a keypoint file (BoneFinder .pts under --manual_dir or "
                "--pts_dir, or --kneel_csv); let the landmark detector place them with "
                "--keypoints=detector --landmark_workdir=DIR (docs/DATASETS.md)")
        return tfds_util.split_generators(self, jobs, dl_manager.manual_dir, "knee")

    def _generate_examples(self, jobs):
        yield from generate_examples(jobs, self.options, self.summary, self._num_workers,
                                     self._detector)
