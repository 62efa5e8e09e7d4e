"""Small building blocks shared by the ResNet and the keypoint-pooling heads.

Initialisers follow PyTorch's defaults so that a model trained from scratch here
starts from the same distribution as its torchvision twin.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes

from kpn_jax import native
from kpn_jax.models import conv3x3

Dtype = Any

CONV1X1_MODES: tuple[str, ...] = ("einsum", "conv")
CONV3X3_MODES: tuple[str, ...] = ("matmul", "conv", "onednn")

# torchvision ResNet: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
# i.e. an untruncated normal with std sqrt(2 / (out * kh * kw)).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch nn.Linear weight: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
    """torch nn.Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    The bound depends on the layer's input size, which flax bias initialisers do
    not see, so it is bound here.
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(features: int, fan_in: int, name: str, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32) -> nn.Dense:
    """A ``nn.Dense`` (params ``kernel [fan_in, features]``, ``bias``) with torch's Linear init."""
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=torch_linear_kernel_init,
                    bias_init=torch_linear_bias_init(fan_in), name=name)


class _SquareConv(nn.Module):
    """Fields and kernel of the bias-free square convolutions below (``kernel [k, k, in, out]``,
    ``nn.Conv``'s parameter)."""

    features: int
    stride: int = 1
    mode: str = ""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = kaiming_normal_fan_out

    def _checked_input_and_kernel(self, x: jax.Array, size: int, modes: tuple[str, ...],
                                  option: str) -> tuple[jax.Array, jax.Array]:
        """Checks ``mode``, creates the kernel, returns both in the compute dtype."""
        if self.mode not in modes:
            raise ValueError(f"{option}: expected one of {modes}, got {self.mode!r}")
        kernel = self.param("kernel", self.kernel_init, (size, size, x.shape[-1], self.features),
                            self.param_dtype)
        return dtypes.promote_dtype(x, kernel, dtype=self.dtype)

    def _on_onednn(self, x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array | None:
        """``mode='onednn'``: the convolution through oneDNN if float32, else ``None``."""
        if self.mode == "onednn" and x.dtype == jnp.float32:
            return native.convolution(x, kernel, self.stride, padding)
        return None


class Conv1x1(_SquareConv):
    """Bias-free 1x1 convolution with stride, parameter ``kernel [1, 1, in, out]``.

    ``mode='einsum'`` computes it as ``x[:, ::s, ::s, :]`` followed by a matrix
    product over channels, ``[B*H*W, in] @ [in, out]``. It is the same function as
    ``mode='conv'`` (a 1x1 kernel with no padding reads exactly the pixels the slice
    keeps), but on CPU XLA's weight gradient of a 1x1 convolution is several times
    slower than the product's (benchmarks/README.md, section 2). Both modes hold the
    same parameter, so checkpoints are interchangeable.

    Attributes:
      features: output channels.
      stride: spatial stride (both axes).
      mode: ``'einsum'`` or ``'conv'``.
    """

    mode: str = "einsum"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, Cin]`` -> ``[B, ceil(H/s), ceil(W/s), features]`` in ``dtype``."""
        x, kernel = self._checked_input_and_kernel(x, 1, CONV1X1_MODES, "conv1x1")
        if self.mode == "einsum":
            if self.stride > 1:
                x = x[:, ::self.stride, ::self.stride, :]
            # A 2-D product [B*H*W, Cin] @ [Cin, out]: its weight gradient is then a dot
            # contracting dim 0 of both operands, which XLA:CPU runs on the operands as
            # they lie. The 4-D einsum's gradient contracts (b, h, w) instead, and XLA
            # materialises a transposed copy of the [B*H*W, C] cotangent for it.
            batch, height, width, channels = x.shape
            y = jnp.dot(x.reshape(batch * height * width, channels), kernel[0, 0])
            return y.reshape(batch, height, width, self.features)
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=(self.stride, self.stride), padding=((0, 0), (0, 0)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv3x3(_SquareConv):
    """Bias-free 3x3 convolution, padding 1 (torchvision's), parameter ``kernel [3, 3, in, out]``.

    ``mode='conv'`` is ``lax.conv_general_dilated``. ``mode='matmul'`` (see
    :mod:`kpn_jax.models.conv3x3`) moves work XLA:CPU does slowly onto matrix products:
    a stride-1 float32 convolution with at least 128 input channels on a map of at least
    32 x 32 pixels runs as Winograd F(4x4, 3x3) (the same function to about 1e-5 of the
    output's scale), and a stride-2 convolution gets its input gradient from one product
    (the same numbers to float rounding); other cases are the convolution.
    ``mode='onednn'`` runs float32 convolutions and both their gradients through oneDNN
    (:mod:`kpn_jax.native`, CPU only; the same function to float rounding) and other
    dtypes as ``'matmul'``. The parameter is ``nn.Conv``'s, so checkpoints are
    interchangeable between modes.
    """

    mode: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, Cin]`` -> ``[B, ceil(H/s), ceil(W/s), features]`` in ``dtype``."""
        x, kernel = self._checked_input_and_kernel(x, 3, CONV3X3_MODES, "conv3x3")
        if (y := self._on_onednn(x, kernel, 1)) is not None:
            return y
        if self.mode in ("matmul", "onednn"):
            if conv3x3.winograd_applies(x.shape, self.stride, x.dtype):
                return conv3x3.winograd_conv3x3(x, kernel)
            if self.stride == 2:
                return conv3x3.conv3x3_stride2(x, kernel)
        return conv3x3.convolution(x, kernel, self.stride)


class StemConv(_SquareConv):
    """ResNet's bias-free 7x7 stride-2 stem convolution, padding 3, parameter ``kernel
    [7, 7, in, out]`` (the same tree as ``nn.Conv(..., use_bias=False)``, so checkpoints
    and the torchvision converter are unchanged).

    ``mode='onednn'`` runs it through oneDNN when float32 (:mod:`kpn_jax.native`; XLA
    drops the input gradient, which nothing reads); other modes and dtypes are
    ``lax.conv_general_dilated``.
    """

    stride: int = 2
    mode: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, Cin]`` -> ``[B, ceil(H/s), ceil(W/s), features]`` in ``dtype``."""
        x, kernel = self._checked_input_and_kernel(x, 7, CONV3X3_MODES, "conv3x3")
        if (y := self._on_onednn(x, kernel, 3)) is not None:
            return y
        return conv3x3.convolution(x, kernel, self.stride, 3)


class BatchNorm(nn.Module):
    """Batch normalisation over the last (channel) axis with torch's running variance.

    The variables are exactly those of ``flax.linen.BatchNorm`` (params ``scale``,
    ``bias``; batch_stats ``mean``, ``var``, float32), so checkpoints and the
    torchvision converter are unchanged. The forward pass is the same function as
    ``nn.BatchNorm(use_fast_variance=True)``: in training the input is normalised
    with the batch mean and the *biased* batch variance (as torch normalises), the
    statistics reduced in at least float32 even for a bfloat16 ``dtype``. What
    differs is the running-variance update, which follows ``torch.nn.BatchNorm2d``::

        mean <- momentum * mean + (1 - momentum) * batch_mean
        var  <- momentum * var  + (1 - momentum) * batch_var * n / (n - 1)

    with ``n`` the number of values reduced per channel (``B * H * W``; with a
    single value the factor is 1, where torch refuses to train). Under
    ``jax.jit`` with the batch sharded over devices the reductions are over the
    global batch.

    Attributes:
      use_running_average: normalise with the stored statistics (eval) instead of
        the batch's (train; call ``apply`` with ``mutable=['batch_stats']``).
      momentum: weight of the old running value (flax convention: 0.9 == torch 0.1).
      epsilon: added to the variance (torch's 1e-5).
      dtype: dtype of the output (the compute dtype); ``None``: inferred as flax does.
      param_dtype: dtype of ``scale`` and ``bias`` (batch_stats are always float32).
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """``x [..., C]`` -> normalised ``x``, same shape, in ``dtype``."""
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               (features,))
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            # Statistics in at least float32 (float64 stays), as flax reduces them;
            # one pass, E[x^2] - E[x]^2 clipped at 0 (flax's use_fast_variance).
            stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
            xf = x.astype(stats_dtype)
            mean = jnp.mean(xf, axes)
            mean_sq = jnp.mean(jnp.square(xf), axes)
            var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                bessel = n / (n - 1) if n > 1 else 1.0
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = (self.momentum * ra_var.value
                                + (1 - self.momentum) * (var * bessel))
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        # The same arithmetic as flax's _normalize: (x - mean) * (rsqrt(var + eps) * scale)
        # + bias in the statistics' precision, then cast to the output dtype.
        y = x - mean
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        y = y * mul + bias
        out_dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        return jnp.asarray(y, out_dtype)
