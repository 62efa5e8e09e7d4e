"""What two runs of one training must agree on: ``metrics.jsonl`` (without timings),
``checkpoints/best.json`` and ``report/results.json``, compared within float tolerance;
and the environment of trainings that tests start as processes."""

import json
import os

import numpy as np

TIMING_KEYS = ("train/images_per_sec", "train/input_wait_fraction",
               "train/transfer_wait_fraction")


def process_env(compilation_cache, **extra) -> dict:
    """The environment of a training a test starts as a process: CPU, and one persistent
    JAX compilation cache for all of the test's processes (each would otherwise compile
    the same steps again: half of a tiny run's time). A cached executable is the one a
    compile gives, so the runs' artefacts are the same with or without it."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def xla_flags_with_devices(device_count: int) -> str:
    """The inherited ``XLA_FLAGS`` (the tests' compile flags among them) plus a count of
    fake CPU devices, for a process a multi-device test starts."""
    return (os.environ.get("XLA_FLAGS", "") +
            f" --xla_force_host_platform_device_count={device_count}")


def artefacts(read) -> dict:
    """The artefacts of a workdir whose files ``read(relative name)`` returns as text."""
    records = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
               for line in read("metrics.jsonl").splitlines()]
    return {"best": json.loads(read("checkpoints/best.json")),
            "results": json.loads(read("report/results.json")), "metrics": records}


def assert_close(a, b, path="") -> None:
    """Equal structure, floats within rtol 1e-3 / atol 1e-4, anything else equal."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for key in a:
            assert_close(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=path)
    else:
        assert a == b, path
