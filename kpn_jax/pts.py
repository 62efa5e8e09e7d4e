"""BoneFinder ``.pts`` files and their conversion to the ``kneel16`` keypoint schema.

The format (one shape per file)::

    version: 1
    n_points: 74
    {
    x0 y0
    x1 y1
    ...
    }

BoneFinder writes coordinates in millimetres when the image has a pixel spacing (DICOM)
and in pixels otherwise. Its knee model finds one knee per run: on a bilateral PA
radiograph it is run once on the image as is (``001.pts``, the patient's LEFT knee,
which lies on the image right) and once on the horizontally mirrored image
(``001_f.pts``, the RIGHT knee); a ``_f`` file's x must be mirrored back.

Conventions we assume (and test):
- ``pixels = mm / spacing`` puts pixel centres at integers (VXL's world frame, which
  BoneFinder uses, has its origin at the centre of pixel (0, 0)); x divides by the
  column spacing, y by the row spacing.
- Mirroring back is ``x -> W - 1 - x`` (pixel centres), the same as
  :func:`kpn_jax.keypoints.flip_horizontal`. KNEEL used ``W - x``: one pixel apart.
- kneel16 = BoneFinder femur points 12..24 step 2 (7) then tibia points 47..63 step 2
  (9), as KNEEL made them; index 0 of each bone is lateral (docs/DESIGN.md, section 3).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kpn_jax import keypoints as kp_lib

BONEFINDER_FEMUR_INDICES: tuple[int, ...] = tuple(range(12, 25, 2))
BONEFINDER_TIBIA_INDICES: tuple[int, ...] = tuple(range(47, 64, 2))
BONEFINDER_TO_KNEEL16: tuple[int, ...] = BONEFINDER_FEMUR_INDICES + BONEFINDER_TIBIA_INDICES
MIN_BONEFINDER_POINTS = max(BONEFINDER_TO_KNEEL16) + 1  # 64
FLIPPED_SUFFIX = "_f"


class PtsError(ValueError):
    """A ``.pts`` file is malformed or has the wrong points; the message names it."""


def parse_pts(text: str, source: str = "<string>") -> np.ndarray:
    """Parses the text of a ``.pts`` file into float64 ``[P, 2]`` ``(x, y)``.

    Raises:
      PtsError: naming ``source`` and the line at fault.
    """
    lines = text.splitlines()
    header: dict[str, str] = {}
    i = 0
    while i < len(lines) and lines[i].strip() != "{":
        line = lines[i].strip()
        if line and not line.startswith("//"):
            key, sep, value = line.partition(":")
            if not sep:
                raise PtsError(f"{source}: line {i + 1}: expected 'key: value' or '{{', got {line!r}")
            header[key.strip().lower()] = value.strip()
        i += 1
    if i == len(lines):
        raise PtsError(f"{source}: no '{{' opening the point list")
    points = []
    for j in range(i + 1, len(lines)):
        line = lines[j].strip()
        if line == "}":
            break
        if not line:
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            points.append((float(fields[0]), float(fields[1])))
        except ValueError:
            raise PtsError(f"{source}: line {j + 1}: expected 'x y', got {line!r}") from None
    else:
        raise PtsError(f"{source}: no '}}' closing the point list")
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(array)):
        raise PtsError(f"{source}: a point is NaN or inf")
    if "n_points" in header:
        try:
            expected = int(header["n_points"])
        except ValueError:
            raise PtsError(f"{source}: n_points {header['n_points']!r} is not an integer") from None
        if expected != len(array):
            raise PtsError(f"{source}: header says n_points: {expected} but the file lists "
                           f"{len(array)} points")
    return array


def read_pts(path: str | os.PathLike) -> np.ndarray:
    """Reads a ``.pts`` file: float64 ``[P, 2]``.

    Raises:
      PtsError: naming the file (also when it cannot be read).
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise PtsError(f"{path}: cannot read ({e})") from e
    return parse_pts(text, source=str(path))


def format_pts(points) -> str:
    """``[P, 2]`` -> the text of a version-1 ``.pts`` file."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    body = "\n".join(f"{x:.6f} {y:.6f}" for x, y in points)
    return f"version: 1\nn_points: {len(points)}\n{{\n{body}\n}}\n"


def write_pts(path: str | os.PathLike, points) -> None:
    """Writes ``points [P, 2]`` as a ``.pts`` file."""
    Path(path).write_text(format_pts(points), encoding="utf-8")


def is_flipped_name(path: str | os.PathLike) -> bool:
    """True for BoneFinder's mirrored-image output (``001_f.pts``)."""
    return Path(path).stem.endswith(FLIPPED_SUFFIX)


def to_kneel16(points, source: str = "points") -> np.ndarray:
    """BoneFinder points ``[P >= 64, 2]`` -> kneel16 ``[16, 2]`` float32.

    A 16-point shape is taken to be kneel16 already and is returned as is.

    Raises:
      PtsError: for any other number of points.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise PtsError(f"{source}: expected points [P, 2], got shape {points.shape}")
    if len(points) == kp_lib.KNEEL16.num_points:
        return points.astype(np.float32)
    if len(points) < MIN_BONEFINDER_POINTS:
        raise PtsError(f"{source}: {len(points)} points; expected 16 (kneel16) or at least "
                       f"{MIN_BONEFINDER_POINTS} (a BoneFinder knee shape)")
    return points[list(BONEFINDER_TO_KNEEL16)].astype(np.float32)


def mm_to_pixels(points_mm, spacing_mm) -> np.ndarray:
    """``[..., 2]`` millimetres -> pixels; ``spacing_mm = (row, column)`` mm per pixel."""
    row, column = (float(s) for s in spacing_mm)
    if row <= 0 or column <= 0:
        raise ValueError(f"pixel spacing must be positive, got {spacing_mm}")
    points = np.array(points_mm, dtype=np.float32, copy=True)
    points[..., 0] /= column
    points[..., 1] /= row
    return points


def pixels_to_mm(points_px, spacing_mm) -> np.ndarray:
    """Inverse of :func:`mm_to_pixels`."""
    row, column = (float(s) for s in spacing_mm)
    points = np.array(points_px, dtype=np.float64, copy=True)
    points[..., 0] *= column
    points[..., 1] *= row
    return points


def read_knee_pts(path: str | os.PathLike, spacing_mm=None, image_width: int | None = None,
                  flipped: bool | None = None) -> np.ndarray:
    """One knee's ``.pts`` -> kneel16 ``[16, 2]`` in pixels of the image as stored.

    Args:
      path: a BoneFinder (>= 64 points) or kneel16 (16 points) ``.pts`` file.
      spacing_mm: ``(row, column)`` mm per pixel when the file is in millimetres;
        None when it is in pixels.
      image_width: width of the image in pixels; needed to mirror a flipped file back.
      flipped: whether the points were found on the mirrored image; None = decide by
        the name (``*_f.pts``).

    Raises:
      PtsError: naming the file (format, number of points, or a flipped file without
        ``image_width``).
    """
    points = to_kneel16(read_pts(path), source=str(path))
    if spacing_mm is not None:
        points = mm_to_pixels(points, spacing_mm)
    if flipped is None:
        flipped = is_flipped_name(path)
    if flipped:
        if image_width is None:
            raise PtsError(f"{path}: points of a mirrored image need the image width to be "
                           "mirrored back")
        points = kp_lib.flip_horizontal(points, image_width)
    return np.asarray(points, dtype=np.float32)
