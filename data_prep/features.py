"""The one example format that every builder writes (docs/DESIGN.md, section 3).

- ``image``: uint8 ``[H, W, 1]`` raw pixels (no decoding when read: PNG decoding cost more
  CPU than everything else a training step needs from the host), right-knee orientation.
- ``keypoints``: float32 ``[N, 2]`` ``(x, y)`` pixels; ``keypoints_valid`` bool ``[N]``;
  ``keypoints_predicted``: bool scalar, True when a detector (not a person) placed them.
- ``grades``: int32 ``[7]`` in ``kpn_jax.grades.TASKS`` order, -1 = not graded.
- ``subject_id``, ``image_id``, ``side`` ('R'/'L', the side before flipping): text.
"""

from __future__ import annotations

import hashlib

import numpy as np
from kpn_jax import grades as grades_lib

SPLITS = ("train", "validation", "test", "unlabeled")
FEATURE_NAMES = ("image", "keypoints", "keypoints_valid", "keypoints_predicted", "grades",
                 "subject_id", "image_id", "side")


def example_features(image_size: int, num_points: int):
    """The TFDS ``FeaturesDict`` of one example (``image_size`` x ``image_size`` images)."""
    import tensorflow_datasets as tfds  # heavy; only builders need it

    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return tfds.features.FeaturesDict({
        # One bytes value per image, read back with np.frombuffer.
        "image": tfds.features.Tensor(shape=(image_size, image_size, 1), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.BYTES),
        "keypoints": tfds.features.Tensor(shape=(num_points, 2), dtype=np.float32),
        "keypoints_valid": tfds.features.Tensor(shape=(num_points,), dtype=np.bool_),
        "keypoints_predicted": tfds.features.Tensor(shape=(), dtype=np.bool_),
        "grades": tfds.features.Tensor(shape=(len(grades_lib.TASKS),), dtype=np.int32),
        "subject_id": tfds.features.Text(),
        "image_id": tfds.features.Text(),
        "side": tfds.features.Text(),
    })


def make_example(image: np.ndarray, keypoints, grades, subject_id: str, image_id: str, side: str,
                 keypoints_valid=None, keypoints_predicted: bool = False) -> dict:
    """Validates one example and returns the dict a TFDS builder yields.

    Raises:
      ValueError: naming ``image_id`` and the field at fault.
    """
    where = f"example {image_id!r}"
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 1:
        raise ValueError(f"{where}: image must be uint8 [H, W, 1], got {image.dtype} {image.shape}")
    keypoints = np.asarray(keypoints, dtype=np.float32)
    if keypoints.ndim != 2 or keypoints.shape[-1] != 2:
        raise ValueError(f"{where}: keypoints must be [N, 2], got {keypoints.shape}")
    if keypoints_valid is None:
        keypoints_valid = np.all(np.isfinite(keypoints), axis=-1)
    keypoints_valid = np.asarray(keypoints_valid, dtype=bool)
    if keypoints_valid.shape != keypoints.shape[:1]:
        raise ValueError(f"{where}: keypoints_valid must be [{keypoints.shape[0]}], "
                         f"got {keypoints_valid.shape}")
    # Invalid points are stored as zeros so no NaN reaches the model.
    keypoints = np.where(keypoints_valid[:, None] & np.isfinite(keypoints), keypoints, 0.0)
    grades = grades_lib.validate(grades, name=f"{where} grades")
    if side not in ("L", "R"):
        raise ValueError(f"{where}: side must be 'L' or 'R', got {side!r}")
    return {
        "image": np.ascontiguousarray(image),
        "keypoints": keypoints.astype(np.float32),
        "keypoints_valid": keypoints_valid,
        "keypoints_predicted": bool(keypoints_predicted),
        "grades": grades.astype(np.int32),
        "subject_id": str(subject_id),
        "image_id": str(image_id),
        "side": side,
    }


def subject_split(subject_id: str, seed: int = 0, ratios=(2, 1, 1)) -> str:
    """Deterministic subject-level split: train/validation/test in ``ratios`` (2:1:1).

    Hash-based, so a subject's split never depends on which other subjects exist.
    """
    digest = hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2.0 ** 64
    bounds = np.cumsum(ratios) / float(np.sum(ratios))
    return ("train", "validation", "test")[int(np.searchsorted(bounds, u, side="right"))]
