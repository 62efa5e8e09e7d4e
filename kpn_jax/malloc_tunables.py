"""glibc malloc settings that ``run.py`` starts itself with: keep freed memory for reuse.

XLA:CPU allocates each step's temporaries (about 2 GB for the ResNet-50 KPN + CL train
step at 320 px, batch 8) with ``malloc`` in its worker threads. glibc serves an allocation
that large with a fresh ``mmap`` and returns it with ``munmap`` when the step ends, so every
step touches about 550,000 new 4 KiB pages: the kernel zeroes each on its first write,
1.1-1.3 s of system CPU per step on this project's 2-core machine, 20 % of the step's wall
time (benchmarks/README.md, section 9). With :data:`TUNABLES` glibc serves every
allocation from one heap that it never gives back, so the second step onwards reuses warm
pages: no page faults, the same numbers, the process keeps its peak memory.

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so :func:`reexec_with_tunables`
restarts the interpreter (``os.execve``, same pid, same arguments) with them set. Nothing
happens off glibc, when ``KPN_JAX_MALLOC_TUNABLES=0``, or when ``GLIBC_TUNABLES`` already
sets any ``glibc.malloc.*`` tunable (the user's choice wins, and it stops a second restart).
This module imports nothing from JAX.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import MutableMapping, Sequence

# One arena (a thread's own arena cannot grow past 64 MiB and would mmap anyway), no mmap,
# and a trim threshold (1 TiB) that never releases the heap's top back to the kernel.
TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
            "glibc.malloc.trim_threshold=1099511627776")
OPT_OUT_VARIABLE = "KPN_JAX_MALLOC_TUNABLES"
VARIABLE = "GLIBC_TUNABLES"


def with_tunables(environ: MutableMapping[str, str], libc: str) -> bool:
    """Adds :data:`TUNABLES` to ``environ['GLIBC_TUNABLES']`` where they apply.

    Args:
      environ: the environment to change in place.
      libc: the C library's name, as ``platform.libc_ver()[0]`` gives it.

    Returns:
      Whether anything was added (then the process must restart for glibc to read it).
    """
    if libc != "glibc" or environ.get(OPT_OUT_VARIABLE, "1") == "0":
        return False
    current = environ.get(VARIABLE, "")
    if "glibc.malloc." in current:
        return False
    environ[VARIABLE] = ":".join([current, *TUNABLES] if current else TUNABLES)
    return True


def restart_argv(orig_argv: Sequence[str], executable: str) -> list[str]:
    """The command line that starts this interpreter again exactly as it was started.

    ``orig_argv`` is ``sys.orig_argv`` (interpreter options, ``-m module`` or the script,
    then its arguments); only the interpreter itself is replaced by ``executable``.
    """
    return [executable, *orig_argv[1:]]


def reexec_with_tunables(environ: MutableMapping[str, str] | None = None) -> None:
    """Restarts this process with :data:`TUNABLES` when :func:`with_tunables` adds them.

    Call it first thing in a program's ``__main__`` block, before JAX starts its backend
    and before any work that a restart would repeat. Returns only when nothing changed.
    """
    environ = os.environ if environ is None else environ
    if not with_tunables(environ, platform.libc_ver()[0]):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, restart_argv(sys.orig_argv, sys.executable), environ)
