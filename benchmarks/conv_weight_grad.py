"""Convolution weight gradients on XLA:CPU: lax.conv's own vs im2col + einsum / 2-D product.

  python benchmarks/conv_weight_grad.py

For the ResNet-50 stem (7x7/2) and 3x3 convolutions at 320 px, batch 8, times the
weight gradient as XLA computes it (``jax.grad`` of ``lax.conv_general_dilated``) and
as one einsum over explicitly gathered patches (the trick that made 1x1 convolutions
18x faster, section 2 of benchmarks/README.md), and checks that both agree. Median of
5 runs after one warm-up, each function jitted with its inputs as arguments.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [  # name, batch, input size, in channels, out channels, kernel, stride
    ("layer1 3x3", 8, 80, 64, 64, 3, 1),
    ("layer2 3x3 stride 2", 8, 80, 128, 128, 3, 2),
    ("layer3 3x3", 8, 20, 256, 256, 3, 1),
    ("stem 7x7 stride 2", 8, 320, 3, 64, 7, 2),
]


def conv(x, w, stride):
    pad = w.shape[0] // 2
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def weight_grad_xla(w, x, g, stride):
    return jax.grad(lambda w: jnp.sum(conv(x, w, stride) * g))(w)


def _windows(x, k, stride, out_h, out_w):
    """The ``k * k`` strided windows of ``x`` (zero-padded by ``k // 2``) that meet the
    output gradient, in kernel order ``(i, j)``: each ``[B, H', W', C]``."""
    pad = k // 2
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return [padded[:, i:i + stride * (out_h - 1) + 1:stride,
                   j:j + stride * (out_w - 1) + 1:stride, :]
            for i in range(k) for j in range(k)]


def weight_grad_patches(w, x, g, stride):
    """``dW[i, j, c, o] = sum_{b,h,w} xpad[b, s h + i, s w + j, c] g[b, h, w, o]``."""
    _, out_h, out_w, _ = g.shape
    windows = _windows(x, w.shape[0], stride, out_h, out_w)
    patches = jnp.stack(windows, axis=3)                                 # [B, H', W', k*k, C]
    return jnp.einsum("bhwkc,bhwo->kco", patches, g).reshape(w.shape)


def weight_grad_patches_2d(w, x, g, stride):
    """The same patches as one 2-D product ``[k*k*C, B*H'*W'] @ [B*H'*W', O]``: contracting
    the leading (b, h, w) dimensions of 5-D/4-D operands makes XLA:CPU copy a transposed
    operand first (the reason the 1x1 convolutions are 2-D products)."""
    batch, out_h, out_w, out_c = g.shape
    windows = _windows(x, w.shape[0], stride, out_h, out_w)
    patches = jnp.concatenate(windows, axis=3)                           # [B, H', W', k*k*C]
    rows = batch * out_h * out_w
    return jnp.dot(patches.reshape(rows, -1).T, g.reshape(rows, out_c)).reshape(w.shape)


def median_ms(fn, *args, repeats=5, warmups=1):
    """Median wall time of ``fn(*args)`` in ms, after ``warmups`` untimed calls."""
    for _ in range(warmups):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform}, load {np.round(__import__('os').getloadavg(), 2).tolist()}")
    for name, batch, size, cin, cout, k, stride in SHAPES:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(keys[0], (batch, size, size, cin))
        w = jax.random.normal(keys[1], (k, k, cin, cout)) * 0.05
        g = jax.random.normal(keys[2], conv(x, w, stride).shape)
        xla = jax.jit(weight_grad_xla, static_argnums=3)
        patches = jax.jit(weight_grad_patches, static_argnums=3)
        patches_2d = jax.jit(weight_grad_patches_2d, static_argnums=3)
        a = xla(w, x, g, stride)
        error = max(float(jnp.max(jnp.abs(a - f(w, x, g, stride))) / jnp.max(jnp.abs(a)))
                    for f in (patches, patches_2d))
        print(f"{name:22s} XLA {median_ms(xla, w, x, g, stride):7.1f} ms   im2col + einsum "
              f"{median_ms(patches, w, x, g, stride):7.1f} ms   im2col + 2-D product "
              f"{median_ms(patches_2d, w, x, g, stride):7.1f} ms   max rel. difference {error:.1e}")


if __name__ == "__main__":
    main()
