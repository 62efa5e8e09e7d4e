"""Max pooling with a gradient that XLA:CPU computes quickly.

``nn.max_pool``'s gradient is XLA's select-and-scatter, which XLA:CPU expands into a
5-output ``reduce_window`` over full-size index arrays followed by a scatter: the
ResNet stem's 3x3 / stride-2 pool and its gradient took 7 % of a ResNet-50 train step
on CPU. :func:`max_pool` has the same forward, computed as a running maximum over the
window offsets that also records which offset won each window (the first maximum in
row-major order: the tie rule of select-and-scatter and of torch's ``MaxPool2d``), and a
custom VJP that sends each window's cotangent there with one strided mask per offset;
equal gradients up to the order of float additions where windows overlap.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp


def _windows(x: jax.Array, window, strides, padding):
    """Yields, for every window offset ``(di, dj)`` in row-major order, the input under that
    offset of every window ``[B, H', W', C]`` (a strided view of the ``-inf``-padded input)
    and the padding that puts an output-shaped array back at those input positions."""
    (pad_top, pad_bottom), (pad_left, pad_right) = padding
    padded = jnp.pad(x, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)),
                     constant_values=-jnp.inf)
    stride_h, stride_w = strides
    out_h = (padded.shape[1] - window[0]) // stride_h + 1
    out_w = (padded.shape[2] - window[1]) // stride_w + 1
    span_h, span_w = stride_h * (out_h - 1) + 1, stride_w * (out_w - 1) + 1
    for di in range(window[0]):
        for dj in range(window[1]):
            under = padded[:, di:di + span_h:stride_h, dj:dj + span_w:stride_w, :]
            # Back to padded-input positions: interior padding puts the values stride apart.
            placement = [(0, 0, 0),
                         (di, padded.shape[1] - di - span_h, stride_h - 1),
                         (dj, padded.shape[2] - dj - span_w, stride_w - 1),
                         (0, 0, 0)]
            yield under, placement


def _max_and_winner(x, window, strides, padding):
    """The windows' maxima and, per window, the offset index of its first maximum (int8)."""
    best, winner = None, None
    for k, (under, _) in enumerate(_windows(x, window, strides, padding)):
        if best is None:
            best, winner = under, jnp.zeros(under.shape, jnp.int8)
        else:
            # Strictly greater: the first maximum in row-major order keeps the window.
            better = under > best
            best = jnp.where(better, under, best)
            winner = jnp.where(better, jnp.int8(k), winner)
    return best, winner


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _masked_max_pool(x, window, strides, padding):
    return _max_and_winner(x, window, strides, padding)[0]


def _forward(x, window, strides, padding):
    y, winner = _max_and_winner(x, window, strides, padding)
    # The winners are decided here, from the same values as the maxima, and kept: finding
    # them again in the backward by comparing x with y would miss wherever XLA recomputes
    # x (say a ReLU of a BatchNorm) in another fusion with other rounding.
    # An empty array carries x's shape and dtype to the backward without keeping x alive.
    return y, (winner, jnp.zeros((0, *x.shape[1:]), x.dtype))


def _backward(window, strides, padding, residuals, cotangent):
    winner, empty = residuals
    shape, dtype = (cotangent.shape[0], *empty.shape[1:]), empty.dtype
    (pad_top, _), (pad_left, _) = padding
    zero = jnp.zeros((), cotangent.dtype)
    template = jnp.zeros(shape, dtype)  # for the offsets' placements only; never read
    grad = None
    for k, (_, placement) in enumerate(_windows(template, window, strides, padding)):
        placed = jax.lax.pad(jnp.where(winner == k, cotangent, zero), zero, placement)
        grad = placed if grad is None else grad + placed
    return (grad[:, pad_top:pad_top + shape[1], pad_left:pad_left + shape[2], :].astype(dtype),)


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
