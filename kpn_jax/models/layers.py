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
