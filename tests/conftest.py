"""Test-wide settings, applied before JAX is imported by any test module."""

import os
import tempfile

# One persistent XLA compilation cache for the whole run, shared with the
# subprocesses that tests start: the same tiny train step is compiled by many
# tests, and on a 2-core CI machine compilation dominates their time.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "kpn_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The tests compile many tiny programs and run each a few times, so XLA:CPU is asked for
# quick compiles rather than fast code: no LLVM optimisation and the older elemental
# emitters, which together compile a tiny training about three times faster (what CI's
# cold cache pays for), with the same operations and rounding rules (no fast-math).
# Inherited by the processes the tests start; KPN_JAX_TEST_OPTIMIZED_XLA=1 tests the
# default optimised code instead.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true "
                          "--xla_cpu_use_fusion_emitters=false")
if os.environ.get("KPN_JAX_TEST_OPTIMIZED_XLA") != "1":
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_XLA_FLAGS]))
