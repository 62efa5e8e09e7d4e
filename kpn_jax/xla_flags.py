"""The XLA flags ``run.py`` adds by default, before JAX starts its backend.

On XLA:CPU in jaxlib 0.10, convolutions run on YNNPACK; their weight gradients are
slow there. ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` sends
convolutions back to XLA's Eigen path: the ResNet-50 KPN + CL train step at 320 px,
batch 8 went from 4.70 to 3.62 s on this project's idle 2-core machine
(benchmarks/README.md, section 3).

On a process with at most two CPUs, ``--xla_cpu_multi_thread_eigen=false`` runs each
Eigen convolution on one thread; XLA still runs independent operations (a layer's input
and weight gradients, say) side by side on its two worker threads, without Eigen's
per-operation fork and join. On the 2-core machine it made the ResNet-50 step 2.6 %
faster (11 alternating process pairs) and the demo's ResNet-18 step 7 % faster, with the
same numbers (benchmarks/README.md, section 3). With more CPUs Eigen's own threads are
what keeps them busy, so the flag is left off there; it was not measured beyond two.

XLA aborts at start-up on a flag it does not know, and ``experimental`` flags come and
go, so the flags are added only for the jaxlib versions they were measured on, each only
when ``XLA_FLAGS`` does not already set it. This module imports nothing from JAX.
"""

from __future__ import annotations

import os
from typing import MutableMapping

CPU_CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
SINGLE_THREADED_EIGEN_FLAG = "--xla_cpu_multi_thread_eigen=false"
# SINGLE_THREADED_EIGEN_FLAG is added where the process may use at most this many CPUs.
SINGLE_THREADED_EIGEN_MAX_CPUS = 2
# jaxlib version prefixes on which the flags exist and were measured to help.
MEASURED_JAXLIB_PREFIXES = ("0.10.",)
OPT_OUT_VARIABLE = "KPN_JAX_DEFAULT_XLA_FLAGS"


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0].lstrip("-")


def default_flags(num_cpus: int) -> tuple[str, ...]:
    """The flags measured to help on a process that may use ``num_cpus`` CPUs."""
    if num_cpus <= SINGLE_THREADED_EIGEN_MAX_CPUS:
        return CPU_CONVOLUTION_FLAG, SINGLE_THREADED_EIGEN_FLAG
    return (CPU_CONVOLUTION_FLAG,)


def with_default_flags(environ: MutableMapping[str, str], jaxlib_version: str,
                       num_cpus: int) -> bool:
    """Adds :func:`default_flags` to ``environ['XLA_FLAGS']`` where they are known to help.

    Nothing changes when ``environ[OPT_OUT_VARIABLE] == '0'`` or when ``jaxlib_version``
    is not one of :data:`MEASURED_JAXLIB_PREFIXES`; a flag whose name ``XLA_FLAGS``
    already mentions is left to the user's setting.

    Returns:
      Whether any flag was added.
    """
    if environ.get(OPT_OUT_VARIABLE, "1") == "0":
        return False
    if not jaxlib_version.startswith(MEASURED_JAXLIB_PREFIXES):
        return False
    current = environ.get("XLA_FLAGS", "")
    added = [flag for flag in default_flags(num_cpus) if _flag_name(flag) not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return bool(added)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
    """:func:`with_default_flags` for this process's environment, installed jaxlib and CPUs."""
    try:
        from jaxlib import version
    except ImportError:
        return False
    return with_default_flags(os.environ if environ is None else environ, version.__version__,
                              usable_cpus())
