"""Data parallelism: 1 device vs 2 fake CPU devices vs 2 processes give one train step's result."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.run_artefacts import xla_flags_with_devices

pytestmark = pytest.mark.slow  # multi-device and multi-process runs

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "one_train_step.py"


def _env(device_count: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags_with_devices(device_count)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(out: Path, device_count: int, extra=()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *extra], env=_env(device_count),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(process: subprocess.Popen, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]


def _load(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _assert_same(a: dict, b: dict):
    keys = sorted(k for k in a if not k.startswith("__"))
    assert keys == sorted(k for k in b if not k.startswith("__"))
    assert len(keys) > 10
    for key in keys:
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-5, err_msg=key)
    np.testing.assert_allclose(a["__loss__"], b["__loss__"], rtol=1e-5)


@pytest.fixture(scope="module")
def single_device(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one") / "params.npz"
    _wait(_run(out, 1))
    result = _load(out)
    assert int(result["__devices__"]) == 1
    return result


def test_two_fake_devices_match_one_device(single_device, tmp_path):
    out = tmp_path / "params.npz"
    _wait(_run(out, 2))
    result = _load(out)
    assert int(result["__devices__"]) == 2
    _assert_same(single_device, result)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(single_device, tmp_path):
    out = tmp_path / "params.npz"
    port = str(_free_port())
    workers = [_run(out, 1, ["--process_id", str(i), "--num_processes", "2", "--port", port])
               for i in range(2)]
    for worker in workers:
        _wait(worker)
    result = _load(out)
    assert int(result["__devices__"]) == 2
    _assert_same(single_device, result)
