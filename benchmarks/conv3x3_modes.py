"""The ResNet's ``conv3x3`` modes layer by layer: XLA's convolution vs matrix products.

  python benchmarks/conv3x3_modes.py      # as run.py starts: its XLA flag and malloc

For each distinct 3x3 convolution of ResNet-50 up to layer3 at 320 px, batch 8, float32,
times one jitted gradient step of ``relu(batchnorm(x)) -> conv -> relu`` (the convolution
between the BatchNorm + ReLU that produce its input and a loss: forward, input gradient
and weight gradient, and the copies XLA makes around them), three ways:

* ``conv``: ``lax.conv_general_dilated`` (``conv3x3='conv'``);
* ``matmul``: what ``conv3x3='matmul'`` does at that layer (Winograd F(4x4, 3x3) where
  ``kpn_jax.models.conv3x3.winograd_applies``, the one-product input gradient at stride 2,
  else the convolution);
* ``winograd (forced)``: Winograd at every stride-1 layer, to show where it does not pay;
* ``onednn``: ``conv3x3='onednn'`` (oneDNN through ``kpn_jax.native``; ``auto`` on one CPU
  device), where the library builds here.

A last row times the 7x7 stride-2 stem (``StemConv``: forward and weight gradient, the
image needs no gradient) as XLA's convolution and through oneDNN.

The per-layer gains are larger than the train step's (benchmarks/README.md, section 1):
within the step the convolutions share the memory bus and the two cores with other work.
Median of 5 runs after two warm-ups, the ways interleaved, best of three rounds; where
``matmul`` is the convolution itself it is not timed again (the same program timed twice
differed by up to 15 % on the project's VM). Speed only: no test relies on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kpn_jax import malloc_tunables, xla_flags  # noqa: E402

BATCH = 8
# name, input size, channels (in = out), stride, count in ResNet-50 up to layer3
LAYERS = [("layer1 3x3", 80, 64, 1, 3), ("layer2_0 3x3/2", 80, 128, 2, 1),
          ("layer2 3x3", 40, 128, 1, 3), ("layer3_0 3x3/2", 40, 256, 2, 1),
          ("layer3 3x3", 20, 256, 1, 5)]


def main() -> None:
    malloc_tunables.reexec_with_tunables()
    xla_flags.apply_defaults()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from conv_weight_grad import median_ms
    from kpn_jax import native
    from kpn_jax.models import conv3x3
    from kpn_jax.models.layers import Conv3x3, StemConv

    onednn, why_not = native.availability()
    if not onednn:
        print(f"# oneDNN unavailable, its column is left out: {why_not}")

    def step_fn(convolve):
        def loss(params, x):
            scale, shift, kernel = params
            h = jnp.maximum((x - jnp.mean(x, axis=(0, 1, 2))) * scale + shift, 0.0)
            y = convolve(h, kernel)
            return jnp.sum(jnp.maximum(y, 0.0) * y)
        return jax.jit(jax.grad(loss))

    def best_of_rounds(ways, *args):
        """Best of three rounds of each way's median, the ways interleaved in every round."""
        times = {k: [] for k in ways}
        for _ in range(3):
            for k, f in ways.items():
                times[k].append(median_ms(f, *args, warmups=2))
        return {k: min(v) for k, v in times.items()}

    def module_conv(mode, stride, channels):
        module = Conv3x3(channels, stride, mode)  # the model's own layer, kernel passed in
        return lambda h, kernel: module.apply({"params": {"kernel": kernel}}, h)

    print(f"# jax {jax.__version__}, {jax.devices()}, batch {BATCH}, float32; ms per "
          "gradient step of relu(bn(x)) -> 3x3 conv -> relu, median of 5")
    totals = {"conv": 0.0, "matmul": 0.0, **({"onednn": 0.0} if onednn else {})}
    rng = np.random.default_rng(0)
    for name, size, channels, stride, count in LAYERS:
        x = jnp.asarray(rng.normal(size=(BATCH, size, size, channels)).astype(np.float32))
        kernel = jnp.asarray(rng.normal(size=(3, 3, channels, channels)).astype(np.float32)
                             * 0.05)
        params = (jnp.ones(channels), jnp.zeros(channels), kernel)
        applied = ("Winograd" if conv3x3.winograd_applies(x.shape, stride, x.dtype)
                   else "one-product input gradient" if stride == 2 else "convolution")
        ways = {"conv": step_fn(module_conv("conv", stride, channels))}
        if applied != "convolution":
            ways["matmul"] = step_fn(module_conv("matmul", stride, channels))
        if stride == 1:
            ways["winograd (forced)"] = step_fn(conv3x3.winograd_conv3x3)
        if onednn:
            ways["onednn"] = step_fn(module_conv("onednn", stride, channels))
        reference = ways["conv"](params, x)[2]
        errors = {k: float(jnp.max(jnp.abs(f(params, x)[2] - reference))
                           / jnp.max(jnp.abs(reference))) for k, f in ways.items() if k != "conv"}
        best = best_of_rounds(ways, params, x)
        line = "  ".join(f"{k} {best[k]:6.1f}" for k in ways)
        best.setdefault("matmul", best["conv"])  # the same program
        for k in totals:
            totals[k] += count * best[k]
        err = "  ".join(f"{k} {e:.1e}" for k, e in errors.items()) or "-"
        print(f"{name:15s} x{count}  {line}   matmul/conv {best['matmul'] / best['conv']:.2f} "
              f"(matmul mode: {applied}; weight-gradient difference {err})", flush=True)
    print("per step (x count): " + ", ".join(f"{k} {v:.0f} ms" for k, v in totals.items())
          + f"; matmul/conv {totals['matmul'] / totals['conv']:.2f}"
          + (f", onednn/conv {totals['onednn'] / totals['conv']:.2f}" if onednn else ""))
    if onednn:
        images = jnp.asarray(rng.normal(size=(BATCH, 320, 320, 3)).astype(np.float32))
        kernel = jnp.asarray(rng.normal(size=(7, 7, 3, 64)).astype(np.float32) * 0.05)

        def stem_step(mode):
            module = StemConv(64, mode=mode)

            def loss(kernel):
                y = module.apply({"params": {"kernel": kernel}}, images)
                return jnp.sum(jnp.maximum(y, 0.0) * y)
            return jax.jit(jax.grad(loss))

        best = best_of_rounds({"conv": stem_step("conv"), "onednn": stem_step("onednn")}, kernel)
        print(f"{'stem 7x7/2':15s} x1  conv {best['conv']:6.1f}  onednn {best['onednn']:6.1f}   "
              f"onednn/conv {best['onednn'] / best['conv']:.2f} (forward + weight gradient)")


if __name__ == "__main__":
    main()
