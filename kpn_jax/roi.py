"""ROI extraction, side flip and resize, with keypoints following the image.

Conventions: images are ``[H, W]`` or ``[H, W, 1]`` arrays; keypoints ``[N, 2]``
are ``(x, y)`` with pixel centres at integer coordinates. Internally boxes use
edge coordinates (``e = x + 0.5``), which is also PIL's convention.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from kpn_jax import keypoints as kp_lib


def _as_2d(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"expected a grayscale image [H, W] or [H, W, 1], got shape {image.shape}")
    return image


def to_right_orientation(image: np.ndarray, keypoints: np.ndarray | None, side: str):
    """Mirrors a left knee (``side == 'L'``) so that lateral is on the image left.

    Returns ``(image, keypoints)``; a right knee comes back unchanged. Keypoints
    keep their anatomical order, only their ``x`` changes.
    """
    if side not in ("L", "R"):
        raise ValueError(f"side must be 'L' or 'R', got {side!r}")
    if side == "R":
        return image, keypoints
    image = np.ascontiguousarray(np.asarray(image)[:, ::-1])
    if keypoints is not None:
        keypoints = kp_lib.flip_horizontal(keypoints, image.shape[1])
    return image, keypoints


def crop_and_resize(image: np.ndarray, keypoints: np.ndarray | None, center_xy, roi_size: float,
                    out_size: int, fill: float = 0.0):
    """Crops a square ``roi_size`` source pixels wide around ``center_xy`` and resizes it.

    The crop may leave the image; outside pixels read ``fill``. Resampling is
    PIL's antialiased bilinear filter in float32, so 8- and 16-bit inputs both work.

    Args:
      image: ``[H, W]`` or ``[H, W, 1]``, any numeric dtype.
      keypoints: ``[N, 2]`` source pixels, or None.
      center_xy: ROI centre ``(x, y)`` in source pixels.
      roi_size: side of the square ROI in source pixels.
      out_size: side of the output in pixels.

    Returns:
      ``(roi float32 [out_size, out_size], keypoints float32 [N, 2] or None)``.
    """
    src = _as_2d(image).astype(np.float32)
    if roi_size <= 0 or out_size <= 0:
        raise ValueError(f"roi_size and out_size must be positive, got {roi_size}, {out_size}")
    left = float(center_xy[0]) + 0.5 - roi_size / 2.0
    top = float(center_xy[1]) + 0.5 - roi_size / 2.0
    # Pad so the box lies inside the array: PIL would otherwise repeat edge pixels.
    height, width = src.shape
    pad = int(np.ceil(max(0.0, -left, -top, left + roi_size - width, top + roi_size - height))) + 1
    if pad > 1:
        src = np.pad(src, pad, mode="constant", constant_values=fill)
    else:
        pad = 0
    box = (left + pad, top + pad, left + pad + roi_size, top + pad + roi_size)
    roi = Image.fromarray(src, mode="F").resize((out_size, out_size), Image.BILINEAR, box=box)
    roi = np.asarray(roi, dtype=np.float32)
    if keypoints is not None:
        scale = out_size / roi_size
        keypoints = np.asarray(keypoints, dtype=np.float32)
        keypoints = np.stack([(keypoints[:, 0] + 0.5 - left) * scale - 0.5,
                              (keypoints[:, 1] + 0.5 - top) * scale - 0.5], axis=-1)
    return roi, keypoints


def roi_to_source(points: np.ndarray, center_xy, roi_size: float, out_size: int) -> np.ndarray:
    """Inverse of :func:`crop_and_resize` for points: ``[N, 2]`` pixels of the ``out_size``
    ROI -> pixels of the source it was cut from (float64)."""
    scale = out_size / roi_size
    left_top = np.asarray(center_xy, np.float64) + 0.5 - roi_size / 2.0
    return (np.asarray(points, np.float64) + 0.5) / scale - 0.5 + left_top


def joint_center(keypoints: np.ndarray, schema: kp_lib.KeypointSchema = kp_lib.KNEEL16) -> np.ndarray:
    """Centre of the joint: the mean of the femur and tibia contours' centroids."""
    keypoints = np.asarray(keypoints, dtype=np.float32)
    femur = keypoints[list(schema.bones["femur"])].mean(axis=0)
    tibia = keypoints[list(schema.bones["tibia"])].mean(axis=0)
    return (femur + tibia) / 2.0


def to_uint8(image: np.ndarray, low: float | None = None, high: float | None = None,
             percentiles=(0.5, 99.5)) -> np.ndarray:
    """Windows a float image to uint8; ``low``/``high`` default to robust percentiles."""
    image = np.asarray(image, dtype=np.float32)
    if low is None or high is None:
        lo, hi = np.percentile(image, percentiles)
        low = lo if low is None else low
        high = hi if high is None else high
    if high <= low:
        high = low + 1.0
    if (low, high) == (0.0, 255.0):  # grey levels already 0..255: rounded, never rescaled
        return np.clip(np.round(image), 0, 255).astype(np.uint8)
    return np.clip(np.round((image - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def extract_roi(image: np.ndarray, keypoints: np.ndarray, side: str, roi_size: float, out_size: int,
                schema: kp_lib.KeypointSchema = kp_lib.KNEEL16, center_xy=None, fill: float = 0.0):
    """Flip to right orientation, crop around the joint centre, resize.

    Args:
      image: raw radiograph ``[H, W]`` (one knee, original side).
      keypoints: ``[N, 2]`` source pixels in the raw image.
      side: ``'L'`` or ``'R'``; left knees are mirrored.
      roi_size: ROI side in source pixels (a fixed size in mm / pixel spacing).
      out_size: output side in pixels.
      center_xy: ROI centre in raw-image pixels; defaults to :func:`joint_center`.

    Returns:
      ``(roi float32 [out_size, out_size], keypoints float32 [N, 2])``.
    """
    keypoints = kp_lib.validate_keypoints(keypoints, schema)
    if center_xy is None:
        center_xy = joint_center(keypoints, schema)
    image, keypoints = to_right_orientation(_as_2d(image), keypoints, side)
    if side == "L":
        center_xy = (image.shape[1] - 1 - float(center_xy[0]), float(center_xy[1]))
    return crop_and_resize(image, keypoints, center_xy, roi_size, out_size, fill=fill)
