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

Every convolution's parameter is ``kernel [kh, kw, in, out]`` with no bias (``nn.Conv``'s,
whichever convolution is injected). With
``last_stage='layer3'`` (say) the tree simply stops: no ``layer4_*``, no ``fc``.

BatchNorm is :class:`~kpn_jax.models.layers.BatchNorm`: the variables of
``flax.linen.BatchNorm``, with torch's running-variance update (unbiased, n/(n-1)).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpn_jax.models.layers import BatchNorm, kaiming_normal_fan_out, torch_linear

Dtype = Any
ModuleDef = Any

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


def feature_stride(name: str, stem_max_pool: bool = True) -> int:
    """Input pixels per cell of feature map ``name``; without the stem's max-pool every map
    is twice as fine (``layer3``: 8 instead of 16)."""
    return FEATURE_STRIDES[name] if stem_max_pool else FEATURE_STRIDES[name] // 2

# torch nn.BatchNorm2d: eps 1e-5, momentum 0.1 on the new value == flax momentum 0.9.
BN_EPSILON = 1e-5
# kernel size -> torchvision's explicit padding (flax 'SAME' would put a stride-2
# convolution's extra pixel on the other side).
_PAD = {k: ((k // 2, k // 2), (k // 2, k // 2)) for k in (1, 3, 7)}


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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; ``planes`` output channels (expansion 1).

    ``conv`` and ``norm`` are module factories with everything but the per-layer arguments
    bound (see :class:`ResNet`).
    """

    planes: int
    conv: ModuleDef
    norm: ModuleDef
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, Cin]`` -> ``[B, H/s, W/s, planes]``."""
        y = self.conv(self.planes, (3, 3), self.stride, padding=_PAD[3], name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.planes, (3, 3), padding=_PAD[3], name="conv2")(y)
        y = self.norm(name="bn2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            shortcut = self.conv(self.planes, (1, 1), self.stride, padding=_PAD[1],
                                 name="downsample_conv")(x)
            shortcut = self.norm(name="downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, torchvision v1.5) -> 1x1; ``4 * planes`` output channels."""

    planes: int
    conv: ModuleDef
    norm: ModuleDef
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, Cin]`` -> ``[B, H/s, W/s, 4 * planes]``."""
        out_channels = self.planes * BOTTLENECK_EXPANSION
        y = self.conv(self.planes, (1, 1), padding=_PAD[1], name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.planes, (3, 3), self.stride, padding=_PAD[3], name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(out_channels, (1, 1), padding=_PAD[1], name="conv3")(y)
        y = self.norm(name="bn3")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_channels:
            shortcut = self.conv(out_channels, (1, 1), self.stride, padding=_PAD[1],
                                 name="downsample_conv")(x)
            shortcut = self.norm(name="downsample_bn")(shortcut)
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
      bn_momentum: flax BatchNorm momentum (0.9 == torch momentum 0.1).
      last_stage: the last stage built and run (``'layer1'`` .. ``'layer4'``). A
        backbone whose user reads only ``layer3`` should stop there: in training its
        BatchNorm updates would keep XLA from pruning an unused ``layer4``, and
        weight decay would shrink its weights for nothing.
      conv: the convolution, a module factory called like ``nn.Conv`` (the default);
        :func:`kpn_jax.kernels.choose` gives the one for the backend. Its parameter
        must be ``kernel [kh, kw, in, out]``.
      max_pool: the stem's max-pool, called like ``nn.max_pool`` (the default).
      stem_max_pool: ``False`` leaves the stem's max-pool out (every map twice as fine,
        about four times the multiply-adds after the stem; no parameter changes), as
        torchvision's model with ``maxpool = nn.Identity()``.
    """

    depth: int = 50
    num_classes: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    width: int = 64
    bn_momentum: float = 0.9
    last_stage: str = "layer4"
    conv: ModuleDef = nn.Conv
    max_pool: Callable[..., jax.Array] = nn.max_pool
    stem_max_pool: bool = True

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Runs the network.

        Args:
          images: ``[B, H, W, Cin]``, already normalised.
          train: use batch statistics in BatchNorm and update ``batch_stats``
            (call ``apply`` with ``mutable=['batch_stats']``).

        Returns:
          ``stem`` ``[B, H/4, W/4, width]`` (after the max-pool), ``layer1`` (stride 4),
          ``layer2`` (8), ``layer3`` (16), ``layer4`` (32) up to ``last_stage`` (half
          these strides without ``stem_max_pool``: :func:`feature_stride`), all in
          ``dtype`` (sizes rounded up), and ``logits [B, num_classes]`` float32 (float64 for a
          float64 ``dtype``) when ``num_classes`` is set.
        """
        if self.depth not in RESNET_CONFIGS:
            raise ValueError(f"depth: expected one of {sorted(RESNET_CONFIGS)}, got {self.depth}")
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
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, kernel_init=kaiming_normal_fan_out)
        # Statistics reduced in float32 even for a bfloat16 ``dtype``; batch_stats float32;
        # running variance updated with the unbiased batch variance, as torch does.
        norm = functools.partial(BatchNorm, use_running_average=not train,
                                 momentum=self.bn_momentum, epsilon=BN_EPSILON, dtype=self.dtype,
                                 param_dtype=self.param_dtype)

        x = conv(self.width, (7, 7), 2, padding=_PAD[7], name="conv1")(images)
        x = nn.relu(norm(name="bn1")(x))
        if self.stem_max_pool:
            # Pads with -inf, like torch's MaxPool2d(3, 2, padding=1).
            x = self.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = {"stem": x}
        for k, num_blocks in enumerate(blocks_per_stage[:stages]):
            for i in range(num_blocks):
                stride = 2 if (k > 0 and i == 0) else 1
                x = block_cls(self.width * 2 ** k, conv, norm, stride,
                              name=f"layer{k + 1}_{i}")(x)
            features[f"layer{k + 1}"] = x

        if self.num_classes is not None:
            # The classifier runs in at least float32: it is tiny, and its logits
            # feed softmax / log-densities where bfloat16's 8-bit mantissa would show.
            head_dtype = jnp.promote_types(self.dtype, jnp.float32)
            pooled = jnp.mean(x.astype(head_dtype), axis=(1, 2))
            features["logits"] = torch_linear(self.num_classes, pooled.shape[-1], "fc",
                                              head_dtype, self.param_dtype)(pooled)
        return features
