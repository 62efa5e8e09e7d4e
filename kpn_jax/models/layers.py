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

Dtype = Any

CONV1X1_MODES: tuple[str, ...] = ("einsum", "conv")

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


class Conv1x1(nn.Module):
    """Bias-free 1x1 convolution with stride, parameter ``kernel [1, 1, in, out]``.

    ``mode='einsum'`` computes it as ``x[:, ::s, ::s, :]`` followed by a channel
    einsum. It is the same function as ``mode='conv'`` (a 1x1 kernel with no
    padding reads exactly the pixels the slice keeps), but on CPU XLA's weight
    gradient of a 1x1 convolution is an order of magnitude slower than the
    einsum's. Both modes hold the same parameter, so checkpoints are
    interchangeable.

    Attributes:
      features: output channels.
      stride: spatial stride (both axes).
      mode: ``'einsum'`` or ``'conv'``.
    """

    features: int
    stride: int = 1
    mode: str = "einsum"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = kaiming_normal_fan_out

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, Cin]`` -> ``[B, ceil(H/s), ceil(W/s), features]`` in ``dtype``."""
        if self.mode not in CONV1X1_MODES:
            raise ValueError(f"conv1x1: expected one of {CONV1X1_MODES}, got {self.mode!r}")
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        x, kernel = dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if self.mode == "einsum":
            if self.stride > 1:
                x = x[:, ::self.stride, ::self.stride, :]
            return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=(self.stride, self.stride), padding=((0, 0), (0, 0)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
