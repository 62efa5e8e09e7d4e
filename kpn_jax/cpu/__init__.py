"""CPU speed-ups for XLA:CPU, an optional plug-in: nothing here changes what is computed.

The model takes its convolution and max-pool as injected pieces (``ResNet(conv=...,
max_pool=...)``); on a CPU backend :func:`kpn_jax.kernels.choose` injects these:

* :func:`conv_general_dilated` for ``nn.Conv(conv_general_dilated=...)``: a 1x1
  convolution becomes a strided slice and one 2-D matrix product, whose weight gradient
  XLA:CPU runs several times faster than the convolution's; everything else is XLA's
  convolution.
* :func:`onednn_conv_general_dilated`: the same, with float32 square convolutions (3x3,
  the 7x7 stem) and both their gradients through oneDNN (:mod:`kpn_jax.cpu.onednn`, the
  library PyTorch uses on CPU). Needs the ``cpu`` extra (``pip install "kpn-jax[cpu]"``)
  and a C++ compiler; the library is built on first use.
* :func:`kpn_jax.cpu.pooling.max_pool`: ``nn.max_pool``'s forward with a mask-based
  gradient that XLA:CPU computes 2-2.5x faster than select-and-scatter.
* :func:`compiler_options`: per-``jit`` XLA:CPU options (XLA's own convolution instead of
  YNNPACK's, whose weight gradients are slow), applied only where XLA accepts them.

Every piece computes the same function as the plain flax one, to float rounding, and
holds the same parameters (``kernel [kh, kw, in, out]``), so checkpoints move freely
between CPU and accelerators.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from kpn_jax.cpu.pooling import max_pool  # noqa: F401  (re-exported: the injected max-pool)

# nn.Conv's dimension numbers for a [B, H, W, C] input and [kh, kw, in, out] kernel.
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))

# XLA:CPU (jaxlib 0.10) runs convolutions on YNNPACK by default; its weight gradients are
# about 2x slower than XLA's Eigen path, which leaving INDIVIDUAL_CONVOLUTION out of the
# list selects (the other two entries are the defaults).
_YNN_FUSION_OPTION = {"xla_cpu_experimental_ynn_fusion_type":
                      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def _plain_2d(lhs: jax.Array, rhs: jax.Array, lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count: int) -> bool:
    """Whether the call is an undilated, ungrouped 2-D NHWC/HWIO convolution."""
    return (lhs.ndim == 4 and rhs.ndim == 4 and feature_group_count == 1
            and dimension_numbers == _NHWC
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1))))


def _conv1x1(lhs: jax.Array, rhs: jax.Array, strides: Sequence[int]) -> jax.Array:
    """A 1x1 convolution as ``x[:, ::s, ::s]`` and ``[B*H*W, in] @ [in, out]``.

    Two dimensions, not an einsum over four: the weight gradient is then a product
    contracting dim 0 of both operands, which XLA:CPU runs on them as they lie; the 4-D
    form makes it materialise a transposed copy of the cotangent.
    """
    stride_h, stride_w = strides
    x = lhs[:, ::stride_h, ::stride_w, :]
    batch, height, width, channels = x.shape
    y = jnp.dot(x.reshape(batch * height * width, channels), rhs[0, 0])
    return y.reshape(batch, height, width, rhs.shape[-1])


def _convolution(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None, *,
                 use_onednn: bool) -> jax.Array:
    strides = tuple(window_strides)
    if _plain_2d(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count):
        pads = tuple(tuple(p) for p in padding) if not isinstance(padding, str) else padding
        if rhs.shape[:2] == (1, 1) and pads in ("SAME", "VALID", ((0, 0), (0, 0))):
            return _conv1x1(lhs, rhs, strides)
        square = (rhs.shape[0] == rhs.shape[1] and strides[0] == strides[1]
                  and not isinstance(pads, str) and len({p for pair in pads for p in pair}) == 1)
        if use_onednn and square and lhs.dtype == rhs.dtype == jnp.float32:
            from kpn_jax.cpu import onednn

            return onednn.convolution(lhs, rhs, strides[0], pads[0][0])
    return lax.conv_general_dilated(lhs, rhs, strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation,
                                    dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None) -> jax.Array:
    """``lax.conv_general_dilated`` with 1x1 convolutions as matrix products.

    A drop-in for ``nn.Conv(conv_general_dilated=...)``: ``lhs [B, H, W, Cin]``, ``rhs
    [kh, kw, Cin, Cout]``; every other case is ``lax.conv_general_dilated`` itself.
    """
    return _convolution(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, precision, use_onednn=False)


def onednn_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                                precision=None) -> jax.Array:
    """:func:`conv_general_dilated` with float32 square-kernel convolutions (equal strides,
    equal padding on every side) through oneDNN (:func:`kpn_jax.cpu.onednn.convolution`)."""
    return _convolution(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, precision, use_onednn=True)


@functools.cache
def compiler_options() -> dict[str, Any]:
    """The per-``jit`` XLA:CPU options of this plug-in, or ``{}`` where this jaxlib rejects
    them (the option is experimental: its name and values come and go between versions)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=_YNN_FUSION_OPTION).lower(
            jnp.zeros((1,), jnp.float32)).compile()
    except Exception:  # noqa: BLE001  (any rejection means: leave XLA's defaults alone)
        return {}
    return dict(_YNN_FUSION_OPTION)


def has_avx512() -> bool:
    """Whether this x86-64 Linux CPU has AVX-512 (``avx512f`` in ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False
