"""kpn_jax.xla_flags: the default XLA flags run.py adds before JAX starts."""

import os
import subprocess
import sys

import pytest

from kpn_jax import xla_flags

FLAG = xla_flags.CPU_CONVOLUTION_FLAG
EIGEN = xla_flags.SINGLE_THREADED_EIGEN_FLAG


def test_adds_the_flags_on_a_measured_jaxlib_and_keeps_other_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_flags.with_default_flags(environ, "0.10.2", num_cpus=16)
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}"
    environ = {}
    assert xla_flags.with_default_flags(environ, "0.10.7", num_cpus=16)
    assert environ["XLA_FLAGS"] == FLAG


@pytest.mark.parametrize("num_cpus", [1, 2])
def test_single_threaded_eigen_only_on_small_machines(num_cpus):
    environ = {}
    assert xla_flags.with_default_flags(environ, "0.10.2", num_cpus=num_cpus)
    assert environ["XLA_FLAGS"] == f"{FLAG} {EIGEN}"
    environ = {}
    assert xla_flags.with_default_flags(environ, "0.10.2", num_cpus=3)
    assert "multi_thread_eigen" not in environ["XLA_FLAGS"]


def test_each_flag_the_user_sets_is_left_to_the_user():
    environ = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}
    assert xla_flags.with_default_flags(environ, "0.10.2", num_cpus=2)
    assert environ["XLA_FLAGS"] == f"--xla_cpu_multi_thread_eigen=true {FLAG}"
    environ = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=default"}
    assert xla_flags.with_default_flags(environ, "0.10.2", num_cpus=2)
    assert environ["XLA_FLAGS"] == f"--xla_cpu_experimental_ynn_fusion_type=default {EIGEN}"


@pytest.mark.parametrize("environ, version", [
    ({}, "0.11.2"),                                            # not measured: XLA might abort
    ({"KPN_JAX_DEFAULT_XLA_FLAGS": "0"}, "0.10.2"),            # opted out
    ({"XLA_FLAGS": f"--xla_cpu_experimental_ynn_fusion_type=default "
                   f"--xla_cpu_multi_thread_eigen=true"}, "0.10.2"),  # the user's choices
])
@pytest.mark.parametrize("num_cpus", [2, 16])
def test_leaves_the_environment_alone(environ, version, num_cpus):
    before = dict(environ)
    assert not xla_flags.with_default_flags(environ, version, num_cpus=num_cpus)
    assert environ == before


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_apply_defaults_counts_the_cpus_the_process_may_use():
    """A process pinned to one CPU gets the single-threaded Eigen flag (jaxlib 0.10 only)."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from kpn_jax import xla_flags; environ = {}; xla_flags.apply_defaults(environ); "
            "print(xla_flags.usable_cpus(), environ.get('XLA_FLAGS', ''))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    cpus, _, flags = result.stdout.strip().partition(" ")
    assert cpus == "1"
    from jaxlib import version
    if version.__version__.startswith(xla_flags.MEASURED_JAXLIB_PREFIXES):
        assert flags == f"{FLAG} {EIGEN}"
    else:
        assert flags == ""


def test_this_jaxlib_accepts_the_flags_it_is_given():
    """XLA aborts on an unknown flag: start a backend with exactly what run.py would set."""
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    added = xla_flags.apply_defaults(environ)
    if not added:
        pytest.skip("this jaxlib gets no default flags")
    result = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"],
                            env=environ, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cpu" in result.stdout.lower()
