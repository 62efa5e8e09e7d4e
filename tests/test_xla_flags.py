"""kpn_jax.xla_flags: the default XLA flags run.py adds before JAX starts."""

import os
import subprocess
import sys

import pytest

from kpn_jax import xla_flags

FLAG = xla_flags.CPU_CONVOLUTION_FLAG


def test_adds_the_flag_on_a_measured_jaxlib_and_keeps_other_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_flags.with_default_flags(environ, "0.10.2")
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {FLAG}"
    environ = {}
    assert xla_flags.with_default_flags(environ, "0.10.7")
    assert environ["XLA_FLAGS"] == FLAG


@pytest.mark.parametrize("environ, version", [
    ({}, "0.11.2"),                                            # not measured: XLA might abort
    ({"KPN_JAX_DEFAULT_XLA_FLAGS": "0"}, "0.10.2"),            # opted out
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=default"}, "0.10.2"),  # user's choice
])
def test_leaves_the_environment_alone(environ, version):
    before = dict(environ)
    assert not xla_flags.with_default_flags(environ, version)
    assert environ == before


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
