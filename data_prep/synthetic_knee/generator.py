"""Procedural knee radiographs with coherent KL/OARSI grades and exact kneel16 keypoints.

One knee = one call of :func:`generate_knee` ``(seed, index)``; nothing else enters, so
example ``i`` is the same whichever other examples are made, in whatever order.

Indices pair up into subjects: knees ``2k`` (right) and ``2k + 1`` (left) belong to
subject ``k`` and share the subject's latent disease, so both knees of a person are
correlated, as in the OAI.

Three steps per knee, each from its own random stream (so changing the image size or the
rater noise changes nothing else):

1. Grades (:func:`sample_grades`). A latent severity ``s`` and a medial/lateral balance
   ``m`` per knee (70 % of each shared by the subject's two knees) load on six Gaussian
   liabilities ``z_t = a_t s + b_t m + c_t e_t`` (unit variance); each OARSI grade is
   ``z_t`` cut at the normal quantiles of the paper's Table 1, so its marginal is Table 1's.
   KL follows from the OARSI grades by the KL definitions (:func:`kl_from_oarsi`), and a
   rater-noise step moves a share of all grades by one (:func:`apply_rater_noise`).
2. Shape (:func:`sample_shape`). Anatomy varies between knees (size, proportions,
   position, rotation, exposure); the clean grades set joint-space widths, osteophyte
   sizes (small spurs at the four margin keypoints), sclerosis and deformity.
3. Image (:func:`render`). Bones are height fields (femur above its distal contour, tibia
   below its plateau contour) cut by side profiles, so every keypoint is a point of a
   contour by construction: ``(x, contour(x))``; osteophytes grow from the contour next to
   their keypoint and do not move it. Vectorised numpy on a canvas a little larger than
   the image, then one bilinear affine warp (rotation, scale, shift) that the keypoints
   follow exactly.

Coordinates: ``(x, y)`` pixels with pixel centres at integer coordinates; shapes are
described in units of the image side (``u = (x + 0.5) / size``). Right-knee orientation
(lateral = image left) until the very end, where a left knee is mirrored, as it lies in a
raw radiograph.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from statistics import NormalDist

import numpy as np
from PIL import Image

from kpn_jax import roi as roi_lib
from kpn_jax import grades as grades_lib
from kpn_jax import keypoints as kp_lib

DEFAULT_IMAGE_SIZE = 320
DEFAULT_RATER_NOISE = 0.1
NUM_KEYPOINTS = kp_lib.KNEEL16.num_points

# The paper's Table 1: counts of each grade among 23,249 graded OAI knees, TASKS order.
TABLE1_COUNTS: dict[str, tuple[int, ...]] = {
    "kl": (2827, 2930, 10231, 5578, 1683),
    "jsn_lateral": (20207, 1337, 1197, 508),
    "jsn_medial": (10676, 6884, 4506, 1183),
    "ost_femur_lateral": (13646, 5554, 2045, 2004),
    "ost_femur_medial": (11728, 5319, 2486, 3716),
    "ost_tibia_lateral": (13976, 6124, 1373, 1776),
    "ost_tibia_medial": (8043, 10870, 2552, 1784),
}
TABLE1_PREVALENCE: dict[str, np.ndarray] = {
    task: np.asarray(counts, np.float64) / sum(counts) for task, counts in TABLE1_COUNTS.items()}

# Latent model, calibrated by a grid search over 200,000 simulated knees so that KL
# derived by the rules below lands within 1 point of Table 1 (docs/SYNTHETIC.md).
# Loadings (a on severity, b on medial balance): osteophytes are mostly one process
# (a high); JSN splits strongly into medial (varus) and lateral (valgus) knees.
SUBJECT_SHARE = 0.7        # share of the latent variance common to both knees of a subject
JSN_LOADING = (0.6, 0.7)
OSTEOPHYTE_LOADING = (0.85, 0.3)
LIPPING_LOADING = 0.3      # of the doubtful-lipping liability on severity
LIPPING_THRESHOLD = -0.12  # liability above it: doubtful lipping (matters only without osteophytes)

# Independent random streams of one knee (and of one subject).
_STREAM_SUBJECT, _STREAM_GRADES, _STREAM_RATER, _STREAM_SHAPE, _STREAM_PIXELS = range(5)


def _rng(seed: int, key: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(key), stream]))


def check_int(name: str, value, minimum: int = 0) -> int:
    """``value`` as an int; ValueError naming ``name`` unless an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_seed_index(seed, index) -> None:
    check_int("seed", seed)
    check_int("index", index)


# ---------------------------------------------------------------------------------------
# Subjects and ids.


def subject_of(index: int) -> tuple[int, str]:
    """``(subject number, side)`` of knee ``index``: ``2k`` is k's right knee, ``2k+1`` the left."""
    return index // 2, ("R", "L")[index % 2]


def subject_id(seed: int, subject: int) -> str:
    return f"synth{seed}-{subject:07d}"


def image_id(seed: int, index: int) -> str:
    subject, side = subject_of(index)
    return f"{subject_id(seed, subject)}{side}"


# ---------------------------------------------------------------------------------------
# Grades.


def _thresholds(prevalence: np.ndarray) -> np.ndarray:
    """Normal quantiles cutting a standard normal liability into grades of ``prevalence``."""
    normal = NormalDist()
    return np.array([normal.inv_cdf(c) for c in np.cumsum(prevalence)[:-1]])


_OARSI_THRESHOLDS = {task: _thresholds(TABLE1_PREVALENCE[task]) for task in grades_lib.OARSI_TASKS}
# (severity loading, medial-balance loading) per OARSI task, lateral tasks load -b.
_OARSI_LOADINGS = {
    "jsn_lateral": (JSN_LOADING[0], -JSN_LOADING[1]),
    "jsn_medial": JSN_LOADING,
    "ost_femur_lateral": (OSTEOPHYTE_LOADING[0], -OSTEOPHYTE_LOADING[1]),
    "ost_femur_medial": OSTEOPHYTE_LOADING,
    "ost_tibia_lateral": (OSTEOPHYTE_LOADING[0], -OSTEOPHYTE_LOADING[1]),
    "ost_tibia_medial": OSTEOPHYTE_LOADING,
}


def kl_from_oarsi(oarsi, lipping) -> np.ndarray:
    """KL grade from the six OARSI grades by the KL definitions.

    Severe JSN (3) -> KL 4; moderate JSN (2) -> KL 3; else any osteophyte -> KL 2; else
    doubtful narrowing (JSN 1) or doubtful lipping -> KL 1; else KL 0.

    Args:
      oarsi: int ``[..., 6]`` in ``grades.OARSI_TASKS`` order.
      lipping: bool ``[...]``, doubtful osteophytic lipping (below OARSI grade 1).

    Returns:
      int32 ``[...]``.
    """
    oarsi = np.asarray(oarsi)
    if oarsi.shape[-1:] != (6,):
        raise ValueError(f"kl_from_oarsi: oarsi must be [..., 6], got {oarsi.shape}")
    max_jsn = oarsi[..., :2].max(axis=-1)
    max_osteophyte = oarsi[..., 2:].max(axis=-1)
    kl = np.where(max_jsn >= 3, 4,
                  np.where(max_jsn == 2, 3,
                           np.where(max_osteophyte >= 1, 2,
                                    np.where((max_jsn == 1) | np.asarray(lipping, bool), 1, 0))))
    return kl.astype(np.int32)


def _move_probabilities(prevalence: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Per grade, the probability to move one up and one down (Metropolis, keeps ``prevalence``)."""
    up = np.append(step * np.minimum(1.0, prevalence[1:] / prevalence[:-1]), 0.0)
    down = np.insert(step * np.minimum(1.0, prevalence[:-1] / prevalence[1:]), 0, 0.0)
    return up, down


def _expected_share_per_step() -> float:
    """Share of all 7 grades changed per unit proposal step, under Table 1's marginals."""
    shares = []
    for task in grades_lib.TASKS:
        p = TABLE1_PREVALENCE[task]
        up, down = _move_probabilities(p, 1.0)
        shares.append(float(np.sum(p * (up + down))))
    return float(np.mean(shares))


_SHARE_PER_STEP = _expected_share_per_step()
MAX_RATER_NOISE = 0.5 * _SHARE_PER_STEP


def apply_rater_noise(grades_clean, uniforms, rater_noise: float) -> np.ndarray:
    """Moves grades by one, as a second reader would disagree.

    Each grade moves up with probability ``q min(1, p(g+1)/p(g))`` and down with
    ``q min(1, p(g-1)/p(g))``, ``p`` = the task's Table 1 prevalence: a Metropolis step
    whose stationary law is Table 1, so the marginals stay where they were while a share
    ``rater_noise`` of all grades (averaged over the 7 tasks, at Table 1's marginals)
    changes. Rare grades next to common ones change most, as readers disagree most there.

    Args:
      grades_clean: int ``[..., 7]``.
      uniforms: float ``[..., 7]`` in ``[0, 1)``, the randomness (one draw per grade).
      rater_noise: expected share of grades changed, ``0 <= rater_noise <= MAX_RATER_NOISE``.

    Returns:
      int32 ``[..., 7]``.
    """
    if not 0.0 <= rater_noise <= MAX_RATER_NOISE:
        raise ValueError(f"rater_noise must be in [0, {MAX_RATER_NOISE:.3f}], got {rater_noise}")
    grades = grades_lib.validate(grades_clean, name="grades_clean").copy()
    uniforms = np.asarray(uniforms, np.float64)
    step = rater_noise / _SHARE_PER_STEP
    for t, task in enumerate(grades_lib.TASKS):
        up, down = _move_probabilities(TABLE1_PREVALENCE[task], step)
        g = grades[..., t]
        u = uniforms[..., t]
        move_up = u < up[g]
        move_down = (u >= up[g]) & (u < up[g] + down[g])
        grades[..., t] = g + move_up.astype(np.int32) - move_down.astype(np.int32)
    return grades


@dataclasses.dataclass(frozen=True)
class KneeGrades:
    """What the grade model knows about one knee.

    Attributes:
      grades: int32 ``[7]`` as a reader reports them (after rater noise).
      grades_clean: int32 ``[7]`` the truth the image is drawn from; KL obeys the KL rules.
      lipping: doubtful osteophytic lipping (drawn when the knee has no osteophyte).
      severity: the knee's latent severity (standard normal).
      balance: the knee's latent medial-minus-lateral balance (standard normal).
    """

    grades: np.ndarray
    grades_clean: np.ndarray
    lipping: bool
    severity: float
    balance: float


def sample_grades(seed: int, index: int, rater_noise: float = DEFAULT_RATER_NOISE) -> KneeGrades:
    """The grades of knee ``index`` (cheap: no image). Deterministic in ``(seed, index)``."""
    _check_seed_index(seed, index)
    subject, _ = subject_of(index)
    subject_severity, subject_balance = _rng(seed, subject, _STREAM_SUBJECT).standard_normal(2)
    draws = _rng(seed, index, _STREAM_GRADES).standard_normal(9)
    w_subject, w_knee = math.sqrt(SUBJECT_SHARE), math.sqrt(1.0 - SUBJECT_SHARE)
    severity = w_subject * subject_severity + w_knee * draws[0]
    balance = w_subject * subject_balance + w_knee * draws[1]
    oarsi = np.zeros(6, np.int32)
    for t, task in enumerate(grades_lib.OARSI_TASKS):
        a, b = _OARSI_LOADINGS[task]
        liability = a * severity + b * balance + math.sqrt(1.0 - a * a - b * b) * draws[2 + t]
        oarsi[t] = np.searchsorted(_OARSI_THRESHOLDS[task], liability)
    lipping_liability = (LIPPING_LOADING * severity
                         + math.sqrt(1.0 - LIPPING_LOADING ** 2) * draws[8])
    lipping = bool(lipping_liability > LIPPING_THRESHOLD) and oarsi[2:].max() == 0
    kl = kl_from_oarsi(oarsi, lipping)
    grades_clean = np.concatenate([[kl], oarsi]).astype(np.int32)
    uniforms = _rng(seed, index, _STREAM_RATER).random(len(grades_lib.TASKS))
    grades = apply_rater_noise(grades_clean, uniforms, rater_noise)
    return KneeGrades(grades=grades, grades_clean=grades_clean, lipping=lipping,
                      severity=float(severity), balance=float(balance))


# ---------------------------------------------------------------------------------------
# Shape: anatomy and disease of one knee, in units of the image side.

# Joint-space width relative to the knee's normal width, per JSN grade (clean grade).
JSN_WIDTH_FACTOR = (1.0, 0.70, 0.44, 0.17)
NORMAL_WIDTH = {"lateral": 0.056, "medial": 0.046}
# Osteophyte length per grade (units of the image side): 0.02 is 6 px at 320 px.
OSTEOPHYTE_LENGTH = (0.0, 0.029, 0.053, 0.081)
LIPPING_LENGTH = 0.015  # 0.85-1.35x this: overlaps a normal bump (<= 0.012) and grade 1
# Where the osteophytes sit: the four margins, with the keypoint they attach to.
OSTEOPHYTE_SITES = {  # task -> (keypoint, x direction outwards, y direction towards the joint)
    "ost_femur_lateral": (0, -1.0, 1.0),
    "ost_femur_medial": (6, 1.0, 1.0),
    "ost_tibia_lateral": (7, -1.0, -1.0),
    "ost_tibia_medial": (15, 1.0, -1.0),
}


@dataclasses.dataclass(frozen=True)
class KneeShape:
    """Every number the renderer needs; lengths in units of the image side."""

    # Tibia.
    tibia_left: float          # lateral plateau margin
    tibia_right: float         # medial plateau margin
    plateau_y: float           # plateau level at the lateral condyle
    plateau_tilt: float        # plateau level change per unit x (medial minus lateral)
    facet_bulge: tuple[float, float]  # lateral convexity, medial concavity
    spine_x: tuple[float, float]
    spine_height: tuple[float, float]
    spine_width: float
    plateau_corner: float      # radius of the rounded plateau margins
    tibia_taper: tuple[float, float]  # inward shift of the tibial sides, lateral, medial
    # Femur.
    condyle_x: tuple[float, float]    # lateral and medial condyle bottoms
    condyle_y: tuple[float, float]
    femur_left: float
    femur_right: float
    condyle_outer_height: tuple[float, float]
    condyle_outer_power: tuple[float, float]
    condyle_inner_power: tuple[float, float]
    notch_x: float
    notch_depth: float         # apex above the mean condyle bottom
    notch_half_width: float
    femur_taper: tuple[float, float]  # inward shift of the femoral sides at the top
    # Other bodies.
    fibula: tuple[float, float, float, float]  # head centre x, y, radius x, radius y
    patella: tuple[float, float, float, float]
    soft_tissue_half_width: float
    # Disease.
    sclerosis: tuple[float, float]    # lateral, medial subchondral brightening
    osteophytes: dict               # task -> (length, thickness, angle, base offset)
    irregularity: float             # amplitude of contour waviness (deformity)
    irregularity_phase: float
    # Imaging.
    rotation_deg: float
    scale: float
    shift: tuple[float, float]
    bone_density: float
    soft_density: float
    rim_strength: float
    texture_strength: float
    gamma: float
    window: tuple[float, float]
    noise_level: float


def sample_shape(seed: int, index: int, knee: KneeGrades) -> KneeShape:
    """Anatomy of knee ``index`` and the signs of its clean grades."""
    rng = _rng(seed, index, _STREAM_SHAPE)
    g = knee.grades_clean
    jsn = {"lateral": int(g[1]), "medial": int(g[2])}
    severity = max(knee.severity, 0.0)
    # Deformity grows with narrowing and the latent severity (KL 3-4 look worse).
    deformity = float(np.clip(0.18 * max(jsn.values()) + 0.12 * severity
                              + 0.05 * rng.standard_normal(), 0.0, 1.0))

    def jitter(sd):
        return float(sd * rng.standard_normal())

    center_x = 0.49
    tibia_left = 0.100 + jitter(0.012) - 0.012 * deformity
    tibia_right = 0.885 + jitter(0.012) + 0.012 * deformity
    plateau_y = 0.61 + jitter(0.008)
    width = tibia_right - tibia_left
    condyle_x = (tibia_left + 0.17 * width + jitter(0.006),
                 tibia_left + 0.83 * width + jitter(0.006))
    # Varus/valgus: the femur sits where the joint-space widths put it; deformity adds
    # a little subluxation.
    subluxation = 0.015 * deformity * (1.0 if knee.balance < 0 else -1.0)
    condyle_x = (condyle_x[0] + subluxation, condyle_x[1] + subluxation)
    plateau_tilt = jitter(0.02)
    widths = {}
    for compartment, grade in jsn.items():
        normal = NORMAL_WIDTH[compartment] * (1.0 + jitter(0.09))
        factor = JSN_WIDTH_FACTOR[grade] * (1.0 + jitter(0.09))
        widths[compartment] = max(normal * factor, 0.004)
    spine_x = (center_x - 0.055 + jitter(0.006), center_x + 0.065 + jitter(0.006))
    spine_height = tuple(h * (1.0 + 0.25 * deformity) * (1.0 + jitter(0.12)) for h in (0.05, 0.065))
    flattening = 1.0 - 0.35 * deformity
    # Spurs: (length, thickness, angle from the horizontal towards the joint in degrees,
    # base offset inwards from the margin keypoint). Sizes of adjacent grades overlap
    # (readers disagree there); margins without an osteophyte may carry a normal bump
    # smaller than doubtful lipping, which is smaller than grade 1.
    lipping_site = None
    if knee.lipping:
        lipping_site = ("ost_tibia_medial", "ost_femur_medial", "ost_tibia_lateral",
                        "ost_femur_lateral")[int(rng.choice(4, p=(0.4, 0.25, 0.2, 0.15)))]
    osteophytes = {}
    for t, task in enumerate(grades_lib.TASKS):
        if task not in OSTEOPHYTE_SITES:
            continue
        grade = int(g[t])
        size_draw, normal_bump, thickness, angle, offset = rng.random(5)
        if grade > 0:
            length = OSTEOPHYTE_LENGTH[grade] * math.exp(0.22 * NormalDist().inv_cdf(
                0.005 + 0.99 * size_draw))
        elif task == lipping_site:
            length = LIPPING_LENGTH * (0.85 + 0.5 * size_draw)
        elif normal_bump < 0.5:
            length = 0.003 + 0.009 * size_draw
        else:
            continue
        osteophytes[task] = (length, (0.45 + 0.3 * thickness) * length + 0.003,
                             55.0 * angle, 0.012 * offset)
    sclerosis = tuple(float(np.clip(0.05 * jsn[c] + 0.03 * severity + jitter(0.02), 0.0, 0.3))
                      for c in ("lateral", "medial"))
    gap = condyle_x[1] - condyle_x[0]
    shape = KneeShape(
        tibia_left=tibia_left, tibia_right=tibia_right, plateau_y=plateau_y,
        plateau_tilt=plateau_tilt,
        facet_bulge=(0.010 + jitter(0.003), 0.006 + jitter(0.003)),
        spine_x=spine_x, spine_height=spine_height, spine_width=0.024 + jitter(0.003),
        plateau_corner=0.020 + jitter(0.003),
        tibia_taper=(0.09 + jitter(0.02), 0.07 + jitter(0.02)),
        condyle_x=condyle_x, condyle_y=(0.0, 0.0),
        femur_left=tibia_left + 0.02 + jitter(0.006),
        femur_right=tibia_right - 0.004 + jitter(0.006),
        condyle_outer_height=(0.10 * flattening + jitter(0.01), 0.095 * flattening + jitter(0.01)),
        condyle_outer_power=(2.4 + deformity + jitter(0.2), 2.4 + deformity + jitter(0.2)),
        condyle_inner_power=(1.55 + jitter(0.1), 1.55 + jitter(0.1)),
        notch_x=0.5 * (condyle_x[0] + condyle_x[1]) + jitter(0.006),
        notch_depth=0.125 + jitter(0.012),
        notch_half_width=0.11 * gap + jitter(0.004),
        femur_taper=(0.09 + jitter(0.02), 0.08 + jitter(0.02)),
        fibula=(tibia_left + 0.075 + jitter(0.01), plateau_y + 0.25 + jitter(0.015),
                0.075 + jitter(0.006), 0.095 + jitter(0.008)),
        patella=(center_x + jitter(0.02), 0.30 + jitter(0.03), 0.17 + jitter(0.015),
                 0.20 + jitter(0.02)),
        soft_tissue_half_width=0.60 + jitter(0.05),
        sclerosis=sclerosis,
        osteophytes=osteophytes,
        irregularity=0.004 * deformity,
        irregularity_phase=float(rng.uniform(0, 2 * np.pi)),
        rotation_deg=float(rng.uniform(-4.0, 4.0)),
        scale=float(rng.uniform(0.93, 1.07)),
        shift=(float(rng.uniform(-0.025, 0.025)), float(rng.uniform(-0.025, 0.025))),
        bone_density=0.24 + jitter(0.025),
        soft_density=0.30 + jitter(0.03),
        rim_strength=1.2 + jitter(0.15),
        texture_strength=0.3 + jitter(0.05),
        gamma=float(np.exp(jitter(0.15))),
        window=(float(rng.uniform(0.03, 0.1)), float(rng.uniform(0.75, 0.9))),
        noise_level=float(rng.uniform(0.01, 0.025)),
    )
    # The condyles sit one joint-space width above the plateau below them.
    plateau = tibia_contour(shape, np.asarray(condyle_x))
    return dataclasses.replace(shape, condyle_y=(float(plateau[0]) - widths["lateral"],
                                                 float(plateau[1]) - widths["medial"]))


# ---------------------------------------------------------------------------------------
# Contours (functions of x, units of the image side). Everything the image and the
# keypoints are made of.

_NO_BONE = 10.0  # a contour value far outside the image: "no bone in this column"


def _rise(t: np.ndarray, power) -> np.ndarray:
    """Superellipse rise ``1 - (1 - t^p)^(1/p)`` for ``t`` in ``[0, 1]``: 0 flat -> 1 vertical."""
    t = np.clip(t, 0.0, 1.0)
    return 1.0 - (1.0 - t ** power) ** (1.0 / power)


def tibia_contour(shape: KneeShape, x) -> np.ndarray:
    """Tibial plateau ``y`` at ``x`` (bone below); ``_NO_BONE`` beside the plateau.

    Two facets (the lateral one convex, the medial one a little concave), the tibial
    spines as two peaks on a broad eminence, quarter-circle margins that end vertical,
    and the deformity's waviness.
    """
    x = np.asarray(x, np.float64)
    left, right = shape.tibia_left, shape.tibia_right
    t = (x - left) / (right - left)
    y = shape.plateau_y + shape.plateau_tilt * (t - 0.17)
    y = y - shape.facet_bulge[0] * np.sin(np.pi * np.clip(t / 0.45, 0, 1)) ** 2
    y = y + shape.facet_bulge[1] * np.sin(np.pi * np.clip((t - 0.55) / 0.45, 0, 1)) ** 2
    w = shape.spine_width
    for centre, height in zip(shape.spine_x, shape.spine_height):
        y = y - height * np.exp(-0.5 * ((x - centre) / w) ** 2)
    middle = 0.5 * (shape.spine_x[0] + shape.spine_x[1])
    y = y - 0.035 * np.exp(-0.5 * ((x - middle) / (2.2 * w)) ** 2)
    r = shape.plateau_corner
    for edge_distance in (x - left, right - x):
        inside = np.clip(edge_distance, 0.0, r)
        y = y + r - np.sqrt(np.maximum(r * r - (r - inside) ** 2, 0.0))
    y = y + shape.irregularity * np.sin(70.0 * x + shape.irregularity_phase)
    return np.where((x >= left) & (x <= right), y, _NO_BONE)


def _notch_roof(shape: KneeShape, x) -> np.ndarray:
    apex = 0.5 * (shape.condyle_y[0] + shape.condyle_y[1]) - shape.notch_depth
    # Rises to the condyles' level at +-1.6 notch half-widths: an arch with steep walls.
    k = shape.notch_depth / (1.6 * shape.notch_half_width) ** 2
    return apex + k * (np.asarray(x) - shape.notch_x) ** 2


def femur_contour(shape: KneeShape, x) -> np.ndarray:
    """Distal femoral contour ``y`` at ``x`` (bone above); ``-_NO_BONE`` beside the femur.

    Each condyle is two superellipse halves (outer: a rounded corner that ends vertical
    at the femur's side; inner: rising into the notch); the notch roof is a parabolic
    arch between the inner halves' ends.
    """
    x = np.asarray(x, np.float64)
    (xl, xm), (yl, ym) = shape.condyle_x, shape.condyle_y
    roof = _notch_roof(shape, x)
    inner_end = (shape.notch_x - shape.notch_half_width, shape.notch_x + shape.notch_half_width)
    inner_height = (yl - float(_notch_roof(shape, inner_end[0])),
                    ym - float(_notch_roof(shape, inner_end[1])))
    # Lateral condyle.
    outer = (yl - shape.condyle_outer_height[0]
             * _rise((xl - x) / (xl - shape.femur_left), shape.condyle_outer_power[0]))
    inner = yl - inner_height[0] * _rise((x - xl) / (inner_end[0] - xl),
                                         shape.condyle_inner_power[0])
    lateral = np.where(x < xl, outer, np.where(x <= inner_end[0], inner, -_NO_BONE))
    # Medial condyle (mirror image).
    outer = (ym - shape.condyle_outer_height[1]
             * _rise((x - xm) / (shape.femur_right - xm), shape.condyle_outer_power[1]))
    inner = ym - inner_height[1] * _rise((xm - x) / (xm - inner_end[1]),
                                         shape.condyle_inner_power[1])
    medial = np.where(x > xm, outer, np.where(x >= inner_end[1], inner, -_NO_BONE))
    roof = np.where((x >= inner_end[0]) & (x <= inner_end[1]), roof, -_NO_BONE)
    y = np.maximum(np.maximum(lateral, roof), medial)
    wave = shape.irregularity * np.sin(60.0 * x + 1.7 + shape.irregularity_phase)
    inside = (x >= shape.femur_left) & (x <= shape.femur_right)
    return np.where(inside, y + wave, -_NO_BONE)


def keypoint_x(shape: KneeShape) -> np.ndarray:
    """The x of the 16 kneel16 points; their y is the contour's (so they lie on it exactly)."""
    (xl, xm) = shape.condyle_x
    femur = [xl - 0.8 * (xl - shape.femur_left), xl, 0.5 * (xl + shape.notch_x), shape.notch_x,
             0.5 * (shape.notch_x + xm), xm, xm + 0.8 * (shape.femur_right - xm)]
    s1, s2 = shape.spine_x
    r = 0.3 * shape.plateau_corner
    tibia = [shape.tibia_left + r, xl, 0.5 * (xl + s1), s1, 0.5 * (s1 + s2), s2,
             0.5 * (s2 + xm), xm, shape.tibia_right - r]
    return np.array(femur + tibia)


def canonical_keypoints(shape: KneeShape) -> np.ndarray:
    """kneel16 points ``[16, 2]`` in units of the image side, before the final warp."""
    x = keypoint_x(shape)
    y = np.concatenate([femur_contour(shape, x[:7]), tibia_contour(shape, x[7:])])
    return np.stack([x, y], axis=-1)


# ---------------------------------------------------------------------------------------
# Rendering.

JOINT_CENTER = (0.49, 0.57)  # the warp's fixed point, where the real crops have the joint
ATTENUATION_SCALE = 1.5  # brightness = 1 - exp(-scale * attenuation): overlaps saturate


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _slope_factor(profile: np.ndarray, step: float) -> np.ndarray:
    """``1 / sqrt(1 + profile'^2)``: turns a vertical gap into a distance to the contour.

    Clamped at 0.3 where the contour turns vertical (there the side profile is the
    nearer edge anyway).
    """
    slope = np.gradient(profile, step)
    return np.clip(1.0 / np.sqrt(1.0 + slope * slope), 0.3, 1.0).astype(np.float32)


def _trabecular_texture(rng: np.random.Generator, shape_hw: tuple[int, int],
                        size: int) -> np.ndarray:
    """Smooth noise ``[H, W]`` of about unit variance, the trabecular bone: fine grain
    (~0.01 of the image side), vertical streaks (trabeculae run along the bone; ~0.007 x
    0.03) and slow blotches (~0.12).

    White noise on coarse grids, all brought to the finest grid and upsampled bilinearly
    by PIL in one resize.
    """
    height, width = shape_hw

    def noise(cell_h, cell_w):
        """Unit-variance white noise, one value per cell (uniform: 5x cheaper than normal)."""
        shape_hw = (max(2, int(round(height / max(cell_h * size, 1.5)))),
                    max(2, int(round(width / max(cell_w * size, 1.5)))))
        values = rng.random(shape_hw, dtype=np.float32)
        values -= 0.5
        values *= math.sqrt(12.0)
        return values

    def resized(coarse, out_hw):
        image = Image.fromarray(coarse, mode="F").resize((out_hw[1], out_hw[0]), Image.BILINEAR)
        return np.asarray(image)

    grain = noise(0.01, 0.007)
    coarse = (0.6 * grain + resized(noise(0.03, 0.007), grain.shape)
              + 0.9 * resized(noise(0.12, 0.12), grain.shape))
    return resized(coarse, (height, width))


TEXTURE_TILE_SIDES = 3  # the shared texture tile is this many image sides square


@functools.lru_cache(maxsize=4)
def _texture_tile(size: int) -> np.ndarray:
    """A large trabecular texture for images of side ``size``, made once per process.

    A pure function of ``size`` (fixed seed), cached because drawing a fresh texture for
    every knee cost as much as drawing the bones; knees take random crops of it.
    """
    side = TEXTURE_TILE_SIDES * size
    tile = _trabecular_texture(np.random.default_rng(20211217), (side, side), size)
    tile.setflags(write=False)
    return tile


def _texture_crop(rng: np.random.Generator, shape_hw: tuple[int, int], size: int) -> np.ndarray:
    """A ``[H, W]`` view of the texture tile at a random offset, mirrored half the time
    (the streaks stay vertical)."""
    tile = _texture_tile(size)
    height, width = shape_hw
    if height > tile.shape[0] or width > tile.shape[1]:  # a warp far beyond its ranges
        return _trabecular_texture(rng, shape_hw, size)
    top = int(rng.integers(0, tile.shape[0] - height + 1))
    left = int(rng.integers(0, tile.shape[1] - width + 1))
    crop = tile[top:top + height, left:left + width]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _spur_distance(u, v, base, direction, length, thickness):
    """Signed distance (inside > 0) to a tapered spur growing from ``base`` along ``direction``."""
    du, dv = u - base[0], v - base[1]
    along = du * direction[0] + dv * direction[1]
    across = np.abs(-du * direction[1] + dv * direction[0])
    half_width = thickness * (1.0 - np.clip(along, 0.0, length) / length) ** 0.8
    return np.minimum(np.minimum(half_width - across, length - along), along + thickness)


def _chord(u, left, right):
    """Relative path length through a cylinder spanning ``[left, right]`` at columns ``u``."""
    centre, half = 0.5 * (left + right), 0.5 * (right - left)
    t = u[None, :] - centre
    t /= half
    np.square(t, out=t)
    np.subtract(1.0, t, out=t)
    np.clip(t, 0.0, 1.0, out=t)
    return np.sqrt(t, out=t)


def _span(grid: np.ndarray, low: float, high: float) -> slice:
    """Indices of the sorted ``grid`` within ``[low, high]``."""
    start, stop = np.searchsorted(grid, [low, high])
    return slice(int(start), int(max(start, stop)))


def _ellipse_distance(u, v, cx, cy, rx, ry):
    """Approximate signed distance (inside > 0) to an ellipse."""
    q = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
    return (1.0 - q) * min(rx, ry)


@dataclasses.dataclass(frozen=True)
class _Warp:
    """Rotation, scale and shift about the joint centre, in pixels (centres at integers).

    ``output = centre + scale R (canonical - centre) + shift``; the canvas is the box of
    canonical pixels that the output's corners map back to, plus a border for bilinear
    sampling, so it is only as large as this knee's warp needs.
    """

    matrix: np.ndarray       # [2, 2] canonical -> output
    inverse: np.ndarray      # [2, 2] output -> canonical
    centre: np.ndarray       # [2]
    shift: np.ndarray        # [2]
    origin: tuple[int, int]  # canonical pixel (x, y) of canvas pixel (0, 0)
    canvas_hw: tuple[int, int]

    @classmethod
    def for_shape(cls, shape: KneeShape, size: int) -> "_Warp":
        theta = math.radians(shape.rotation_deg)
        rotation = np.array([[math.cos(theta), -math.sin(theta)],
                             [math.sin(theta), math.cos(theta)]])
        centre = np.array(JOINT_CENTER) * size - 0.5
        shift = np.array(shape.shift) * size
        inverse = rotation.T / shape.scale
        corners = np.array([[-0.5, -0.5], [size - 0.5, -0.5], [-0.5, size - 0.5],
                            [size - 0.5, size - 0.5]])
        back = (corners - centre - shift) @ inverse.T + centre
        low = np.floor(back.min(axis=0)).astype(int) - 2
        high = np.ceil(back.max(axis=0)).astype(int) + 3
        return cls(matrix=shape.scale * rotation, inverse=inverse, centre=centre, shift=shift,
                   origin=(int(low[0]), int(low[1])),
                   canvas_hw=(int(high[1] - low[1]), int(high[0] - low[0])))

    def forward(self, points: np.ndarray) -> np.ndarray:
        return (points - self.centre) @ self.matrix.T + self.centre + self.shift

    def apply(self, canvas: np.ndarray, size: int) -> np.ndarray:
        """Resamples the canvas (float, grey levels + 0.5) bilinearly into the uint8
        ``[size, size]`` output (PIL's float-to-8-bit conversion clips and truncates)."""
        offset = self.centre - self.inverse @ (self.centre + self.shift) - np.array(self.origin)
        # PIL maps output to input in pixel-edge coordinates (centres at +0.5).
        offset = offset + 0.5 - self.inverse @ np.array([0.5, 0.5])
        a = self.inverse
        warped = Image.fromarray(canvas, mode="F").transform(
            (size, size), Image.AFFINE,
            data=(a[0, 0], a[0, 1], offset[0], a[1, 0], a[1, 1], offset[1]),
            resample=Image.BILINEAR)
        return np.asarray(warped.convert("L"))


def _add_osteophytes(shape: KneeShape, keypoints: np.ndarray, u: np.ndarray, femur, tibia,
                     reach_extra: float) -> None:
    """Joins each osteophyte to its bone's signed distance, in place.

    The union's distance is the larger one, so the cortex runs around the spur.
    ``femur`` and ``tibia`` are ``(row v [R, 1], distance [R, W])`` of each bone's rows;
    ``keypoints`` are canonical (units of the image side).
    """
    for task, (length, thickness, angle, inwards) in shape.osteophytes.items():
        point, out_x, towards_joint = OSTEOPHYTE_SITES[task]
        base_x = keypoints[point, 0] - out_x * inwards
        contour = femur_contour if point < 7 else tibia_contour
        base = (base_x, float(contour(shape, np.array([base_x]))[0]))
        a = math.radians(angle)
        direction = (out_x * math.cos(a), towards_joint * math.sin(a))
        reach = length + thickness + reach_extra
        bone_v, distance = femur if point < 7 else tibia
        rows = _span(bone_v[:, 0], base[1] - reach, base[1] + reach)
        cols = _span(u, base[0] - reach, base[0] + reach)
        if rows.stop > rows.start and cols.stop > cols.start:
            spur = _spur_distance(u[None, cols], bone_v[rows], base, direction, length, thickness)
            distance[rows, cols] = np.maximum(distance[rows, cols], spur)


def render(shape: KneeShape, image_size: int, rng: np.random.Generator):
    """Draws one knee, right-knee orientation.

    Bones are attenuation maps: a soft-edged occupancy times (a cylinder's chord + cortical
    rim + trabecular texture + subchondral sclerosis); they add to the soft tissue, so
    overlaps (fibula behind tibia, patella in front of femur) come out brighter, as in a
    radiograph.

    Args:
      shape: from :func:`sample_shape`.
      image_size: side ``S`` of the square output in pixels.
      rng: the pixel-noise stream (texture and quantum noise).

    Returns:
      ``(image uint8 [S, S], keypoints float32 [16, 2] in output pixels)``.
    """
    size = int(image_size)
    pixel = 1.0 / size
    warp = _Warp.for_shape(shape, size)
    height, width = warp.canvas_hw
    # Canvas pixel (j, i) is canonical pixel (j + origin_x, i + origin_y), whose centre lies
    # at u = (x + 0.5) / size.
    u = ((np.arange(width) + warp.origin[0] + 0.5) * pixel).astype(np.float32)
    v = ((np.arange(height) + warp.origin[1] + 0.5) * pixel).astype(np.float32)
    rim_width = max(0.004, 0.7 * pixel)        # cortex seen edge-on; at least ~1 px

    femur_y = femur_contour(shape, u).astype(np.float32)
    tibia_y = tibia_contour(shape, u).astype(np.float32)
    femur_factor = _slope_factor(femur_y, pixel)
    tibia_factor = _slope_factor(tibia_y, pixel)
    keypoints = canonical_keypoints(shape)
    joint_top = float(femur_y[femur_y > -_NO_BONE].min(initial=shape.plateau_y))
    joint_bottom = float(tibia_y[tibia_y < _NO_BONE].max(initial=shape.plateau_y))

    # Rows each bone can reach (spurs included), so the work stays near the bones.
    femur_rows = _span(v, -1.0, float(femur_y[femur_y > -_NO_BONE].max(initial=0.0)) + 0.09)
    tibia_rows = _span(v, float(tibia_y[tibia_y < _NO_BONE].min(initial=1.0)) - 0.09, 2.0)
    vf = v[femur_rows, None]
    vt = v[tibia_rows, None]

    # Signed distances (units of the image side, inside > 0). Femur: above its contour,
    # between sides that come in towards the shaft above the condyles' corners.
    corner_top = (shape.condyle_y[0] - shape.condyle_outer_height[0],
                  shape.condyle_y[1] - shape.condyle_outer_height[1])
    left = shape.femur_left + shape.femur_taper[0] * (
        1.0 - np.exp(-np.maximum(corner_top[0] - 0.03 - vf, 0.0) / 0.2))
    right = shape.femur_right - shape.femur_taper[1] * (
        1.0 - np.exp(-np.maximum(corner_top[1] - 0.03 - vf, 0.0) / 0.2))
    femur_surface = (femur_y[None, :] - vf) * femur_factor[None, :]
    femur_d = np.minimum(np.minimum(femur_surface, u[None, :] - left), right - u[None, :])
    femur_chord = _chord(u, left, right)
    # Tibia: below its plateau; a concave flare brings the sides in under the plateau.
    flare = 1.0 - np.exp(-np.maximum(vt - (shape.plateau_y + shape.plateau_corner), 0.0) / 0.1)
    left = shape.tibia_left + shape.tibia_taper[0] * flare
    right = shape.tibia_right - shape.tibia_taper[1] * flare
    tibia_surface = (vt - tibia_y[None, :]) * tibia_factor[None, :]
    tibia_d = np.minimum(np.minimum(tibia_surface, u[None, :] - left), right - u[None, :])
    tibia_chord = _chord(u, left, right)

    _add_osteophytes(shape, keypoints, u, (vf, femur_d), (vt, tibia_d), reach_extra=3 * pixel)

    texture = _texture_crop(rng, (height, width), size)
    # Sclerosis: per column, the lateral value left of the notch, the medial one right of it.
    medial_weight = _smoothstep((u - shape.notch_x + 0.03) / 0.06)
    sclerosis = (1 - medial_weight) * shape.sclerosis[0] + medial_weight * shape.sclerosis[1]
    sclerosis_width = 0.02 + 0.06 * max(shape.sclerosis)
    near_joint = (joint_top - 0.05 - 5 * sclerosis_width, joint_bottom + 0.05 + 5 * sclerosis_width)
    wave = 0.012 * np.sin(11.0 * u + shape.irregularity_phase) + 0.005 * np.sin(23.0 * u)

    def bone(d, rows, vb, surface, density, scar_y):
        """Attenuation of one bone on canvas rows ``rows`` (``vb`` their v, ``[R, 1]``).

        ``density`` arrives holding the bone's chord and is overwritten (in-place
        arithmetic: this is the renderer's hot loop).
        """
        density *= 0.55
        density += 0.45
        scratch = np.multiply(texture[rows], shape.texture_strength)
        density += scratch
        np.maximum(d, 0.0, out=scratch)
        scratch *= -1.0 / rim_width
        np.exp(scratch, out=scratch)
        scratch *= shape.rim_strength
        density += scratch
        # Subchondral sclerosis, only computed near the joint.
        local = _span(vb[:, 0], *near_joint)
        if local.stop > local.start and max(shape.sclerosis) > 0:
            density[local] += sclerosis[None, :] * np.exp(
                np.maximum(surface[local], 0.0) * (-1.0 / sclerosis_width))
        # The physeal scar: a faint wavy line across the bone end.
        reach = 4 * rim_width
        local = _span(vb[:, 0], float(scar_y.min()) - reach, float(scar_y.max()) + reach)
        if local.stop > local.start:
            offset = (vb[local] - scar_y[None, :]) / (2 * rim_width)
            density[local] += 0.2 * np.exp(-offset * offset)
        np.multiply(d, size * shape.bone_density, out=scratch)
        scratch += 0.5 * shape.bone_density
        np.clip(scratch, 0.0, shape.bone_density, out=scratch)  # soft-edged occupancy
        density *= scratch
        return density

    # Soft tissue: a cylinder, thickest in the middle, the calf a little thicker.
    offset = (u - JOINT_CENTER[0]) / shape.soft_tissue_half_width
    soft = shape.soft_density * np.sqrt(np.clip(1.0 - offset * offset, 0.0, 1.0))
    attenuation = soft[None, :] * (1.0 + 0.15 * _smoothstep((v - 0.2) / 0.8))[:, None]
    femur_scar = 0.5 * (shape.condyle_y[0] + shape.condyle_y[1]) - shape.notch_depth - 0.06 + wave
    attenuation[femur_rows] += bone(femur_d, femur_rows, vf, femur_surface, femur_chord, femur_scar)
    attenuation[tibia_rows] += bone(tibia_d, tibia_rows, vt, tibia_surface, tibia_chord,
                                    shape.plateau_y + 0.085 - wave)
    # The tibial plateau's posterior rim: a second, fainter line under the first.
    local = _span(vt[:, 0], joint_top - 0.01, joint_bottom + 0.03)
    if local.stop > local.start:
        offset = (tibia_surface[local] - 0.016) / rim_width
        rim = (0.3 * shape.bone_density) * np.exp(-offset * offset)
        attenuation[tibia_rows][local] += rim * (tibia_d[local] > 0)
    # The posterior outlines of the femoral condyles, seen through them: a faint second
    # contour a little above the distal one.
    local = _span(vf[:, 0], joint_top - 0.12, joint_bottom)
    if local.stop > local.start:
        outline = (0.35 * shape.bone_density) * np.exp(
            -(((femur_surface[local] - 0.035) / (1.5 * rim_width)) ** 2))
        attenuation[femur_rows][local] += outline * (femur_d[local] > 0.02)

    # Fibular head and neck, lateral, behind the tibia (attenuations add).
    fx, fy, frx, fry = shape.fibula
    rows, cols = _span(v, fy - fry - 0.01, 2.0), _span(u, fx - frx - 0.01, fx + frx + 0.01)
    if rows.stop > rows.start and cols.stop > cols.start:
        uu, vv = u[None, cols], v[rows, None]
        fibula_d = np.maximum(_ellipse_distance(uu, vv, fx, fy, frx, fry),
                              np.where(vv > fy, 0.35 * frx - np.abs(uu - fx + 0.2 * frx), -1.0))
        occupancy = np.clip(fibula_d * size + 0.5, 0.0, 1.0)
        attenuation[rows, cols] += 0.45 * shape.bone_density * occupancy * (
            1.0 + 0.6 * shape.rim_strength * np.exp(-np.maximum(fibula_d, 0.0) / rim_width)
            + shape.texture_strength * texture[rows, cols])
    # Patella, seen through the femur: a faint oval with soft edges.
    px, py, prx, pry = shape.patella
    rows = _span(v, py - pry - 0.01, py + pry + 0.01)
    cols = _span(u, px - prx - 0.01, px + prx + 0.01)
    if rows.stop > rows.start and cols.stop > cols.start:
        patella_d = _ellipse_distance(u[None, cols], v[rows, None], px, py, prx, pry)
        attenuation[rows, cols] += 0.12 * shape.bone_density * _smoothstep(patella_d / 0.03)

    # Exposure: the detector's response, a window and a gamma, to grey levels.
    brightness = np.exp(attenuation * -ATTENUATION_SCALE, out=attenuation)
    np.subtract(1.0 - shape.window[0], brightness, out=brightness)
    brightness *= 1.0 / (shape.window[1] - shape.window[0])
    np.clip(brightness, 0.0, 1.0, out=brightness)
    np.power(brightness, shape.gamma, out=brightness)
    # Quantum noise (uniform with the intended standard deviation: 5x cheaper than
    # normal), then +0.5 so that the warp's truncation to 8 bits rounds.
    noise = rng.random(brightness.shape, dtype=np.float32)
    noise -= 0.5
    noise *= shape.noise_level * math.sqrt(12.0)
    brightness += noise
    brightness *= 255.0
    brightness += 0.5
    image = warp.apply(brightness, size)
    points = warp.forward(keypoints * size - 0.5)
    return image, points.astype(np.float32)


def generate_knee(seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE,
                  rater_noise: float = DEFAULT_RATER_NOISE) -> dict:
    """One synthetic knee radiograph, as it lies in a raw radiograph.

    Args:
      seed: dataset seed (non-negative int).
      index: knee number (non-negative int); ``2k`` and ``2k + 1`` are subject ``k``'s
        right and left knees.
      image_size: side of the square image in pixels (>= 32).
      rater_noise: expected share of grades moved by one (:func:`apply_rater_noise`).

    Returns:
      dict with ``image`` uint8 ``[S, S]`` (a left knee mirrored: lateral on the image
      right), ``keypoints`` float32 ``[16, 2]`` kneel16 ``(x, y)`` pixels of that image,
      ``grades`` int32 ``[7]`` (after rater noise), ``grades_clean`` int32 ``[7]`` (what
      the image shows), ``side`` ('R'/'L'), ``subject_id``, ``image_id``, ``severity``
      (the latent), ``lipping`` (doubtful lipping drawn).
    """
    _check_seed_index(seed, index)
    check_int("image_size", image_size, minimum=32)
    knee = sample_grades(seed, index, rater_noise)
    shape = sample_shape(seed, index, knee)
    image, points = render(shape, image_size, _rng(seed, index, _STREAM_PIXELS))
    subject, side = subject_of(index)
    # roi.to_right_orientation mirrors a left knee; mirroring is its own inverse.
    image, points = roi_lib.to_right_orientation(image, points, side)
    return {
        "image": image,
        "keypoints": np.asarray(points, np.float32),
        "grades": knee.grades,
        "grades_clean": knee.grades_clean,
        "side": side,
        "subject_id": subject_id(seed, subject),
        "image_id": image_id(seed, index),
        "severity": knee.severity,
        "lipping": knee.lipping,
    }


def generate_batch(seed: int, indices, image_size: int = DEFAULT_IMAGE_SIZE,
                   rater_noise: float = DEFAULT_RATER_NOISE) -> dict:
    """:func:`generate_knee` for each of ``indices``, stacked: ``image [B, S, S]``, ``keypoints
    [B, 16, 2]``, ``grades [B, 7]``, ``grades_clean [B, 7]``, and lists of the strings."""
    knees = [generate_knee(seed, int(i), image_size, rater_noise) for i in indices]
    if not knees:
        raise ValueError("generate_batch: indices is empty")
    return {key: (np.stack([k[key] for k in knees]) if isinstance(knees[0][key], np.ndarray)
                  else [k[key] for k in knees]) for key in knees[0]}
