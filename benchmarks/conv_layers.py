"""Every convolution of the ResNet-50 KPN step, layer by layer: kpn-jax vs PyTorch.

  python benchmarks/conv_layers.py            # as run.py starts: its XLA flag and malloc
  KPN_JAX_MALLOC_TUNABLES=0 python benchmarks/conv_layers.py   # glibc's default malloc

For each distinct convolution of ResNet-50 up to layer3 (what the KPN runs) at 320 px,
batch 8, float32: kpn-jax's forward, input gradient and weight gradient, each its own jitted
function (1x1 convolutions as the model computes them, 2-D products; 3x3/7x7 as
``lax.conv_general_dilated``), and PyTorch's forward and ``convolution_backward`` (both
gradients; the stem's weight gradient only). Totals weight each line by how often the
network has it. Then the stem as a space-to-depth convolution (7x7/2 as 4x4/1 over 2x2
blocks), the one rewrite of a 3x3/7x7 convolution that measured faster here. Median of 5
runs after two warm-ups. Speed only: no test relies on it.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


BATCH = 8
IMAGE_SIZE = 320


def resnet50_convolutions() -> collections.Counter:
    """``(kernel, stride, input size, in channels, out channels) -> count`` up to layer3."""
    convs = collections.Counter()
    convs[(7, 2, IMAGE_SIZE, 3, 64)] += 1
    size, in_channels = IMAGE_SIZE // 4, 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6)]):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            convs[(1, 1, size, in_channels, planes)] += 1
            convs[(3, stride, size, planes, planes)] += 1
            convs[(1, 1, size // stride, planes, 4 * planes)] += 1
            if block == 0:
                convs[(1, stride, size, in_channels, 4 * planes)] += 1
            in_channels, size = 4 * planes, size // stride
    return convs


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from conv_weight_grad import conv, median_ms

    from kpn_jax import cpu

    def conv1x1(x, w, stride):  # the CPU plug-in's 1x1 convolution
        return cpu.conv_general_dilated(x, w, (stride, stride), ((0, 0), (0, 0)),
                                        dimension_numbers=jax.lax.conv_dimension_numbers(
                                            x.shape, w.shape, ("NHWC", "HWIO", "NHWC")))

    def median_s(fn):
        return 1e-3 * median_ms(fn, warmups=2)

    def stem_space_to_depth(x, w, stride):
        del stride  # 2
        batch, height, width, channels = x.shape
        padded = jnp.pad(x, ((0, 0), (3, 3 + height % 2), (3, 3 + width % 2), (0, 0)))
        rows, cols = padded.shape[1] // 2, padded.shape[2] // 2
        blocks = padded.reshape(batch, rows, 2, cols, 2, channels).transpose(0, 1, 3, 2, 4, 5)
        kernel = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))  # [8, 8, C, O]
        kernel = kernel.reshape(4, 2, 4, 2, channels, -1).transpose(0, 2, 1, 3, 4, 5)
        y = jax.lax.conv_general_dilated(blocks.reshape(batch, rows, cols, 4 * channels),
                                         kernel.reshape(4, 4, 4 * channels, -1), (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y[:, :(height + 1) // 2, :(width + 1) // 2]

    print(f"# jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, load "
          f"{[round(v, 2) for v in os.getloadavg()]}; ms, median of 5", flush=True)
    totals = collections.Counter()
    rng = np.random.default_rng(0)
    lines = [(shape, count, conv1x1 if shape[0] == 1 else conv)
             for shape, count in sorted(resnet50_convolutions().items())]
    # The space-to-depth stem last, with count 0: printed, not in the totals.
    lines.append(((7, 2, IMAGE_SIZE, 3, 64), 0, stem_space_to_depth))
    for (k, stride, size, cin, cout), count, fn in lines:
        x = jnp.asarray(rng.standard_normal((BATCH, size, size, cin), np.float32))
        w = jnp.asarray(0.05 * rng.standard_normal((k, k, cin, cout), np.float32))
        g = jnp.full(fn(x, w, stride).shape, 0.01, jnp.float32)
        forward = jax.jit(lambda x, w: fn(x, w, stride))
        grad_x = jax.jit(lambda x, w, g: jax.vjp(lambda x: fn(x, w, stride), x)[1](g)[0])
        grad_w = jax.jit(lambda x, w, g: jax.vjp(lambda w: fn(x, w, stride), w)[1](g)[0])
        jax_times = {"forward": median_s(lambda: forward(x, w).block_until_ready()),
                     "grad_w": median_s(lambda: grad_w(x, w, g).block_until_ready())}
        if k != 7:  # the stem's input is the image: no input gradient
            jax_times["grad_x"] = median_s(lambda: grad_x(x, w, g).block_until_ready())
        tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
        tw = torch.tensor(np.asarray(w)).permute(3, 2, 0, 1).contiguous()
        tg = torch.tensor(np.asarray(g)).permute(0, 3, 1, 2).contiguous()

        def torch_forward():
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, stride=stride, padding=k // 2)

        def torch_backward():
            torch.ops.aten.convolution_backward(tg, tx, tw, None, [stride] * 2, [k // 2] * 2,
                                                [1, 1], False, [0, 0], 1, [k != 7, True, False])

        torch_times = {"forward": median_s(torch_forward), "backward": median_s(torch_backward)}
        for name, value in jax_times.items():
            totals[f"jax {name}"] += count * value
        for name, value in torch_times.items():
            totals[f"torch {name}"] += count * value
        label = ("stem, space-to-depth" if fn is stem_space_to_depth
                 else f"{k}x{k}/{stride} {size}x{size} {cin}->{cout} x{count}")
        print(f"{label:34s} kpn-jax " + " ".join(f"{n} {1e3 * v:6.1f}" for n, v in jax_times.items())
              + " | torch " + " ".join(f"{n} {1e3 * v:6.1f}" for n, v in torch_times.items()),
              flush=True)
    jax_total = sum(v for n, v in totals.items() if n.startswith("jax"))
    torch_total = sum(v for n, v in totals.items() if n.startswith("torch"))
    print("per step, ms: " + ", ".join(f"{n} {1e3 * v:.0f}" for n, v in totals.items())
          + f"; kpn-jax {1e3 * jax_total:.0f} vs torch {1e3 * torch_total:.0f}")


if __name__ == "__main__":
    main()
