"""Which convolution, max-pool and compiler options the model runs with on this backend.

The models are platform-neutral: they take ``conv`` (an ``nn.Conv``-like module factory)
and ``max_pool`` as injected pieces, defaulting to flax's. :func:`choose` is the one place
that picks them for a backend, from ``config.model.kernels``:

=========  ===============================================================================
``xla``    flax's ``nn.Conv`` and ``nn.max_pool``: what GPUs and TPUs run.
``cpu``    the CPU plug-in (:mod:`kpn_jax.cpu`) without oneDNN: 1x1 convolutions as matrix
           products, a faster max-pool gradient, XLA:CPU compiler options.
``onednn`` ``cpu`` plus float32 3x3/7x7 convolutions through oneDNN (the ``cpu`` extra).
``auto``   ``xla`` on GPU/TPU; on CPU, ``onednn`` where it was measured fastest (a single
           device whose CPU has AVX-512, the extra installed), else ``cpu``.
=========  ===============================================================================

Every choice computes the same function with the same parameters, to float rounding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
from absl import logging

KERNEL_CHOICES: tuple[str, ...] = ("auto", "xla", "cpu", "onednn")


class Kernels(NamedTuple):
    """What :func:`choose` picked.

    Attributes:
      name: ``'xla'``, ``'cpu'`` or ``'onednn'``.
      conv: a module factory used like ``nn.Conv`` (``conv(features, kernel_size, ...)``).
      max_pool: used like ``nn.max_pool(x, window, strides, padding)``.
      compiler_options: for ``jax.jit(..., compiler_options=...)``.
    """

    name: str
    conv: Callable[..., nn.Module]
    max_pool: Callable[..., Any]
    compiler_options: dict[str, Any]


XLA_KERNELS = Kernels("xla", nn.Conv, nn.max_pool, {})


def _onednn_availability() -> tuple[bool, str]:
    from kpn_jax.cpu import onednn

    return onednn.availability()


def choose(requested: str, backend: str, num_devices: int = 1,
           onednn_availability: Callable[[], tuple[bool, str]] = _onednn_availability,
           has_avx512: Callable[[], bool] | None = None) -> Kernels:
    """The kernels for ``config.model.kernels`` on ``backend``.

    Args:
      requested: one of :data:`KERNEL_CHOICES`.
      backend: ``jax.default_backend()``.
      num_devices: ``jax.device_count()`` (all processes). oneDNN's custom calls have no
        sharding rule: with several devices XLA would gather every batch onto each one.
      onednn_availability: ``() -> (ok, why_not)``; builds the library on first use.
      has_avx512: ``() -> bool``; default :func:`kpn_jax.cpu.has_avx512`.

    Raises:
      ValueError: an unknown choice, or a CPU choice on another backend or oneDNN on
        several devices.
      kpn_jax.cpu.onednn.OneDnnUnavailable: ``'onednn'`` asked for and not usable here.
    """
    if requested not in KERNEL_CHOICES:
        raise ValueError(f"model.kernels: expected one of {KERNEL_CHOICES}, got {requested!r}")
    if requested == "xla" or (requested == "auto" and backend != "cpu"):
        return XLA_KERNELS
    if backend != "cpu":
        raise ValueError(f"model.kernels={requested!r} runs on the CPU backend, not {backend!r}; "
                         f"use 'auto' or 'xla'")
    from kpn_jax import cpu

    has_avx512 = has_avx512 or cpu.has_avx512
    use_onednn = requested == "onednn"
    if requested == "onednn":
        if num_devices > 1:
            raise ValueError(f"model.kernels='onednn' runs on a single device (its custom calls "
                             f"cannot be sharded), not {num_devices}; use 'auto' or 'cpu'")
        ok, why_not = onednn_availability()
        if not ok:
            from kpn_jax.cpu import onednn

            raise onednn.OneDnnUnavailable(f"model.kernels='onednn': {why_not}")
    elif requested == "auto" and num_devices == 1 and has_avx512():
        # On AVX2-only CPUs oneDNN's convolutions were measured slower than XLA's.
        use_onednn, why_not = onednn_availability()
        if not use_onednn:
            logging.info("model.kernels='auto': oneDNN convolutions not used (%s)", why_not)
    conv_fn = cpu.onednn_conv_general_dilated if use_onednn else cpu.conv_general_dilated
    return Kernels("onednn" if use_onednn else "cpu",
                   functools.partial(nn.Conv, conv_general_dilated=conv_fn), cpu.max_pool,
                   cpu.compiler_options())


def for_config(config) -> Kernels:
    """:func:`choose` for ``config.model.kernels`` (``'auto'`` when absent, as in configs
    saved before the field existed) on this process's backend and devices."""
    return choose(config.model.get("kernels", "auto"), jax.default_backend(), jax.device_count())
