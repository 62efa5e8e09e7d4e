"""On-device random affine augmentation of images and keypoints together.

Runs inside the jitted train step, so it costs no host CPU. The paper augments
the 320x320 ROIs with a random translation of [-10, 10] pixels, a rotation of
[-5, 5] degrees and a scale of [0.95, 1.05]; the translation is a pixel count
chosen by the caller (``10 * image_size / 320`` keeps the paper's proportion at
another resolution).

Conventions (the same as :mod:`kpn_jax.keypoints`): coordinates are ``(x, y)``
pixels with pixel centres at integer coordinates (column ``j`` is at ``x = j``,
row ``i`` at ``y = i``). An affine matrix ``[3, 3]`` (homogeneous, last row
``0 0 1``) maps an INPUT pixel coordinate to the OUTPUT pixel coordinate where
that piece of anatomy lands, so keypoints are transformed with the matrix and
images are resampled with its inverse. Rotation and scale act about the image
centre ``((W - 1) / 2, (H - 1) / 2)``; with y pointing down, a positive angle
turns the image clockwise on screen.

Resampling is bilinear and matches ``scipy.ndimage.map_coordinates(order=1,
mode='constant')``: an output pixel whose inverse-mapped position falls outside
the input's pixel-centre rectangle ``[0, W-1] x [0, H-1]`` reads ``fill_value``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# Coordinates are small float32 products: at default precision TPUs (and GPUs with TF32)
# round their inputs to bfloat16, which moves a keypoint by up to ~1.5 px against the
# warped image. Full float32 costs nothing at these sizes.
HIGHEST = jax.lax.Precision.HIGHEST


def _check_ranges(max_translation_px, max_rotation_deg, scale_range) -> tuple[float, float, float, float]:
    """Validates the (static, Python-number) ranges; returns them as floats."""
    try:
        translation = float(max_translation_px)
        rotation = float(max_rotation_deg)
        low, high = (float(s) for s in scale_range)
    except (TypeError, ValueError) as error:
        raise ValueError(
            "augment: max_translation_px, max_rotation_deg must be numbers and scale_range a "
            f"(low, high) pair of numbers; got {max_translation_px!r}, {max_rotation_deg!r}, "
            f"{scale_range!r}") from error
    if not (math.isfinite(translation) and translation >= 0):
        raise ValueError(f"augment: max_translation_px must be finite and >= 0, got {translation}")
    if not (math.isfinite(rotation) and 0 <= rotation < 180):
        raise ValueError(f"augment: max_rotation_deg must be in [0, 180), got {rotation}")
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ValueError(f"augment: scale_range must be (low, high) with 0 < low <= high, "
                         f"got {scale_range!r}")
    return translation, rotation, low, high


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in image_size)
    except (TypeError, ValueError) as error:
        raise ValueError(f"augment: image_size must be (height, width), got {image_size!r}") from error
    if height < 1 or width < 1:
        raise ValueError(f"augment: image_size must be positive, got {image_size!r}")
    return height, width


def affine_matrices(translation: jax.Array, angle_rad: jax.Array, scale: jax.Array,
                    image_size: Sequence[int], flip: jax.Array | None = None) -> jax.Array:
    """Builds input->output pixel matrices from explicit parameters.

    ``out = S R (F(in) - c) + c + t`` with ``c`` the image centre and ``F`` an
    optional horizontal mirror ``x -> (W - 1) - x``.

    Args:
      translation: ``[B, 2]`` ``(tx, ty)`` in pixels.
      angle_rad: ``[B]`` rotation in radians.
      scale: ``[B]`` isotropic scale factor.
      image_size: ``(height, width)`` of the images the matrices apply to.
      flip: optional bool ``[B]``; True mirrors that example left-right first.

    Returns:
      float32 ``[B, 3, 3]``.
    """
    height, width = _check_image_size(image_size)
    translation = jnp.asarray(translation, jnp.float32)
    angle_rad = jnp.asarray(angle_rad, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    centre = jnp.array([(width - 1) / 2, (height - 1) / 2], jnp.float32)
    cos, sin = jnp.cos(angle_rad), jnp.sin(angle_rad)
    linear = scale[:, None, None] * jnp.stack(
        [jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)  # [B, 2, 2]
    if flip is not None:
        # Mirroring multiplies the x column by -1 and moves x = 0 to x = W - 1;
        # folding it into the linear part and the offset keeps one matrix per example.
        sign_x = jnp.where(jnp.asarray(flip), -1.0, 1.0).astype(jnp.float32)
        flip_offset = jnp.where(jnp.asarray(flip), float(width - 1), 0.0).astype(jnp.float32)
        offset_in = jnp.stack([flip_offset, jnp.zeros_like(flip_offset)], -1) - centre  # F(0) - c
        linear_in = linear * jnp.stack([sign_x, jnp.ones_like(sign_x)], -1)[:, None, :]
    else:
        offset_in = jnp.broadcast_to(-centre, translation.shape)
        linear_in = linear
    offset = jnp.einsum("bij,bj->bi", linear, offset_in, precision=HIGHEST) + centre + translation
    top = jnp.concatenate([linear_in, offset[:, :, None]], axis=-1)  # [B, 2, 3]
    bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0], jnp.float32), (top.shape[0], 1, 3))
    return jnp.concatenate([top, bottom], axis=1)


def random_affine_params(rng: jax.Array, batch_size: int, max_translation_px: float,
                         max_rotation_deg: float, scale_range: Sequence[float], *,
                         image_size: Sequence[int], hflip: bool = False) -> jax.Array:
    """Draws one random input->output pixel matrix per example.

    Translation ``tx, ty ~ U[-max_translation_px, max_translation_px]``
    independently, angle ``~ U[-max_rotation_deg, max_rotation_deg]`` degrees,
    scale ``~ U[scale_range]``, and with ``hflip`` a left-right mirror with
    probability 1/2. Zero ranges and ``scale_range=(1, 1)`` give the identity
    exactly.

    Args:
      rng: a PRNG key.
      batch_size: ``B``.
      max_translation_px, max_rotation_deg, scale_range: static Python numbers.
      image_size: ``(height, width)`` of the images: the centre of rotation.
      hflip: also mirror half of the examples. Off by default: the pipeline
        already puts every knee in right-knee orientation, and a mirror breaks
        the "lateral = image left" convention (keypoint order stays anatomical).

    Returns:
      float32 ``[B, 3, 3]``.
    """
    translation, rotation, low, high = _check_ranges(max_translation_px, max_rotation_deg, scale_range)
    if int(batch_size) < 1:
        raise ValueError(f"augment: batch_size must be >= 1, got {batch_size}")
    key_t, key_r, key_s, key_f = jax.random.split(rng, 4)
    shift = jax.random.uniform(key_t, (batch_size, 2), jnp.float32, -translation, translation)
    angle = jax.random.uniform(key_r, (batch_size,), jnp.float32, -rotation, rotation)
    scale = jax.random.uniform(key_s, (batch_size,), jnp.float32, low, high)
    flip = jax.random.bernoulli(key_f, 0.5, (batch_size,)) if hflip else None
    return affine_matrices(shift, jnp.deg2rad(angle), scale, image_size, flip)


def _check_matrices(matrices: jax.Array, batch_size: int, name: str) -> jax.Array:
    matrices = jnp.asarray(matrices)
    if matrices.ndim != 3 or matrices.shape[1:] not in ((2, 3), (3, 3)):
        raise ValueError(f"{name}: matrices must be [B, 2, 3] or [B, 3, 3], got {matrices.shape}")
    if matrices.shape[0] != batch_size:
        raise ValueError(f"{name}: matrices batch {matrices.shape[0]} != batch {batch_size}")
    return matrices[:, :2, :].astype(jnp.float32)


def _invert_affine(matrix: jax.Array) -> jax.Array:
    """``[2, 3]`` input->output -> ``[2, 3]`` output->input.

    Closed form rather than ``jnp.linalg.inv`` so the identity inverts to the
    identity bit for bit (and bilinear sampling then returns the input exactly).
    """
    a, b, tx = matrix[0, 0], matrix[0, 1], matrix[0, 2]
    c, d, ty = matrix[1, 0], matrix[1, 1], matrix[1, 2]
    det = a * d - b * c
    inverse_linear = jnp.stack([jnp.stack([d, -b]), jnp.stack([-c, a])]) / det
    inverse_offset = -jnp.matmul(inverse_linear, jnp.stack([tx, ty]), precision=HIGHEST)
    return jnp.concatenate([inverse_linear, inverse_offset[:, None]], axis=1)


def _warp_one(image: jax.Array, matrix: jax.Array, fill_value: float) -> jax.Array:
    """One image ``[H, W, C]`` and its ``[2, 3]`` matrix -> ``[H, W, C]``."""
    height, width, channels = image.shape
    inverse = _invert_affine(matrix)
    # Coordinates stay float32 even for bfloat16 images: bf16 has 8 mantissa
    # bits, too few to address a pixel of a 320-wide image.
    y_out, x_out = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                                jnp.arange(width, dtype=jnp.float32), indexing="ij")
    x_in = inverse[0, 0] * x_out + inverse[0, 1] * y_out + inverse[0, 2]
    y_in = inverse[1, 0] * x_out + inverse[1, 1] * y_out + inverse[1, 2]
    inside = (x_in >= 0) & (x_in <= width - 1) & (y_in >= 0) & (y_in <= height - 1)
    x0f, y0f = jnp.floor(x_in), jnp.floor(y_in)
    dx, dy = (x_in - x0f)[..., None], (y_in - y0f)[..., None]
    # Clipping keeps every gather in bounds; a clipped corner either carries
    # zero weight (x_in == W - 1 exactly) or belongs to an outside pixel.
    x0 = jnp.clip(x0f.astype(jnp.int32), 0, width - 1)
    y0 = jnp.clip(y0f.astype(jnp.int32), 0, height - 1)
    x1 = jnp.minimum(x0 + 1, width - 1)
    y1 = jnp.minimum(y0 + 1, height - 1)
    flat = image.reshape(height * width, channels).astype(jnp.float32)

    def corner(yi, xi):
        return jnp.take(flat, (yi * width + xi).reshape(-1), axis=0).reshape(height, width, channels)

    value = ((1 - dx) * (1 - dy) * corner(y0, x0) + dx * (1 - dy) * corner(y0, x1)
             + (1 - dx) * dy * corner(y1, x0) + dx * dy * corner(y1, x1))
    value = jnp.where(inside[..., None], value, jnp.float32(fill_value))
    return value.astype(image.dtype)


def warp_images(images: jax.Array, matrices: jax.Array, fill_value: float = 0.0) -> jax.Array:
    """Resamples each image under its input->output affine matrix.

    For every output pixel, maps its centre back into the input with the
    inverse matrix and interpolates bilinearly; positions outside the input's
    pixel-centre rectangle read ``fill_value``.

    Args:
      images: floating ``[B, H, W, C]`` (float32 or bfloat16; convert uint8 first).
      matrices: ``[B, 3, 3]`` or ``[B, 2, 3]`` from :func:`random_affine_params`.
      fill_value: value of pixels that come from outside the input.

    Returns:
      ``[B, H, W, C]`` in the dtype of ``images`` (interpolated in float32).
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"warp_images: images must be [B, H, W, C], got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"warp_images: images must be floating point, got {images.dtype}")
    matrices = _check_matrices(matrices, images.shape[0], "warp_images")
    return jax.vmap(_warp_one, in_axes=(0, 0, None))(images, matrices, fill_value)


def warp_keypoints(keypoints: jax.Array, matrices: jax.Array) -> jax.Array:
    """Applies each example's input->output matrix to its ``(x, y)`` keypoints.

    Args:
      keypoints: ``[B, N, 2]`` pixels in the input image.
      matrices: ``[B, 3, 3]`` or ``[B, 2, 3]``.

    Returns:
      ``[B, N, 2]`` pixels in the warped image, in the dtype of ``keypoints``
      (computed in float32).
    """
    keypoints = jnp.asarray(keypoints)
    if keypoints.ndim != 3 or keypoints.shape[-1] != 2:
        raise ValueError(f"warp_keypoints: keypoints must be [B, N, 2], got {keypoints.shape}")
    matrices = _check_matrices(matrices, keypoints.shape[0], "warp_keypoints")
    points = keypoints.astype(jnp.float32)
    moved = (jnp.einsum("bij,bnj->bni", matrices[:, :, :2], points, precision=HIGHEST)
             + matrices[:, None, :, 2])
    return moved.astype(keypoints.dtype)


def augment(rng: jax.Array, images: jax.Array, keypoints: jax.Array, *, max_translation_px: float,
            max_rotation_deg: float, scale_range: Sequence[float], hflip: bool = False,
            fill_value: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Random affine of a batch; keypoints move with the anatomy.

    Args:
      rng: a PRNG key.
      images: floating ``[B, H, W, C]``.
      keypoints: ``[B, N, 2]`` ``(x, y)`` pixels of ``images``.
      max_translation_px, max_rotation_deg, scale_range, hflip: see
        :func:`random_affine_params` (static Python numbers).
      fill_value: value of pixels that come from outside the input.

    Returns:
      ``(images [B, H, W, C], keypoints [B, N, 2])``. With zero ranges,
      ``scale_range=(1, 1)`` and no flip, the inputs are returned unchanged.
    """
    translation, rotation, low, high = _check_ranges(max_translation_px, max_rotation_deg, scale_range)
    images = jnp.asarray(images)
    keypoints = jnp.asarray(keypoints)
    if images.ndim != 4 or keypoints.ndim != 3 or images.shape[0] != keypoints.shape[0]:
        raise ValueError(f"augment: expected images [B, H, W, C] and keypoints [B, N, 2] with the "
                         f"same B, got {images.shape} and {keypoints.shape}")
    if translation == 0 and rotation == 0 and low == high == 1 and not hflip:
        # Nothing to do: skip the resampling entirely (a static decision under jit).
        return images, keypoints
    matrices = random_affine_params(rng, images.shape[0], translation, rotation, (low, high),
                                    image_size=images.shape[1:3], hflip=hflip)
    return warp_images(images, matrices, fill_value), warp_keypoints(keypoints, matrices)


def check_intensity_ranges(contrast: float, brightness: float, gamma: float) -> None:
    """Raises ValueError naming the grey-level range that is negative or too wide."""
    for name, value, high in (("contrast", contrast, 1.0), ("brightness", brightness, 1.0),
                              ("gamma", gamma, math.inf)):
        if not (0 <= float(value) < high):
            raise ValueError(f"augment.{name} must be in [0, {high:g}), got {value!r}")


def random_intensity_params(rng: jax.Array, batch_size: int, *, contrast: float,
                            brightness: float, gamma: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draws per-example grey-level changes: ``(gamma_exponent, contrast_factor, offset)``,
    each float32 ``[B]``: ``exp(U[-gamma, gamma])``, ``U[1 - contrast, 1 + contrast]`` and
    ``U[-brightness, brightness]`` (zero ranges give 1, 1 and 0 exactly)."""
    check_intensity_ranges(contrast, brightness, gamma)
    key_g, key_c, key_b = jax.random.split(rng, 3)
    shape = (int(batch_size),)
    exponent = jnp.exp(jax.random.uniform(key_g, shape, jnp.float32, -gamma, gamma))
    factor = jax.random.uniform(key_c, shape, jnp.float32, 1.0 - contrast, 1.0 + contrast)
    offset = jax.random.uniform(key_b, shape, jnp.float32, -brightness, brightness)
    return exponent, factor, offset


def adjust_intensity(images: jax.Array, exponent: jax.Array, factor: jax.Array,
                     offset: jax.Array) -> jax.Array:
    """Grey levels in [0, 1] ``[B, H, W, C]`` -> ``clip((x ** exponent - m) * factor + m + offset,
    0, 1)`` per example, ``m`` the mean of ``x ** exponent`` over the image: a gamma curve,
    then a contrast change about the image's mean, then a brightness shift (exposure and
    processing differ between radiographs)."""
    per_example = (-1, 1, 1, 1)
    curved = jnp.power(jnp.clip(images, 0.0, 1.0), exponent.reshape(per_example))
    mean = jnp.mean(curved, axis=(1, 2, 3), keepdims=True)
    adjusted = (curved - mean) * factor.reshape(per_example) + mean + offset.reshape(per_example)
    return jnp.clip(adjusted, 0.0, 1.0)


def augment_intensity(rng: jax.Array, images: jax.Array, *, contrast: float = 0.0,
                      brightness: float = 0.0, gamma: float = 0.0) -> jax.Array:
    """Random grey-level changes of a batch ``[B, H, W, C]`` in [0, 1] (see
    :func:`adjust_intensity`); with all ranges 0 the images are returned unchanged (other
    ranges are checked where they are drawn)."""
    if contrast == brightness == gamma == 0:
        return images  # a static decision under jit: nothing is computed
    params = random_intensity_params(rng, images.shape[0], contrast=contrast,
                                     brightness=brightness, gamma=gamma)
    return adjust_intensity(images, *params)


def mixup_params(rng: jax.Array, batch_size: int, alpha: float) -> tuple[jax.Array, jax.Array]:
    """Mixup's draw (Zhang et al. 2018): one weight ``lam ~ Beta(alpha, alpha)`` for the batch
    (float32 scalar) and a permutation ``[B]`` pairing each example with a partner."""
    if not (math.isfinite(float(alpha)) and float(alpha) > 0):
        raise ValueError(f"mixup: alpha must be a positive number, got {alpha!r}")
    key_lam, key_perm = jax.random.split(rng)
    lam = jax.random.beta(key_lam, float(alpha), float(alpha)).astype(jnp.float32)
    return lam, jax.random.permutation(key_perm, int(batch_size))


def mix_images(images: jax.Array, lam: jax.Array, permutation: jax.Array) -> jax.Array:
    """``lam * x + (1 - lam) * x[permutation]`` for images ``[B, H, W, C]``."""
    return lam * images + (1.0 - lam) * images[permutation]
