"""Keypoint schemas, arc-length densification and bilinear feature gathering.

Coordinates are ``(x, y)`` in pixels of the input image with pixel centres at
integer coordinates (column ``j`` is at ``x = j``), right-knee orientation
(lateral = image left).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

COMPARTMENTS: tuple[str, ...] = ("FL", "FM", "TL", "TM")

# Which keypoints feed which head: KL and JSN read every point (the paper's
# f_a); each osteophyte head reads its own compartment.
TASK_COMPARTMENT: dict[str, str | None] = {
    "kl": None,
    "jsn_lateral": None,
    "jsn_medial": None,
    "ost_femur_lateral": "FL",
    "ost_femur_medial": "FM",
    "ost_tibia_lateral": "TL",
    "ost_tibia_medial": "TM",
}


@dataclasses.dataclass(frozen=True)
class KeypointSchema:
    """Names of the points and the compartments they belong to.

    Attributes:
      name: schema identifier stored in dataset metadata and configs.
      point_names: one name per keypoint, ``N`` in all.
      compartments: compartment -> ordered point indices, each a polyline that
        runs lateral -> medial. A point may belong to two compartments (the
        intercondylar notch and the tibial spines sit between lateral and medial).
      bones: bone -> ordered point indices of its whole contour.
    """

    name: str
    point_names: tuple[str, ...]
    compartments: Mapping[str, tuple[int, ...]]
    bones: Mapping[str, tuple[int, ...]]

    @property
    def num_points(self) -> int:
        return len(self.point_names)

    def indices_for_task(self, task: str) -> tuple[int, ...]:
        """Point indices whose pooled features feed ``task``'s head."""
        compartment = TASK_COMPARTMENT[task]
        if compartment is None:
            return tuple(range(self.num_points))
        return tuple(self.compartments[compartment])

    def __post_init__(self):
        for key, idx in {**self.compartments, **self.bones}.items():
            if any(i < 0 or i >= self.num_points for i in idx):
                raise ValueError(f"schema {self.name}: {key} has indices outside 0..{self.num_points - 1}")
        missing = set(COMPARTMENTS) - set(self.compartments)
        if missing:
            raise ValueError(f"schema {self.name}: compartments {sorted(missing)} missing")


KNEEL16 = KeypointSchema(
    name="kneel16",
    point_names=tuple(f"femur_{i}" for i in range(7)) + tuple(f"tibia_{i}" for i in range(9)),
    compartments={
        "FL": (0, 1, 2, 3),
        "FM": (3, 4, 5, 6),
        "TL": (7, 8, 9, 10, 11),
        "TM": (11, 12, 13, 14, 15),
    },
    bones={"femur": tuple(range(0, 7)), "tibia": tuple(range(7, 16))},
)

SCHEMAS: dict[str, KeypointSchema] = {KNEEL16.name: KNEEL16}


def get_schema(name: str) -> KeypointSchema:
    """Looks a schema up by name; ``kneel16_dense{k}`` builds a densified one."""
    if name in SCHEMAS:
        return SCHEMAS[name]
    base, sep, k = name.rpartition("_dense")
    if sep and base in SCHEMAS and k.isdigit() and int(k) >= 2:
        return densified_schema(SCHEMAS[base], int(k))
    raise ValueError(f"unknown keypoint schema {name!r}; known: {sorted(SCHEMAS)} "
                     "(or NAME_dense<k> for a densified one)")


def densified_schema(schema: KeypointSchema, k: int) -> KeypointSchema:
    """Schema of ``densify(..., schema, k)``: compartments FL, FM, TL, TM of ``k`` points each."""
    names, compartments = [], {}
    for c, compartment in enumerate(COMPARTMENTS):
        compartments[compartment] = tuple(range(c * k, (c + 1) * k))
        names += [f"{compartment}_{i}" for i in range(k)]
    return KeypointSchema(
        name=f"{schema.name}_dense{k}",
        point_names=tuple(names),
        compartments=compartments,
        bones={"femur": tuple(range(0, 2 * k)), "tibia": tuple(range(2 * k, 4 * k))},
    )


def _resample_polyline(points: jax.Array, k: int) -> jax.Array:
    """``points [M, 2]`` -> ``[k, 2]`` evenly spaced by arc length, ends kept."""
    squared = jnp.sum((points[1:] - points[:-1]) ** 2, axis=-1)
    # Double where: a zero-length segment (two coinciding points) must not give NaN gradients.
    positive = squared > 0
    segment = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)
    cumulative = jnp.concatenate([jnp.zeros((1,), points.dtype), jnp.cumsum(segment)])
    targets = jnp.linspace(0.0, 1.0, k, dtype=points.dtype) * cumulative[-1]
    # Segment index of every target; clip so the last target lands on the last segment.
    seg = jnp.clip(jnp.searchsorted(cumulative, targets, side="right") - 1, 0, points.shape[0] - 2)
    length = jnp.maximum(segment[seg], jnp.finfo(points.dtype).tiny)
    frac = jnp.clip((targets - cumulative[seg]) / length, 0.0, 1.0)[:, None]
    return points[seg] * (1 - frac) + points[seg + 1] * frac


def densify(keypoints, schema: KeypointSchema = KNEEL16, k: int = 8) -> jax.Array:
    """Resamples each compartment's polyline to ``k`` points evenly spaced by arc length.

    Args:
      keypoints: ``[..., N, 2]`` in ``schema``'s order.
      schema: the schema of ``keypoints``.
      k: points per compartment (>= 2; the polyline's end points are kept).

    Returns:
      ``[..., 4 * k, 2]`` in the order of :func:`densified_schema` (FL, FM, TL, TM).
    """
    if k < 2:
        raise ValueError(f"densify: k must be >= 2, got {k}")
    keypoints = jnp.asarray(keypoints)
    if keypoints.shape[-2:] != (schema.num_points, 2):
        raise ValueError(f"densify: expected keypoints [..., {schema.num_points}, 2] for schema "
                         f"{schema.name}, got {keypoints.shape}")
    if not jnp.issubdtype(keypoints.dtype, jnp.floating):
        keypoints = keypoints.astype(jnp.float32)
    batch_shape = keypoints.shape[:-2]
    flat = keypoints.reshape((-1,) + keypoints.shape[-2:])
    parts = []
    for compartment in COMPARTMENTS:
        idx = jnp.asarray(schema.compartments[compartment])
        parts.append(jax.vmap(lambda p: _resample_polyline(p[idx], k))(flat))
    return jnp.concatenate(parts, axis=-2).reshape(batch_shape + (4 * k, 2))


def _bilinear_gather_one(feature_map: jax.Array, keypoints: jax.Array, stride: float) -> jax.Array:
    """One image: ``feature_map [H, W, C]``, ``keypoints [N, 2]`` -> ``[N, C]``."""
    height, width, _ = feature_map.shape
    # Input pixel centre x maps to feature coordinate (x + 0.5) / s - 0.5: the
    # convention of grid_sample(align_corners=False).
    u = (keypoints[:, 0] + 0.5) / stride - 0.5
    v = (keypoints[:, 1] + 0.5) / stride - 0.5
    u0 = jnp.floor(u)
    v0 = jnp.floor(v)
    du = (u - u0)[:, None]
    dv = (v - v0)[:, None]
    u0 = u0.astype(jnp.int32)
    v0 = v0.astype(jnp.int32)
    flat = feature_map.reshape(height * width, -1)

    def corner(vi, ui, weight):
        inside = (ui >= 0) & (ui < width) & (vi >= 0) & (vi < height)
        index = jnp.clip(vi, 0, height - 1) * width + jnp.clip(ui, 0, width - 1)
        values = jnp.take(flat, index, axis=0)
        return values * (weight * inside[:, None]).astype(values.dtype)

    return (corner(v0, u0, (1 - du) * (1 - dv)) + corner(v0, u0 + 1, du * (1 - dv))
            + corner(v0 + 1, u0, (1 - du) * dv) + corner(v0 + 1, u0 + 1, du * dv))


def bilinear_gather(feature_map: jax.Array, keypoints: jax.Array, stride: float) -> jax.Array:
    """Bilinear interpolation of a feature map at keypoints, batched with ``jax.vmap``.

    Args:
      feature_map: ``[B, H, W, C]``, the stride-``stride`` map of an input image.
      keypoints: ``[B, N, 2]`` ``(x, y)`` in input-image pixels.
      stride: input pixels per feature cell (16 for ResNet ``layer3``).

    Returns:
      ``[B, N, C]``; samples outside the map read zeros, like torch
      ``grid_sample(align_corners=False, padding_mode='zeros')``.
    """
    if feature_map.ndim != 4 or keypoints.ndim != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"bilinear_gather: expected feature_map [B,H,W,C] and keypoints [B,N,2], "
                         f"got {feature_map.shape} and {keypoints.shape}")
    if feature_map.shape[0] != keypoints.shape[0]:
        raise ValueError(f"bilinear_gather: batch sizes differ: {feature_map.shape[0]} vs "
                         f"{keypoints.shape[0]}")
    keypoints = keypoints.astype(jnp.promote_types(feature_map.dtype, jnp.float32))
    return jax.vmap(_bilinear_gather_one, in_axes=(0, 0, None))(feature_map, keypoints, stride)


def flip_horizontal(keypoints: np.ndarray, width: int) -> np.ndarray:
    """Mirrors ``(x, y)`` keypoints ``[..., N, 2]`` in an image ``width`` pixels wide.

    Point order is anatomical (lateral -> medial) and does not change.
    """
    flipped = np.array(keypoints, dtype=np.float32, copy=True)
    flipped[..., 0] = (width - 1) - flipped[..., 0]
    return flipped


# How far (pixels) a keypoint of a file may lie outside its image: a point on the image's
# edge may round just past it; anything further is not a point of that image.
OUTSIDE_TOLERANCE_PX = 2.0


def validate_keypoints(keypoints, schema: KeypointSchema = KNEEL16, name: str = "keypoints",
                       image_shape: Sequence[int] | None = None,
                       tolerance_px: float = OUTSIDE_TOLERANCE_PX) -> np.ndarray:
    """Checks shape ``[..., N, 2]``, finiteness and, given ``image_shape``, that every point
    lies inside the image (within ``tolerance_px``); returns float32.

    Raises:
      ValueError: naming ``name`` when the shape is wrong, a value is NaN/inf or a point
        lies outside the image.
    """
    arr = np.asarray(keypoints, dtype=np.float32)
    if arr.ndim < 2 or arr.shape[-2:] != (schema.num_points, 2):
        raise ValueError(f"{name}: expected [{schema.num_points}, 2] points for schema "
                         f"{schema.name}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name}: keypoint {tuple(int(i) for i in bad[:-1])} is not finite "
                         f"(NaN or inf)")
    if image_shape is not None:
        height, width = image_shape[:2]
        outside = ((arr[..., 0] < -tolerance_px) | (arr[..., 0] > width - 1 + tolerance_px)
                   | (arr[..., 1] < -tolerance_px) | (arr[..., 1] > height - 1 + tolerance_px))
        if np.any(outside):
            index = tuple(int(i) for i in np.argwhere(outside)[0])
            x, y = arr[index]
            raise ValueError(f"{name}: keypoint {index[-1]} at ({x:.1f}, {y:.1f}) lies outside "
                             f"the {width}x{height} image; are the keypoints in pixels of "
                             "this image?")
    return arr
