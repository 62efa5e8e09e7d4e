"""From a radiograph file to one stored knee: the path the manifest builder and predict share.

A dataset records how it framed its knees (:class:`KneeFraming`, in its
``build_summary.json``; a workdir copies it into ``data_info.json``), so that
``--mode=predict`` and the page turn a user's film into exactly the input that training
saw: the same window, the same crop around the joint (a fixed size in mm, from the film's
pixel spacing, or in pixels), the same mirroring of left knees and the same size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kpn_jax import image_io
from kpn_jax import roi as roi_lib

WINDOWS = ("auto", "image", "dicom", "roi")
# A detection whose points still move by more than this in the detector's last pass is not
# to be trusted (about 3 pixels of a 320 px, 140 mm knee); builders list such knees.
LOW_CONFIDENCE_SHIFT_MM = 1.0
PTS_UNITS = ("auto", "mm", "pixels")


@dataclasses.dataclass(frozen=True)
class KneeFraming:
    """How a dataset turned a radiograph into a knee.

    Attributes:
      image_size: side of the stored knee in pixels.
      roi_mm: > 0: a square this many mm wide around the joint centre of the keypoints
        (needs the file's pixel spacing); 0: no crop by size in mm.
      roi_px: > 0: the square's side in the file's pixels (overrides ``roi_mm``).
        Without keypoints, or with neither size, the whole image is padded to a square.
      window: grey levels -> uint8: 'auto' (8-bit files as stored, others like
        'image'), 'image' (percentiles of the whole file), 'dicom' (the file's window,
        else 'image'), 'roi' (percentiles of the crop).
      window_percentiles: the percentiles of 'image' and 'roi'.
      pts_units: BoneFinder ``.pts`` coordinates: 'mm', 'pixels', or 'auto' (mm when the
        file has a pixel spacing).
    """

    image_size: int
    roi_mm: float = 0.0
    roi_px: float = 0.0
    window: str = "auto"
    window_percentiles: tuple[float, float] = image_io.DEFAULT_PERCENTILES
    pts_units: str = "auto"

    def __post_init__(self):
        if self.image_size <= 0 or self.roi_mm < 0 or self.roi_px < 0:
            raise ValueError(f"image_size must be positive and roi_mm, roi_px >= 0, got "
                             f"{self.image_size}, {self.roi_mm}, {self.roi_px}")
        for name, value, choices in (("window", self.window, WINDOWS),
                                     ("pts_units", self.pts_units, PTS_UNITS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self),
                "window_percentiles": list(self.window_percentiles)}

    @classmethod
    def from_dict(cls, fields: dict) -> "KneeFraming":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in fields.items() if k in known}
        if "window_percentiles" in values:
            values["window_percentiles"] = tuple(float(p) for p in values["window_percentiles"])
        return cls(**values)

    def roi_pixels(self, radiograph: image_io.Radiograph) -> float:
        """The crop's side in the file's pixels; 0 when the whole image is used."""
        if self.roi_px:
            return self.roi_px
        if self.roi_mm and radiograph.spacing_mm is not None:
            return self.roi_mm / radiograph.spacing_mm[1]
        return 0.0

    def pts_in_mm(self, radiograph: image_io.Radiograph) -> bool:
        """Whether ``.pts`` coordinates of this file are read as mm."""
        return self.pts_units == "mm" or (self.pts_units == "auto"
                                          and radiograph.spacing_mm is not None)

    def crops(self, radiograph: image_io.Radiograph, keypoints: np.ndarray | None) -> bool:
        """Whether the knee is cut out around its keypoints (else the whole image is used)."""
        return keypoints is not None and self.roi_pixels(radiograph) > 0


def window_of(radiograph: image_io.Radiograph, framing: KneeFraming) -> tuple[float, float]:
    """The window chosen on the whole file (``'roi'`` starts from this one too)."""
    if framing.window == "auto" and radiograph.bit_depth <= 8:
        return 0.0, 255.0
    if framing.window == "dicom" and radiograph.window is not None:
        return radiograph.window
    return image_io.window_limits(radiograph.pixels, framing.window_percentiles)


def frame_knee(radiograph: image_io.Radiograph, keypoints: np.ndarray | None, side: str,
               framing: KneeFraming):
    """One knee of a radiograph as a dataset stores it.

    Args:
      radiograph: the file as read (:func:`kpn_jax.image_io.read_image`).
      keypoints: ``[N, 2]`` in the file's pixels (already checked), or None.
      side: 'R' or 'L' (a left knee is mirrored to the right-knee orientation).

    Returns:
      ``(uint8 [S, S], keypoints float32 [N, 2] in those pixels or None)``.
    """
    window = window_of(radiograph, framing)
    if framing.crops(radiograph, keypoints):
        knee, points = roi_lib.extract_roi(radiograph.pixels, keypoints, side,
                                           framing.roi_pixels(radiograph), framing.image_size,
                                           fill=window[0])
    else:
        flipped, points = roi_lib.to_right_orientation(radiograph.pixels, keypoints, side)
        knee, points = image_io.resize_whole(flipped, points, framing.image_size,
                                             fill=window[0])
    if framing.window == "roi":
        window = image_io.window_limits(knee, framing.window_percentiles)
    return image_io.to_uint8(knee, window), points


def search_start(shape: tuple[int, int], side: str, knees_on_film: int) -> tuple[float, float]:
    """Where a landmark detector looks first for a knee of a film ``[H, W]``: the middle of
    the film's half holding it (a PA film shows the right knee on the image left), or of a
    one-knee film."""
    height, width = shape
    if knees_on_film == 1:
        return (width - 1) / 2.0, (height - 1) / 2.0
    return ((width - 1) * (0.25 if side == "R" else 0.75), (height - 1) / 2.0)


def locate_knee(radiograph: image_io.Radiograph, side: str, framing: KneeFraming, detector,
                knees_on_film: int = 1) -> tuple[np.ndarray, float]:
    """A landmark detector's kneel16 points of one knee of a film, in the film's pixels,
    and how far they moved in its last pass (mm where the film has a pixel spacing, else
    pixels; large = a detection not to trust): :func:`kpn_jax.landmarks_predict.locate_knee`
    on the film windowed as ``framing`` windows it, searching from :func:`search_start`.

    Raises:
      ValueError: the film has no pixel spacing and ``framing`` no ROI in pixels, so the
        size of a knee on it is unknown.
    """
    from kpn_jax import landmarks_predict

    roi_px = framing.roi_pixels(radiograph)
    if roi_px <= 0:
        raise ValueError(f"{radiograph.path} has no pixel spacing, so the size of a knee on it "
                         "is unknown (a dataset built with --roi_px would say it)")
    film = image_io.to_uint8(radiograph.pixels, window_of(radiograph, framing))
    points, shift_px = landmarks_predict.locate_knee(
        detector, film, side, roi_px, search_start(film.shape, side, knees_on_film))
    spacing = radiograph.spacing_mm[1] if radiograph.spacing_mm is not None else 1.0
    return points, shift_px * spacing
