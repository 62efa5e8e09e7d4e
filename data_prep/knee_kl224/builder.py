"""TFDS builder for Chen's kneeKL224 knee crops (KL grades only), with optional keypoints.

Layout read (the published one; ``test/`` may be absent)::

    <root>/{train,val,test}/{0,1,2,3,4}/<OAI ID><L|R>.png     (224x224 8-bit, folder = KL)
    <root>/landmarks16.csv                                    (optional keypoints)

Choices (docs/DATASETS.md):
- The published split is kept (``val`` -> ``validation``); no re-splitting.
- Left knees are stored NOT mirrored in this set: they are mirrored here (and their
  keypoints, ``x -> W - 1 - x``) so every example is in right-knee orientation;
  ``side`` keeps the original side.
- KL only: the six OARSI grades are -1.
- Keypoints come from ``landmarks16.csv`` (pixels of the image as stored), by default
  only its ``ok = 1`` rows; other images get ``keypoints_valid`` all False and zeros.
- Images with inverted grey levels (centre-minus-border mean below zero) are inverted
  back (``255 - x``) by default and listed in the build summary.
- ``image_size`` 224 (the stored size) means no resampling.
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
from kpn_jax import image_io
from kpn_jax import roi as roi_lib
from data_prep import tfds_util
from kpn_jax import grades as grades_lib
from kpn_jax import keypoints as kp_lib

logger = logging.getLogger(__name__)

SPLIT_FOLDERS: dict[str, str] = {"train": "train", "val": "validation", "test": "test"}
LANDMARKS_FILE = "landmarks16.csv"
LANDMARK_CHOICES = ("ok", "all", "none")
STORED_SIZE = 224
_FILE_NAME = re.compile(r"^(?P<subject>\d+)(?P<side>[LR])$")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download Chen's "Knee Osteoarthritis Severity Grading Dataset" (Mendeley Data,
doi:10.17632/56rmx5bjcr.1, folder kneeKL224; CC BY 4.0) and pass its folder, which holds
train/ val/ (and test/) each with 0/ .. 4/ of PNGs, as --manual_dir. Optional
keypoints: landmarks16.csv in that folder (or --landmarks_csv).
"""


@dataclasses.dataclass(frozen=True)
class KneeKl224Options:
    """What defines the dataset's content (also the TFDS config's fields)."""

    image_size: int = STORED_SIZE
    landmarks: str = "ok"        # 'ok': rows with ok = 1; 'all': every row; 'none'
    fix_polarity: bool = True

    def __post_init__(self):
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.landmarks not in LANDMARK_CHOICES:
            raise ValueError(f"landmarks must be one of {LANDMARK_CHOICES}, got {self.landmarks!r}")


@dataclasses.dataclass(frozen=True)
class ImageJob:
    """One image to write."""

    path: Path
    relative: str          # 'train/1/9002316R.png'
    subject_id: str
    side: str
    kl: int
    split: str
    keypoints: np.ndarray | None   # [16, 2] pixels of the stored image, or None


def new_summary() -> dict:
    return {
        "planned": collections.Counter(),
        "written": collections.Counter(),
        "with_keypoints": collections.Counter(),
        "files_skipped": [],
        "landmark_rows_unused": [],
        "polarity_inverted": [],
        "polarity_fixed": False,
    }


summary_as_json = tfds_util.summary_as_json


def read_landmarks(path: str | os.PathLike, which: str = "ok") -> dict[str, dict]:
    """``landmarks16.csv`` -> ``{relative path: {'side', 'kl', 'keypoints' [16, 2], 'row'}}``.

    Args:
      which: 'ok' keeps rows with ``ok = 1``, 'all' every row, 'none' none.

    Raises:
      ValueError: naming the file and row for a malformed row.
    """
    if which == "none":
        return {}
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = [f"{axis}{i}" for i in range(kp_lib.KNEEL16.num_points) for axis in "xy"]
    out = {}
    for number, row in enumerate(rows, start=2):
        where = f"{path.name}: row {number}"
        missing = [c for c in ["path", "side", "kl_grade", "ok"] + columns if c not in row]
        if missing:
            raise ValueError(f"{where}: columns {missing[:4]} missing")
        if which == "ok" and row["ok"].strip() != "1":
            continue
        try:
            points = np.asarray([float(row[c]) for c in columns], np.float32).reshape(-1, 2)
            kl = int(row["kl_grade"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out[row["path"].strip().replace("\\", "/")] = dict(
            side=row["side"].strip(), kl=kl, keypoints=kp_lib.validate_keypoints(points, name=where),
            row=where)
    return out


def plan_knee_kl224(root: str | os.PathLike, options: KneeKl224Options = KneeKl224Options(),
                    landmarks_csv: str | os.PathLike | None = None) -> tuple[dict, dict]:
    """Lists the images to write (reads no pixels).

    Args:
      root: the kneeKL224 folder.
      landmarks_csv: keypoints; None = ``<root>/landmarks16.csv`` when it exists.

    Returns:
      ``({split: [ImageJob]}, summary)``.

    Raises:
      FileNotFoundError: when ``root`` has none of train/ val/ test/.
    """
    root = Path(root)
    summary = new_summary()
    if landmarks_csv is None and (root / LANDMARKS_FILE).is_file():
        landmarks_csv = root / LANDMARKS_FILE
    landmarks = read_landmarks(landmarks_csv, options.landmarks) if landmarks_csv else {}
    present = [folder for folder in SPLIT_FOLDERS if (root / folder).is_dir()]
    if not present:
        raise FileNotFoundError(f"{root}: no train/, val/ or test/ folder\n"
                                f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
    jobs: dict[str, list[ImageJob]] = {}
    seen: dict[str, str] = {}
    used_landmarks = set()
    for folder in present:
        split = SPLIT_FOLDERS[folder]
        for path in sorted((root / folder).rglob("*")):
            if path.is_dir():
                continue
            relative = path.relative_to(root).as_posix()
            parts = path.relative_to(root / folder).parts
            match = _FILE_NAME.match(path.stem) if path.suffix.lower() == ".png" else None
            if len(parts) != 2 or parts[0] not in ("0", "1", "2", "3", "4") or match is None:
                logger.warning("skipping %s: expected %s/<KL 0-4>/<OAI ID><L|R>.png", path, folder)
                summary["files_skipped"].append(relative)
                continue
            if path.stem in seen:
                logger.warning("skipping %s: %s is already at %s", path, path.stem, seen[path.stem])
                summary["files_skipped"].append(relative)
                continue
            seen[path.stem] = relative
            kl, side = int(parts[0]), match.group("side")
            keypoints = None
            landmark = landmarks.get(relative)
            if landmark is not None:
                used_landmarks.add(relative)
                if landmark["side"] != side or landmark["kl"] != kl:
                    logger.warning("%s: side/KL %s/%d disagree with the file's %s/%d; its keypoints "
                                   "are not used", landmark["row"], landmark["side"], landmark["kl"],
                                   side, kl)
                    summary["landmark_rows_unused"].append(landmark["row"])
                else:
                    keypoints = landmark["keypoints"]
            jobs.setdefault(split, []).append(ImageJob(
                path=path, relative=relative, subject_id=match.group("subject"), side=side, kl=kl,
                split=split, keypoints=keypoints))
            summary["planned"][split] += 1
            if keypoints is not None:
                summary["with_keypoints"][split] += 1
    for relative in sorted(set(landmarks) - used_landmarks):
        summary["landmark_rows_unused"].append(landmarks[relative]["row"])
    return jobs, summary


def image_example(job: ImageJob, options: KneeKl224Options, summary: dict) -> dict:
    """Reads, fixes polarity, mirrors a left knee, resizes; returns the example.

    Raises:
      image_io.ImageReadError: naming the file.
    """
    pixels = image_io.read_raster(job.path).pixels
    if pixels.max() > 255:
        raise image_io.ImageReadError(f"{job.path}: expected an 8-bit image")
    if options.fix_polarity and image_io.centre_minus_border(pixels) < 0:
        pixels = 255.0 - pixels
        summary["polarity_inverted"].append(job.relative)
    num_points = kp_lib.KNEEL16.num_points
    keypoints = job.keypoints if job.keypoints is not None else np.zeros((num_points, 2), np.float32)
    pixels, keypoints = roi_lib.to_right_orientation(pixels, keypoints, job.side)
    pixels, keypoints = image_io.resize_whole(pixels, keypoints, options.image_size)
    image = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    valid = np.full(num_points, job.keypoints is not None)
    return features_lib.make_example(
        image, keypoints, [job.kl] + [grades_lib.MISSING] * (len(grades_lib.TASKS) - 1),
        subject_id=job.subject_id, image_id=job.path.stem, side=job.side, keypoints_valid=valid)


def generate_examples(jobs: Iterable[ImageJob], options: KneeKl224Options,
                      summary: dict) -> Iterator[tuple[str, dict]]:
    """``(key, example)`` per readable image; unreadable ones are warned about and counted.

    Raises:
      RuntimeError: when no image of the split could be read, naming the split.
    """
    jobs = list(jobs)
    written = 0
    for job in jobs:
        try:
            example = image_example(job, options, summary)
        except image_io.ImageReadError as e:
            logger.warning("skipping unreadable image %s", e)
            summary["files_skipped"].append(job.relative)
            continue
        summary["written"][job.split] += 1
        written += 1
        yield job.path.stem, example
    if jobs and not written:
        raise RuntimeError(f"split {jobs[0].split!r}: none of its {len(jobs)} images could be read")


@dataclasses.dataclass
class KneeKl224Config(tfds.core.BuilderConfig):
    """A TFDS config: a name and the :class:`KneeKl224Options` it stands for."""

    options: KneeKl224Options = KneeKl224Options()


class KneeKl224(tfds.core.GeneratorBasedBuilder):
    """Chen 2018 kneeKL224 crops: KL grades, kneel16 keypoints where annotated.

    ``landmarks_csv`` (constructor) overrides ``<manual_dir>/landmarks16.csv``. After
    ``download_and_prepare``, ``summary`` holds the build summary.
    """

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "2.0.0": "Images stored as raw uint8 pixels instead of PNG (no decoding when read)."}
    BUILDER_CONFIGS = [KneeKl224Config(name="default", description="224 px, ok=1 keypoints")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def __init__(self, *, landmarks_csv=None, **kwargs):
        self._landmarks_csv = landmarks_csv
        self.summary = new_summary()
        super().__init__(**kwargs)

    @property
    def options(self) -> KneeKl224Options:
        return self.builder_config.options

    def _info(self):
        return tfds_util.example_info(self, homepage="https://doi.org/10.17632/56rmx5bjcr.1")

    def _split_generators(self, dl_manager):
        jobs, self.summary = plan_knee_kl224(dl_manager.manual_dir, self.options,
                                             self._landmarks_csv)
        self.summary["polarity_fixed"] = self.options.fix_polarity
        return tfds_util.split_generators(self, jobs, dl_manager.manual_dir, "image")

    def _generate_examples(self, jobs):
        yield from generate_examples(jobs, self.options, self.summary)
