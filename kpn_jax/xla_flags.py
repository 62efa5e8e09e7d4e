"""The XLA flags ``run.py`` adds by default, before JAX starts its backend.

On XLA:CPU in jaxlib 0.10, convolutions run on YNNPACK; their weight gradients are
slow there. ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` sends
convolutions back to XLA's Eigen path: the ResNet-50 KPN + CL train step at 320 px,
batch 8 went from 4.70 to 3.62 s on this project's idle 2-core machine
(benchmarks/README.md, section 3). XLA aborts at start-up on a flag it does not know,
and ``experimental`` flags come and go, so the flag is added only for the jaxlib
versions it was measured on. This module imports nothing from JAX.
"""

from __future__ import annotations

import os
from typing import MutableMapping

CPU_CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
# jaxlib version prefixes on which CPU_CONVOLUTION_FLAG exists and was measured to help.
MEASURED_JAXLIB_PREFIXES = ("0.10.",)
OPT_OUT_VARIABLE = "KPN_JAX_DEFAULT_XLA_FLAGS"


def with_default_flags(environ: MutableMapping[str, str], jaxlib_version: str) -> bool:
    """Adds :data:`CPU_CONVOLUTION_FLAG` to ``environ['XLA_FLAGS']`` where it is known to help.

    Nothing changes when ``environ[OPT_OUT_VARIABLE] == '0'``, when ``XLA_FLAGS``
    already sets ``xla_cpu_experimental_ynn_fusion_type`` (the user's choice wins), or
    when ``jaxlib_version`` is not one of :data:`MEASURED_JAXLIB_PREFIXES`.

    Returns:
      Whether the flag was added.
    """
    if environ.get(OPT_OUT_VARIABLE, "1") == "0":
        return False
    current = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in current:
        return False
    if not jaxlib_version.startswith(MEASURED_JAXLIB_PREFIXES):
        return False
    environ["XLA_FLAGS"] = f"{current} {CPU_CONVOLUTION_FLAG}".strip()
    return True


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
    """:func:`with_default_flags` for this process's environment and installed jaxlib."""
    try:
        from jaxlib import version
    except ImportError:
        return False
    return with_default_flags(os.environ if environ is None else environ, version.__version__)
