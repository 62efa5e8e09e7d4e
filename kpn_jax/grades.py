"""The 7-task grade schema: KL (0-4) and six OARSI grades (0-3).

Grades travel as int arrays ``[..., 7]`` in the order of :data:`TASKS`, with
``-1`` meaning "not graded". The one-hot form used by the GMM concatenates the
seven one-hot vectors into ``[..., 29]`` (5 + 6 * 4).
"""

from __future__ import annotations

import numpy as np

TASKS: tuple[str, ...] = (
    "kl",
    "jsn_lateral",
    "jsn_medial",
    "ost_femur_lateral",
    "ost_femur_medial",
    "ost_tibia_lateral",
    "ost_tibia_medial",
)
NUM_CLASSES: dict[str, int] = {
    "kl": 5,
    "jsn_lateral": 4,
    "jsn_medial": 4,
    "ost_femur_lateral": 4,
    "ost_femur_medial": 4,
    "ost_tibia_lateral": 4,
    "ost_tibia_medial": 4,
}
OARSI_TASKS: tuple[str, ...] = TASKS[1:]
MISSING = -1
ONE_HOT_DIM: int = sum(NUM_CLASSES[t] for t in TASKS)  # 29

# Short names used in the paper's tables.
PAPER_NAMES: dict[str, str] = {
    "kl": "KL",
    "jsn_lateral": "JSN L",
    "jsn_medial": "JSN M",
    "ost_femur_lateral": "O FL",
    "ost_femur_medial": "O FM",
    "ost_tibia_lateral": "O TL",
    "ost_tibia_medial": "O TM",
}


def one_hot_offsets(tasks: tuple[str, ...] = TASKS) -> list[tuple[int, int]]:
    """``(start, stop)`` of each task's block in the concatenated one-hot vector."""
    offsets, start = [], 0
    for task in tasks:
        offsets.append((start, start + NUM_CLASSES[task]))
        start += NUM_CLASSES[task]
    return offsets


def validate(grades, name: str = "grades") -> np.ndarray:
    """Checks ``grades [..., 7]`` and returns it as int32.

    Raises:
      ValueError: wrong last dimension, non-integer values, or a grade outside
        ``{-1} U [0, C_t)`` for its task; the message names the task and value.
    """
    arr = np.asarray(grades)
    if arr.ndim == 0 or arr.shape[-1] != len(TASKS):
        raise ValueError(
            f"{name}: expected shape [..., {len(TASKS)}] in the order {TASKS}, got {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: grades must be finite integers (use -1 for missing)")
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"{name}: grades must be integers, got non-integer values")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{name}: grades must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int32)
    for t, task in enumerate(TASKS):
        column = arr[..., t]
        bad = (column < MISSING) | (column >= NUM_CLASSES[task])
        if np.any(bad):
            value = column[bad].flat[0]
            raise ValueError(
                f"{name}: {task} grade {value} out of range; expected 0..{NUM_CLASSES[task] - 1} "
                f"or {MISSING} for missing")
    return arr


def one_hot(grades) -> np.ndarray:
    """One-hot encodes ``grades [..., 7]`` into float32 ``[..., 29]``.

    A missing grade (-1) gives an all-zero block. Out-of-range grades raise
    ``ValueError``.
    """
    arr = validate(grades)
    blocks = []
    for t, task in enumerate(TASKS):
        classes = np.arange(NUM_CLASSES[task])
        blocks.append((arr[..., t, None] == classes).astype(np.float32))
    return np.concatenate(blocks, axis=-1)


def fully_graded(grades) -> np.ndarray:
    """Boolean mask ``[...]``: every one of the 7 grades is present."""
    return np.all(validate(grades) != MISSING, axis=-1)
