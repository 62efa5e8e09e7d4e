"""Max pooling with a gradient that XLA:CPU computes quickly.

``nn.max_pool``'s gradient is XLA's select-and-scatter, which XLA:CPU expands into a
5-output ``reduce_window`` over full-size index arrays followed by a scatter: the
ResNet stem's 3x3 / stride-2 pool and its gradient took 7 % of a ResNet-50 train step
on CPU (benchmarks/README.md, section 8). :func:`max_pool` has the same forward and a
custom VJP that sends each window's cotangent to the window's first maximum in
row-major order (the tie rule of select-and-scatter and of torch's ``MaxPool2d``)
with one strided mask per window offset: 2.0-2.5x faster on CPU, equal gradients up
to the order of float additions where windows overlap.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp


def _reduce_window_max(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                       padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    init = jnp.array(-jnp.inf, x.dtype)
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, *window, 1), (1, *strides, 1),
                                 ((0, 0), *padding, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _masked_max_pool(x, window, strides, padding):
    return _reduce_window_max(x, window, strides, padding)


def _forward(x, window, strides, padding):
    y = _reduce_window_max(x, window, strides, padding)
    return y, (x, y)


def _backward(window, strides, padding, residuals, cotangent):
    x, y = residuals
    (pad_top, pad_bottom), (pad_left, pad_right) = padding
    height, width = x.shape[1:3]
    out_h, out_w = y.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)),
                     constant_values=-jnp.inf)
    stride_h, stride_w = strides
    span_h, span_w = stride_h * (out_h - 1) + 1, stride_w * (out_w - 1) + 1
    zero = jnp.zeros((), cotangent.dtype)
    taken = jnp.zeros(y.shape, bool)
    grad = jnp.zeros(padded.shape, cotangent.dtype)
    for di in range(window[0]):
        for dj in range(window[1]):
            # The input under offset (di, dj) of every window: a strided view of the input.
            under = padded[:, di:di + span_h:stride_h, dj:dj + span_w:stride_w, :]
            hit = (under == y) & ~taken          # the first maximum of each window wins
            taken = taken | hit
            # Back to input positions: interior padding puts the values stride apart.
            placed = [(0, 0, 0),
                      (di, padded.shape[1] - di - span_h, stride_h - 1),
                      (dj, padded.shape[2] - dj - span_w, stride_w - 1),
                      (0, 0, 0)]
            grad = grad + jax.lax.pad(jnp.where(hit, cotangent, zero), zero, placed)
    return (grad[:, pad_top:pad_top + height, pad_left:pad_left + width, :],)


_masked_max_pool.defvjp(_forward, _backward)


def max_pool(x: jax.Array, window: Sequence[int] = (3, 3), strides: Sequence[int] = (2, 2),
             padding: Sequence[Sequence[int]] = ((1, 1), (1, 1))) -> jax.Array:
    """``nn.max_pool`` over ``[B, H, W, C]`` with a mask-based gradient.

    Pads with ``-inf`` (torch's ``MaxPool2d(padding=...)``). Padding must be smaller
    than the window, so every window holds at least one input value.

    Args:
      x: float ``[B, H, W, C]``.
      window, strides: ``(h, w)``.
      padding: ``((top, bottom), (left, right))``.

    Returns:
      ``[B, H', W', C]``, as ``nn.max_pool(x, window, strides, padding)``.
    """
    window = tuple(int(w) for w in window)
    strides = tuple(int(s) for s in strides)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    if x.ndim != 4:
        raise ValueError(f"max_pool: x must be [B, H, W, C], got shape {x.shape}")
    if len(window) != 2 or len(strides) != 2 or len(padding) != 2 or any(len(p) != 2 for p in padding):
        raise ValueError(f"max_pool: window and strides must be (h, w) and padding "
                         f"((top, bottom), (left, right)); got {window}, {strides}, {padding}")
    if any(p >= w for pair, w in zip(padding, window) for p in pair) or min(strides) < 1:
        raise ValueError(f"max_pool: padding must be smaller than the window and strides >= 1; "
                         f"got window {window}, strides {strides}, padding {padding}")
    return _masked_max_pool(x, window, strides, padding)
