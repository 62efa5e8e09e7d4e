"""ResNet-18/34/50 in torchvision's exact layout (v1.5: bottleneck stride on the 3x3).

Padding is explicit everywhere, as in torchvision, so the same weights give the
same numbers (flax ``'SAME'`` padding would put the extra pixel of a stride-2
convolution on the other side).

Parameter tree (a contract with the torchvision converter in ``kpn_jax.interop``)::

    conv1/kernel [7, 7, Cin, width]          bn1/{scale, bias}, batch_stats bn1/{mean, var}
    layer{k}_{i}/conv1, bn1, conv2, bn2       block i of stage k (k = 1..4, i = 0..)
                 conv3, bn3                    bottleneck only
                 downsample_conv, downsample_bn   when the block changes shape
    fc/{kernel [in, num_classes], bias}       only when num_classes is set

Every convolution's parameter is ``kernel [kh, kw, in, out]`` with no bias. With
``last_stage='layer3'`` (say) the tree simply stops: no ``layer4_*``, no ``fc``.

BatchNorm is :class:`~kpn_jax.models.layers.BatchNorm`: the variables of
``flax.linen.BatchNorm``, with torch's running-variance update (unbiased, n/(n-1)).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpn_jax.models import pooling
from kpn_jax.models.layers import (CONV1X1_MODES, CONV3X3_MODES, BatchNorm, Conv1x1, Conv3x3,
                                   StemConv, torch_linear)

Dtype = Any

# depth -> (block kind, blocks per stage); torchvision's resnet18/34/50.
RESNET_CONFIGS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
BOTTLENECK_EXPANSION = 4
# Input pixels per cell of each returned feature map.
FEATURE_STRIDES: dict[str, int] = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16,
                                   "layer4": 32}
STAGES: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")

# torch nn.BatchNorm2d: eps 1e-5, momentum 0.1 on the new value == flax momentum 0.9.
BN_EPSILON = 1e-5


def stage_channels(depth: int, width: int = 64) -> dict[str, int]:
    """Output channels of each returned feature map, e.g. ResNet-50 ``layer3`` -> 1024."""
    if depth not in RESNET_CONFIGS:
        raise ValueError(f"depth: expected one of {sorted(RESNET_CONFIGS)}, got {depth}")
    expansion = BOTTLENECK_EXPANSION if RESNET_CONFIGS[depth][0] == "bottleneck" else 1
    channels = {"stem": width}
    for k in range(4):
        channels[f"layer{k + 1}"] = width * 2 ** k * expansion
    return channels


def num_stages(last_stage: str) -> int:
    """``'layer1'`` .. ``'layer4'`` -> 1 .. 4 (the stages a ResNet ending there has)."""
    if last_stage not in STAGES:
        raise ValueError(f"last_stage: expected one of {STAGES}, got {last_stage!r}")
    return STAGES.index(last_stage) + 1


def _batch_norm(train: bool, momentum: float, name: str, dtype: Dtype,
                param_dtype: Dtype) -> BatchNorm:
    # Statistics reduced in float32 even for a bfloat16 ``dtype``; batch_stats float32;
    # running variance updated with the unbiased batch variance, as torch does.
    return BatchNorm(use_running_average=not train, momentum=momentum, epsilon=BN_EPSILON,
                     dtype=dtype, param_dtype=param_dtype, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; ``planes`` output channels (expansion 1)."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv1x1: str = "einsum"
    bn_momentum: float = 0.9
    conv3x3: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``x [B, H, W, Cin]`` -> ``[B, H/s, W/s, planes]``."""
        dt, pdt = self.dtype, self.param_dtype
        y = Conv3x3(self.planes, self.stride, self.conv3x3, dt, pdt, name="conv1")(x)
        y = nn.relu(_batch_norm(train, self.bn_momentum, "bn1", dt, pdt)(y))
        y = Conv3x3(self.planes, 1, self.conv3x3, dt, pdt, name="conv2")(y)
        y = _batch_norm(train, self.bn_momentum, "bn2", dt, pdt)(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = Conv1x1(self.planes, self.stride, self.conv1x1, dt, pdt,
                               name="downsample_conv")(x)
            shortcut = _batch_norm(train, self.bn_momentum, "downsample_bn", dt, pdt)(shortcut)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, torchvision v1.5) -> 1x1; ``4 * planes`` output channels."""

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv1x1: str = "einsum"
    bn_momentum: float = 0.9
    conv3x3: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """``x [B, H, W, Cin]`` -> ``[B, H/s, W/s, 4 * planes]``."""
        dt, pdt = self.dtype, self.param_dtype
        out_channels = self.planes * BOTTLENECK_EXPANSION
        y = Conv1x1(self.planes, 1, self.conv1x1, dt, pdt, name="conv1")(x)
        y = nn.relu(_batch_norm(train, self.bn_momentum, "bn1", dt, pdt)(y))
        y = Conv3x3(self.planes, self.stride, self.conv3x3, dt, pdt, name="conv2")(y)
        y = nn.relu(_batch_norm(train, self.bn_momentum, "bn2", dt, pdt)(y))
        y = Conv1x1(out_channels, 1, self.conv1x1, dt, pdt, name="conv3")(y)
        y = _batch_norm(train, self.bn_momentum, "bn3", dt, pdt)(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_channels:
            shortcut = Conv1x1(out_channels, self.stride, self.conv1x1, dt, pdt,
                               name="downsample_conv")(x)
            shortcut = _batch_norm(train, self.bn_momentum, "downsample_bn", dt, pdt)(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """torchvision ResNet-18/34/50 returning every stage's feature map.

    Attributes:
      depth: 18, 34 or 50.
      num_classes: size of the ``fc`` classifier on the globally pooled ``layer4``;
        ``None`` builds no ``fc`` (a backbone). Needs ``last_stage='layer4'``.
      dtype: compute dtype of the convolutions and of the returned feature maps.
      param_dtype: dtype of the parameters (batch_stats are always float32).
      width: stem / first-stage channels (64 = torchvision); stages use
        ``width * [1, 2, 4, 8]`` (times 4 for the bottleneck's output).
      conv1x1: ``'einsum'`` or ``'conv'``, how 1x1 convolutions are computed
        (see :class:`Conv1x1`; same parameters either way).
      conv3x3: ``'conv'``, ``'matmul'`` or ``'onednn'``, how the blocks' 3x3
        convolutions are computed (see :class:`Conv3x3`; same parameters either way);
        ``'onednn'`` also runs the 7x7 stem through oneDNN (:class:`StemConv`).
      bn_momentum: flax BatchNorm momentum (0.9 == torch momentum 0.1).
      last_stage: the last stage built and run (``'layer1'`` .. ``'layer4'``). A
        backbone whose user reads only ``layer3`` should stop there: in training its
        BatchNorm updates would keep XLA from pruning an unused ``layer4``, and
        weight decay would shrink its weights for nothing.
    """

    depth: int = 50
    num_classes: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    width: int = 64
    conv1x1: str = "einsum"
    bn_momentum: float = 0.9
    last_stage: str = "layer4"
    conv3x3: str = "conv"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Runs the network.

        Args:
          images: ``[B, H, W, Cin]``, already normalised.
          train: use batch statistics in BatchNorm and update ``batch_stats``
            (call ``apply`` with ``mutable=['batch_stats']``).

        Returns:
          ``stem`` ``[B, H/4, W/4, width]`` (after the max-pool), ``layer1`` (stride 4),
          ``layer2`` (8), ``layer3`` (16), ``layer4`` (32) up to ``last_stage``, all in
          ``dtype`` (sizes rounded up), and ``logits [B, num_classes]`` float32 (float64 for a
          float64 ``dtype``) when ``num_classes`` is set.
        """
        if self.depth not in RESNET_CONFIGS:
            raise ValueError(f"depth: expected one of {sorted(RESNET_CONFIGS)}, got {self.depth}")
        if self.conv1x1 not in CONV1X1_MODES:
            raise ValueError(f"conv1x1: expected one of {CONV1X1_MODES}, got {self.conv1x1!r}")
        if self.conv3x3 not in CONV3X3_MODES:
            raise ValueError(f"conv3x3: expected one of {CONV3X3_MODES}, got {self.conv3x3!r}")
        if self.width < 1:
            raise ValueError(f"width: expected a positive channel count, got {self.width}")
        if images.ndim != 4:
            raise ValueError(f"images: expected [B, H, W, C], got shape {images.shape}")
        stages = num_stages(self.last_stage)
        if self.num_classes is not None and stages != len(STAGES):
            raise ValueError(f"num_classes: the fc classifier reads layer4; a ResNet with "
                             f"last_stage={self.last_stage!r} has none (set num_classes=None)")
        kind, blocks_per_stage = RESNET_CONFIGS[self.depth]
        block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
        dt, pdt = self.dtype, self.param_dtype

        x = StemConv(self.width, 2, self.conv3x3, dt, pdt, name="conv1")(images)
        x = nn.relu(_batch_norm(train, self.bn_momentum, "bn1", dt, pdt)(x))
        # Pads with -inf, like torch's MaxPool2d(3, 2, padding=1); pooling.max_pool has
        # nn.max_pool's forward and a gradient XLA:CPU computes 2-2.5x faster.
        x = pooling.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = {"stem": x}
        for k, num_blocks in enumerate(blocks_per_stage[:stages]):
            planes = self.width * 2 ** k
            for i in range(num_blocks):
                stride = 2 if (k > 0 and i == 0) else 1
                x = block_cls(planes, stride, dt, pdt, self.conv1x1, self.bn_momentum,
                              self.conv3x3,
                              name=f"layer{k + 1}_{i}")(x, train)
            features[f"layer{k + 1}"] = x

        if self.num_classes is not None:
            # The classifier runs in at least float32: it is tiny, and its logits
            # feed softmax / log-densities where bfloat16's 8-bit mantissa would show.
            head_dtype = jnp.promote_types(dt, jnp.float32)
            pooled = jnp.mean(x.astype(head_dtype), axis=(1, 2))
            features["logits"] = torch_linear(self.num_classes, pooled.shape[-1], "fc",
                                              head_dtype, pdt)(pooled)
        return features
