"""3x3 convolutions as matrix products, for XLA:CPU: Winograd F(4x4, 3x3) for stride 1, and
a one-product input gradient for stride 2 (:func:`conv3x3_stride2`, at the end). The
ResNet's ``conv3x3='matmul'`` uses both (``config.model.conv3x3='auto'`` on CPU where
oneDNN, :mod:`kpn_jax.native`, is unavailable, or with several devices).

Stride 1, Winograd's minimal filtering: each 6x6 input tile ``d`` (stride 4) gives a 4x4 output tile
``Y = A^T [(G w G^T) . (B^T d B)] A`` (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016): the 36 elementwise products become 36 matrix products
``[tiles, Cin] @ [Cin, Cout]``, 4x fewer multiplications than the direct convolution, and
the input/output transforms are additions XLA fuses. On XLA:CPU the matrix products run
on its fast dot path (YNNPACK in jaxlib 0.10), while its direct 3x3 convolution and,
above all, its weight gradient (an Eigen convolution over a transposed copy of the
activations) are slower. Per layer (``benchmarks/conv3x3_modes.py``) this pays only with
enough channels and tiles (:func:`winograd_applies`); in the ResNet-50 train step it is the
three stride-1 layer2 convolutions (benchmarks/README.md, section 1).

The gradient is written out (:func:`winograd_conv3x3`'s ``custom_vjp``): the input gradient is
the same Winograd convolution of the output gradient with the flipped, transposed kernel,
and the weight gradient contracts the transformed input tiles with the transformed
output-gradient tiles over the tiles, ``[Cin, tiles] @ [tiles, Cout]`` for each of the 36
points, then maps back with ``G^T . G``. Same function as
``lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)))``; in float32 the outputs
differ from it by about 1e-5 of their largest magnitude (the transforms' coefficients,
up to 8, lose a few bits), which is why :func:`winograd_applies` admits float32 only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TILE = 4  # output pixels per tile side, m in F(m x m, 3 x 3)
_SPAN = TILE + 2  # input pixels per tile side
# F(4x4, 3x3) with the interpolation points 0, +-1, +-2 (Lavin & Gray, 2016).
_BT = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0],
               [-1 / 6, -1 / 6, -1 / 6],
               [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6],
               [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], np.float64)
# Where the 36 products pay for the transforms' memory traffic on XLA:CPU. Measured on
# ResNet-50 at 320 px (benchmarks/README.md section 1): layer2 (128 channels, 40 x 40)
# faster; layer3 (20 x 20: too few tiles per product) slower; layer1 (64 channels,
# 80 x 80) faster alone but no faster within the train step.
MIN_PIXELS = 32 * 32
MIN_CHANNELS = 128


def winograd_applies(input_shape: tuple[int, ...], stride: int, dtype) -> bool:
    """Whether :func:`winograd_conv3x3` is used for a stride-1 3x3 convolution of ``input_shape [B, H, W, C]``:
    stride 1, float32, at least :data:`MIN_PIXELS` pixels and :data:`MIN_CHANNELS` input
    channels."""
    return (stride == 1 and len(input_shape) == 4 and jnp.dtype(dtype) == jnp.float32
            and input_shape[1] * input_shape[2] >= MIN_PIXELS
            and input_shape[3] >= MIN_CHANNELS)


def _combine(matrix: np.ndarray, terms: list[jax.Array]) -> list[jax.Array]:
    """``[sum_j matrix[i, j] * terms[j] for each row i]``, skipping zero coefficients."""
    out = []
    for row in matrix:
        total = None
        for coefficient, term in zip(row, terms):
            if coefficient == 0:
                continue
            if coefficient == 1:
                scaled = term
            elif coefficient == -1:
                scaled = -term
            else:
                scaled = term * jnp.asarray(coefficient, term.dtype)
            total = scaled if total is None else total + scaled
        out.append(total)
    return out


def _num_tiles(size: int) -> int:
    return -(-size // TILE)


def _input_tiles(x: jax.Array) -> list[list[jax.Array]]:
    """``B^T d B`` for every 6x6 tile of ``x [B, H, W, C]`` (zero-padded by 1, and at the
    bottom/right up to whole tiles): ``[a][b]`` -> ``[B * tiles_h * tiles_w, C]``."""
    batch, height, width, channels = x.shape
    tiles_h, tiles_w = _num_tiles(height), _num_tiles(width)
    padded = jnp.pad(x, ((0, 0), (1, TILE * tiles_h - height + 1),
                         (1, TILE * tiles_w - width + 1), (0, 0)))
    # Tile i reads padded rows 4i .. 4i+5: row r of every tile is one strided slice.
    rows = [padded[:, r:r + TILE * (tiles_h - 1) + 1:TILE] for r in range(_SPAN)]
    tiles = []
    for row in _combine(_BT, rows):
        columns = [row[:, :, c:c + TILE * (tiles_w - 1) + 1:TILE] for c in range(_SPAN)]
        tiles.append([t.reshape(-1, channels) for t in _combine(_BT, columns)])
    return tiles


def _forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    batch, height, width, _ = x.shape
    out_channels = kernel.shape[-1]
    tiles_h, tiles_w = _num_tiles(height), _num_tiles(width)
    g = jnp.asarray(_G, kernel.dtype)
    transformed_kernel = jnp.einsum("ai,ijco,bj->abco", g, kernel, g)  # [6, 6, Cin, Cout]
    products = [[jnp.dot(tile, transformed_kernel[a, b]).reshape(batch, tiles_h, tiles_w,
                                                                   out_channels)
                 for b, tile in enumerate(row)] for a, row in enumerate(_input_tiles(x))]
    # A^T M A: rows first (over a), then columns (over b).
    by_row = [_combine(_AT, [products[a][b] for a in range(_SPAN)]) for b in range(_SPAN)]
    out_rows = []
    for i in range(TILE):
        out_pixels = _combine(_AT, [by_row[b][i] for b in range(_SPAN)])  # over j
        out_rows.append(jnp.stack(out_pixels, axis=3))  # [B, th, tw, 4(j), O]
    y = jnp.stack(out_rows, axis=2)  # [B, th, 4(i), tw, 4(j), O]
    y = y.reshape(batch, TILE * tiles_h, TILE * tiles_w, out_channels)
    return y[:, :height, :width]


@jax.custom_vjp
def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, by Winograd F(4x4, 3x3).

    Args:
      x: ``[B, H, W, Cin]`` (any H, W).
      kernel: ``[3, 3, Cin, Cout]`` (HWIO), same dtype as ``x``.

    Returns:
      ``[B, H, W, Cout]``, the same function as ``lax.conv_general_dilated(x, kernel,
      (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``.
    """
    return _forward(x, kernel)


def _conv3x3_fwd(x, kernel):
    return _forward(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, grad_out):
    x, kernel = residuals
    out_channels = kernel.shape[-1]
    # dL/dx: the "full" correlation with the kernel flipped in space and in/out swapped,
    # which for a 3x3 kernel with padding 1 is again a padding-1 3x3 convolution.
    grad_x = _forward(grad_out, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)))
    # dL/dw: transform the output-gradient tiles with A (the transpose of A^T . A), contract
    # with the input tiles over the tiles, map back with G^T . G.
    batch, height, width, _ = grad_out.shape
    tiles_h, tiles_w = _num_tiles(height), _num_tiles(width)
    padded = jnp.pad(grad_out, ((0, 0), (0, TILE * tiles_h - height),
                                (0, TILE * tiles_w - width), (0, 0)))
    pixel = [[padded[:, i::TILE, j::TILE] for j in range(TILE)] for i in range(TILE)]
    a_matrix = _AT.T  # [6, 4]
    by_column = [_combine(a_matrix, [pixel[i][j] for i in range(TILE)]) for j in range(TILE)]
    # Recomputed rather than saved by the forward: the tiles are 2.25x the input's size.
    input_tiles = _input_tiles(x)
    grad_transformed = []
    for a in range(_SPAN):
        grad_tiles = _combine(a_matrix, [by_column[j][a] for j in range(TILE)])
        grad_transformed.append(jnp.stack([
            jax.lax.dot_general(input_tiles[a][b], grad_tiles[b].reshape(-1, out_channels),
                                (((0,), (0,)), ((), ())))
            for b in range(_SPAN)]))
    g = jnp.asarray(_G, kernel.dtype)
    grad_kernel = jnp.einsum("ai,abco,bj->ijco", g, jnp.stack(grad_transformed), g)
    return grad_x, grad_kernel


winograd_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def convolution(x: jax.Array, kernel: jax.Array, stride: int, padding: int = 1) -> jax.Array:
    """The convolution as XLA computes it: ``lax.conv_general_dilated`` (NHWC, HWIO), zero
    padding ``padding`` on every side (1: the 3x3's; the 7x7 stem passes 3),
    ``[B, H, W, Cin]`` -> ``[B, (H + 2p - kh) // s + 1, (W + 2p - kw) // s + 1, Cout]``."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def conv3x3_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3 convolution, stride 2, zero padding 1, whose input gradient is one matrix product.

    Forward and weight gradient are XLA's. XLA:CPU computes the input gradient of a
    strided convolution as a convolution over the output gradient dilated with zeros (3 of
    every 4 multiplications are by zero, on fewer threads); here it is
    ``[B*h*w, Cout] @ [Cout, 9*Cin]`` (each output pixel's contribution through each of
    the 9 taps) followed by one fusion that adds the taps landing on each input pixel.

    Args:
      x: ``[B, H, W, Cin]``; kernel ``[3, 3, Cin, Cout]``.

    Returns:
      ``[B, ceil(H/2), ceil(W/2), Cout]``.
    """
    return convolution(x, kernel, 2)


def _stride2_fwd(x, kernel):
    return convolution(x, kernel, 2), (x, kernel)


def _stride2_bwd(residuals, grad_out):
    x, kernel = residuals
    batch, height, width, in_channels = x.shape
    _, out_h, out_w, out_channels = grad_out.shape
    _, weight_vjp = jax.vjp(lambda k: convolution(x, k, 2), kernel)
    grad_kernel, = weight_vjp(grad_out)
    # taps[b, i, j, u, v, c]: output pixel (i, j)'s gradient sent through kernel tap (u, v);
    # it lands on padded input pixel (2i + u, 2j + v), i.e. input pixel (2i + u - 1, ...).
    taps = jnp.dot(grad_out.reshape(-1, out_channels),
                   jnp.transpose(kernel, (3, 0, 1, 2)).reshape(out_channels, 9 * in_channels))
    taps = jnp.pad(taps.reshape(batch, out_h, out_w, 3, 3, in_channels),
                   ((0, 0), (0, 1), (0, 1), (0, 0), (0, 0), (0, 0)))

    def tap(u, v, di, dj):  # tap (u, v) of output pixel (a + di, b + dj), [B, h, w, Cin]
        return taps[:, di:di + out_h, dj:dj + out_w, u, v, :]

    # Input pixel (2a + p, 2b + q) for the four parities (p, q).
    even_even = tap(1, 1, 0, 0)
    even_odd = tap(1, 0, 0, 1) + tap(1, 2, 0, 0)
    odd_even = tap(0, 1, 1, 0) + tap(2, 1, 0, 0)
    odd_odd = tap(0, 0, 1, 1) + tap(0, 2, 1, 0) + tap(2, 0, 0, 1) + tap(2, 2, 0, 0)
    grad_x = jnp.stack([jnp.stack([even_even, even_odd], axis=3),
                        jnp.stack([odd_even, odd_odd], axis=3)], axis=2)
    grad_x = grad_x.reshape(batch, 2 * out_h, 2 * out_w, in_channels)[:, :height, :width]
    return grad_x, grad_kernel


conv3x3_stride2.defvjp(_stride2_fwd, _stride2_bwd)
