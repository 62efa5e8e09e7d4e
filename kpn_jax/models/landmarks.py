"""A landmark detector for the ``kneel16`` keypoints: heatmaps decoded by soft-argmax.

Design: a ResNet trunk (torchvision layout, the first ``stages`` stages of
:class:`~kpn_jax.models.resnet.ResNet`, same parameter names) feeds a small top-down
(FPN-like) head that brings the stride-16 and stride-8 features up to stride 4 and
outputs one heatmap per point. A spatial softmax turns each heatmap into a probability
map whose mean (the soft-argmax, "integral regression", Sun et al. 2018) is the
predicted point, so the coordinates are sub-pixel and differentiable, and the loss can
be put on the coordinates themselves (what the metric measures), not on a heatmap
proxy. A Gaussian-target term on the probability maps (DSNT, Nibali et al. 2018)
keeps each map unimodal and speeds up early training.

Why not plain coordinate regression from a pooled feature: it throws away the spatial
layout the convolutions keep and learns slowly from few images. Why not an argmax of a
heatmap: not differentiable and quantised to the heatmap's cells (4 px here).

Coordinates: ``(x, y)`` input pixels, pixel centres at integer coordinates (as in
:mod:`kpn_jax.keypoints`); heatmap cell ``(i, j)`` of a stride-``s`` map is centred on
input pixel ``((j + 0.5) s - 0.5, (i + 0.5) s - 0.5)``, the inverse of the convention
of :func:`kpn_jax.keypoints.bilinear_gather`.

Parameter tree: ``trunk/{conv1, bn1, layer{k}_{i}/...}`` exactly as ``ResNet``'s (so a
converted torchvision backbone loads into it, minus the unused stages),
``head/lateral{k}`` (1x1 convolutions), ``head/smooth{i}``, ``head/smooth_bn{i}``,
``head/heatmaps`` (1x1 convolution to ``num_points`` channels).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kpn_jax.models.kpn import INPUT_MODES, normalize_images
from kpn_jax.models.layers import kaiming_normal_fan_out
from kpn_jax.models.resnet import BN_EPSILON, FEATURE_STRIDES, ModuleDef, ResNet

Dtype = Any

HEATMAP_STRIDE = 4          # layer1's stride: the head's output resolution
COORD_LOSSES: tuple[str, ...] = ("l1", "radial")
DEFAULT_THRESHOLDS_PX: tuple[float, ...] = (2.0, 3.0, 5.0)


# ----------------------------------------------------------------------------- decoding


def cell_centers(num_cells: int, stride: int) -> jax.Array:
    """Input-pixel coordinate of the centre of each of ``num_cells`` stride-``stride`` cells."""
    return (jnp.arange(num_cells, dtype=jnp.float32) + 0.5) * stride - 0.5


def soft_argmax(logits: jax.Array, stride: int) -> tuple[jax.Array, jax.Array]:
    """Expected position under a spatial softmax of each heatmap.

    Args:
      logits: ``[B, h, w, N]`` heatmap logits of a stride-``stride`` map.
      stride: input pixels per heatmap cell.

    Returns:
      ``(keypoints [B, N, 2] float32 (x, y) input pixels, probabilities [B, h, w, N] float32)``;
      each probability map sums to one over ``(h, w)``.
    """
    if logits.ndim != 4:
        raise ValueError(f"soft_argmax: logits must be [B, h, w, N], got shape {logits.shape}")
    batch, height, width, points = logits.shape
    flat = logits.astype(jnp.float32).reshape(batch, height * width, points)
    probabilities = jax.nn.softmax(flat, axis=1).reshape(batch, height, width, points)
    xs = cell_centers(width, stride)
    ys = cell_centers(height, stride)
    # Marginals first: two small contractions instead of a full [h, w] grid product.
    # Coordinates in full float32 (default precision rounds to bfloat16 on TPU: ~1 px).
    x = jnp.einsum("bhwn,w->bn", probabilities, xs, precision=jax.lax.Precision.HIGHEST)
    y = jnp.einsum("bhwn,h->bn", probabilities, ys, precision=jax.lax.Precision.HIGHEST)
    return jnp.stack([x, y], axis=-1), probabilities


def gaussian_targets(keypoints: jax.Array, height: int, width: int, stride: int,
                     sigma_cells: float) -> jax.Array:
    """Normalised Gaussian target distributions on a stride-``stride`` grid.

    Args:
      keypoints: ``[B, N, 2]`` input pixels.
      height, width: heatmap size in cells.
      stride: input pixels per cell.
      sigma_cells: standard deviation in cells.

    Returns:
      ``[B, height, width, N]``, each map summing to one over ``(h, w)``.
    """
    xs = cell_centers(width, stride)
    ys = cell_centers(height, stride)
    sigma = sigma_cells * stride
    kp = keypoints.astype(jnp.float32)
    # Separable: log N(x) + log N(y), normalised as a whole by logsumexp.
    log_x = -0.5 * ((xs[None, :, None] - kp[:, None, :, 0]) / sigma) ** 2   # [B, w, N]
    log_y = -0.5 * ((ys[None, :, None] - kp[:, None, :, 1]) / sigma) ** 2   # [B, h, N]
    log_joint = log_y[:, :, None, :] + log_x[:, None, :, :]                  # [B, h, w, N]
    log_norm = jax.nn.logsumexp(log_joint, axis=(1, 2), keepdims=True)
    return jnp.exp(log_joint - log_norm)


# ----------------------------------------------------------------------------- model


class HeatmapHead(nn.Module):
    """Top-down head: stride-16/8/4 features -> ``num_points`` stride-4 heatmap logits."""

    num_points: int
    channels: int = 64
    num_smooth: int = 2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv

    @nn.compact
    def __call__(self, features: list[jax.Array], train: bool) -> jax.Array:
        """``features``: finest first (stride 4, 8, ...) -> logits ``[B, h4, w4, N]`` float32."""
        dt, pdt = self.dtype, self.param_dtype
        x = None
        for k in reversed(range(len(features))):
            lateral = self.conv(self.channels, (1, 1), dtype=dt, param_dtype=pdt,
                              kernel_init=kaiming_normal_fan_out, name=f"lateral{k}")(features[k])
            if x is not None:
                # Bilinear, half-pixel centres: the same geometry as the strides' cell centres.
                x = jax.image.resize(x, x.shape[:1] + lateral.shape[1:3] + x.shape[3:], "linear")
                lateral = lateral + x.astype(lateral.dtype)
            x = lateral
        for i in range(self.num_smooth):
            x = self.conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dt,
                        param_dtype=pdt, kernel_init=kaiming_normal_fan_out, name=f"smooth{i}")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=BN_EPSILON, dtype=dt,
                                     param_dtype=pdt, name=f"smooth_bn{i}")(x))
        # Zero init: every map starts uniform (soft-argmax at the image centre), so early
        # gradients are not dominated by a random initial peak.
        logits = self.conv(self.num_points, (1, 1), dtype=jnp.float32, param_dtype=pdt,
                         kernel_init=nn.initializers.zeros, name="heatmaps")(x.astype(jnp.float32))
        return logits


class LandmarkNet(nn.Module):
    """ResNet trunk + top-down heatmap head + soft-argmax.

    Attributes:
      num_points: keypoints of the schema (16 for ``kneel16``).
      depth, width, dtype, param_dtype, conv, max_pool: the trunk's (see ``ResNet``).
      stages: trunk stages used (3: up to ``layer3``, stride 16); must be >= 2.
      head_channels: channels of the top-down head.
      input_mode: ``'single'`` (1-channel stem) or ``'repeat'`` (3-channel, ImageNet-normalised).
    """

    num_points: int = 16
    depth: int = 18
    width: int = 32
    stages: int = 3
    head_channels: int = 64
    input_mode: str = "single"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    max_pool: Callable[..., jax.Array] = nn.max_pool

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Finds the keypoints.

        Args:
          images: float ``[B, H, W, 1]`` in [0, 1], right-knee orientation.
          train: batch-statistics BatchNorm (``mutable=['batch_stats']``).

        Returns:
          ``keypoints [B, N, 2]`` (x, y) input pixels, ``heatmaps [B, H/4, W/4, N]``
          logits and ``probabilities`` (their spatial softmax), all float32.
        """
        if not 2 <= self.stages <= 4:
            raise ValueError(f"stages: the head needs 2 to 4 trunk stages, got {self.stages}")
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode: expected one of {INPUT_MODES}, got {self.input_mode!r}")
        x = normalize_images(images, self.input_mode, self.dtype)
        # The trunk stops at the last stage the head reads: in training, an unused stage
        # would still run for its BatchNorm statistics.
        maps = ResNet(self.depth, None, self.dtype, self.param_dtype, self.width,
                      last_stage=f"layer{self.stages}", conv=self.conv, max_pool=self.max_pool,
                      name="trunk")(x, train)
        used = [maps[f"layer{k}"] for k in range(1, self.stages + 1)]
        logits = HeatmapHead(self.num_points, self.head_channels, dtype=self.dtype,
                             param_dtype=self.param_dtype, conv=self.conv, name="head")(used, train)
        keypoints, probabilities = soft_argmax(logits, FEATURE_STRIDES["layer1"])
        return {"keypoints": keypoints, "heatmaps": logits, "probabilities": probabilities}


# ----------------------------------------------------------------------------- loss


def landmark_loss(outputs: dict, keypoints: jax.Array, valid: jax.Array, *,
                  coord_loss: str = "l1", heatmap_weight: float = 1.0,
                  sigma_cells: float = 1.0) -> tuple[jax.Array, dict]:
    """Coordinate loss on the soft-argmax plus a Gaussian-target term on the maps.

    Args:
      outputs: :class:`LandmarkNet` outputs.
      keypoints: ``[B, N, 2]`` true points, input pixels.
      valid: bool ``[B, N]``: points that count (others add nothing).
      coord_loss: ``'l1'`` (|dx| + |dy|, robust to label noise) or ``'radial'``
        (Euclidean distance, the metric itself).
      heatmap_weight: weight of ``KL(gaussian target || predicted map)``.
      sigma_cells: the target Gaussian's standard deviation in heatmap cells.

    Both terms are in heatmap-cell units, so their sizes do not depend on the image size.

    Returns:
      ``(loss scalar, {'loss', 'coord', 'heatmap', 'radial_error_px'})``.
    """
    if coord_loss not in COORD_LOSSES:
        raise ValueError(f"coord_loss: expected one of {COORD_LOSSES}, got {coord_loss!r}")
    stride = HEATMAP_STRIDE
    predicted = outputs["keypoints"]
    true = keypoints.astype(jnp.float32)
    weight = valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    delta = (predicted - true) / stride
    radial = _safe_norm(predicted - true)
    if coord_loss == "l1":
        per_point = jnp.sum(jnp.abs(delta), axis=-1)
    else:
        per_point = radial / stride
    coord = jnp.sum(per_point * weight) / count

    probabilities = outputs["probabilities"]
    _, height, width, _ = probabilities.shape
    target = gaussian_targets(true, height, width, stride, sigma_cells)
    log_p = jnp.log(jnp.maximum(probabilities, 1e-12))
    log_t = jnp.log(jnp.maximum(target, 1e-12))
    kl = jnp.sum(target * (log_t - log_p), axis=(1, 2))   # [B, N]
    heatmap = jnp.sum(kl * weight) / count
    loss = coord + heatmap_weight * heatmap
    aux = {"loss": loss, "coord": coord, "heatmap": heatmap,
           "radial_error_px": jnp.sum(radial * weight) / count}
    return loss, aux


def _safe_norm(delta: jax.Array) -> jax.Array:
    """``|delta|`` over the last axis with a finite gradient at zero (double where)."""
    squared = jnp.sum(delta ** 2, axis=-1)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


# ----------------------------------------------------------------------------- metrics


def radial_errors(predicted, true) -> np.ndarray:
    """Euclidean distance per point: ``[..., N, 2]`` twice -> ``[..., N]`` (numpy float64)."""
    predicted = np.asarray(predicted, np.float64)
    true = np.asarray(true, np.float64)
    if predicted.shape != true.shape or predicted.shape[-1:] != (2,):
        raise ValueError(f"radial_errors: predicted {predicted.shape} and true {true.shape} must "
                         "both be [..., N, 2]")
    return np.sqrt(np.sum((predicted - true) ** 2, axis=-1))


def summarize_errors(errors, valid=None, thresholds_px=DEFAULT_THRESHOLDS_PX,
                     point_names=None) -> dict:
    """Radial-error statistics over images and points.

    Args:
      errors: ``[M, N]`` radial errors in pixels.
      valid: bool ``[M, N]`` points to count (default all).
      thresholds_px: report the percentage of points within each of these distances.
      point_names: ``N`` names for the per-point table (default ``point_{n}``).

    Returns:
      ``{'num_images', 'num_points', 'mean', 'median', 'within_{t}px' (percent),
      'per_point': {name: {'mean', 'median', 'within_{t}px', 'count'}}}``.
    """
    errors = np.asarray(errors, np.float64)
    if errors.ndim != 2:
        raise ValueError(f"summarize_errors: errors must be [M, N], got shape {errors.shape}")
    valid = np.ones(errors.shape, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != errors.shape:
        raise ValueError(f"summarize_errors: valid {valid.shape} must match errors {errors.shape}")
    names = list(point_names) if point_names is not None else [f"point_{n}"
                                                                 for n in range(errors.shape[1])]
    if len(names) != errors.shape[1]:
        raise ValueError(f"summarize_errors: {len(names)} point_names for {errors.shape[1]} points")

    def stats(values: np.ndarray) -> dict:
        if values.size == 0:
            return {"mean": float("nan"), "median": float("nan"), "count": 0,
                    **{f"within_{t:g}px": float("nan") for t in thresholds_px}}
        return {"mean": float(values.mean()), "median": float(np.median(values)),
                "count": int(values.size),
                **{f"within_{t:g}px": float(100.0 * np.mean(values <= t)) for t in thresholds_px}}

    overall = stats(errors[valid])
    result = {"num_images": int(np.any(valid, axis=1).sum()), "num_points": overall.pop("count"),
              **overall}
    result["per_point"] = {name: stats(errors[:, n][valid[:, n]]) for n, name in enumerate(names)}
    return result
