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
