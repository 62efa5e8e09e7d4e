"""kpn_jax.malloc_tunables: the glibc settings run.py restarts itself with."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from kpn_jax import malloc_tunables

TUNABLES = ":".join(malloc_tunables.TUNABLES)


def test_adds_the_tunables_on_glibc_and_keeps_other_tunables():
    environ = {}
    assert malloc_tunables.with_tunables(environ, "glibc")
    assert environ["GLIBC_TUNABLES"] == TUNABLES
    environ = {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}
    assert malloc_tunables.with_tunables(environ, "glibc")
    assert environ["GLIBC_TUNABLES"] == f"glibc.cpu.hwcaps=-AVX512F:{TUNABLES}"


@pytest.mark.parametrize("environ, libc", [
    ({}, ""),                                                     # not glibc (macOS, musl)
    ({"KPN_JAX_MALLOC_TUNABLES": "0"}, "glibc"),                  # opted out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "glibc"),      # the user's own choice
    ({"GLIBC_TUNABLES": TUNABLES}, "glibc"),                      # already restarted
])
def test_leaves_the_environment_alone(environ, libc):
    before = dict(environ)
    assert not malloc_tunables.with_tunables(environ, libc)
    assert environ == before


def test_restart_argv_keeps_interpreter_options_and_arguments():
    assert malloc_tunables.restart_argv(["python3", "-X", "dev", "run.py", "--mode=train"],
                                        "/venv/bin/python") == [
        "/venv/bin/python", "-X", "dev", "run.py", "--mode=train"]


# A 256 MiB buffer is malloc'ed, written, freed and malloc'ed and written again, as XLA does
# with a step's temporaries; the child prints the page faults of the second round.
_CHILD = textwrap.dedent("""
    import ctypes, resource, sys
    print("started", flush=True)
    from kpn_jax import malloc_tunables
    malloc_tunables.reexec_with_tunables()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20
    def touch():
        pointer = libc.malloc(size)
        ctypes.memset(pointer, 1, size)
        return pointer
    libc.free(touch())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    pointer = touch()
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
    libc.free(pointer)
""")


def _run_child(opt_out: bool) -> tuple[int, int]:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    environ["KPN_JAX_MALLOC_TUNABLES"] = "0" if opt_out else "1"
    environ["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(malloc_tunables.__file__))),
         environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _CHILD], env=environ, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    faults = int(next(line for line in lines if line.startswith("faults")).split()[1])
    return lines.count("started"), faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc tunables only")
def test_the_restarted_process_reuses_freed_memory_without_page_faults():
    starts, faults = _run_child(opt_out=False)
    starts_default, faults_default = _run_child(opt_out=True)
    assert (starts, starts_default) == (2, 1)  # one restart, and only with the tunables
    # glibc's default gives the freed buffer back to the kernel: every page faults again
    # (65,536 4 KiB pages; fewer where the kernel backs it with huge pages).
    pages = (256 << 20) // 4096
    assert faults < pages // 100, (faults, faults_default)
    assert faults_default > 10 * max(faults, 1), (faults, faults_default)
