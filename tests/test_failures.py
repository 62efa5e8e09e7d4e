"""Failures in one line: a full disk names the path and the step the same command resumes
from; the library's tracebacks go to WORKDIR/run.log, not the console."""

import errno
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kpn_jax import failures

REPO = Path(__file__).resolve().parents[1]
# As orbax/TensorStore word a failed checkpoint write (shortened).
TENSORSTORE_FULL = ('RESOURCE_EXHAUSTED: Error writing "params.bias/0" in OCDBT database at '
                    'local file "/data/w/checkpoints/best/16.orbax-checkpoint-tmp/d/": Failed '
                    'writing: "/data/w/checkpoints/best/16.orbax-checkpoint-tmp/d/x" '
                    "[OS error: No space left on device] [os_error_code='28'] "
                    "[source locations='tensorstore/internal/os/file_util_posix.cc:327']")


def line_of(result) -> str:
    """The one ``error:`` line of a run's stderr ('' when there is none)."""
    found = re.search(r"error: .*", result.stderr)
    return found.group(0) if found else ""


def _workdir_with_checkpoints(tmp_path, *names):
    for name in names:
        (tmp_path / "checkpoints" / "latest" / name).mkdir(parents=True)
    return tmp_path


def test_a_full_disk_in_a_storage_message_names_the_path_and_the_resume_step(tmp_path):
    workdir = _workdir_with_checkpoints(tmp_path, "4", "8", "12.orbax-checkpoint-tmp")
    try:
        try:
            raise OSError("commit failed")
        except OSError:
            raise ValueError(TENSORSTORE_FULL) from None
    except ValueError as error:
        line = failures.one_line(error, workdir, "/data/w/run.log")
    assert line == ("no space left on the device of /data/w/checkpoints/best/16.orbax-checkpoint"
                    "-tmp/d/: free space, then run the same command: it resumes from step 8 "
                    "(details: /data/w/run.log)")


def test_os_errors_and_others(tmp_path):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    assert failures.one_line(full, tmp_path) == (
        f"no space left on the device of {tmp_path / 'metrics.jsonl'}: free space, then run the "
        f"same command: it starts afresh (no checkpoint was completed)")
    denied = PermissionError(errno.EACCES, "Permission denied", "/ro/w/config.json")
    assert failures.one_line(denied) == "Permission denied: /ro/w/config.json"
    wrapped = RuntimeError("step failed")
    wrapped.__cause__ = ValueError("inner")
    assert failures.one_line(wrapped) == "RuntimeError: step failed"


@pytest.mark.slow
def test_a_run_that_fills_its_disk_ends_in_one_line(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=9m", "tmpfs",
                              str(mount_point)], capture_output=True)
    if mounted.returncode:
        pytest.skip("mounting a small tmpfs needs root with CAP_SYS_ADMIN")
    try:
        workdir = mount_point / "w"
        result = subprocess.run(
            [sys.executable, str(REPO / "run.py"), f"--config={REPO / 'configs' / 'demo.py'}",
             f"--workdir={workdir}", f"--config.data_dir={tmp_path / 'data'}",
             "--config.synthetic.image_size=64", "--config.synthetic.num_train=64",
             "--config.synthetic.num_validation=16", "--config.synthetic.num_test=16",
             "--config.synthetic.num_unlabeled=32", "--config.num_epochs=8",
             "--config.batch_size=16", "--config.unlabeled_batch_size=16",
             "--config.log_every_steps=4", "--config.checkpoint_every_steps=4",
             "--config.eval_every_epochs=1"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert result.returncode == 1, result.stderr[-3000:]
        # orbax's failed-write tracebacks and TensorStore's late "Event loop is closed" ones
        # (unraisable) are in run.log, not on the console.
        assert "RESOURCE_EXHAUSTED" not in result.stderr.replace(line_of(result), "")
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        # (Found anywhere in a line: a background thread's log line may share its start.)
        lines = re.findall(r"error: .*", result.stderr)
        assert len(lines) == 1, result.stderr[-3000:]
        line = lines[0]
        assert line.startswith(f"error: no space left on the device of {workdir}")
        assert "free space, then run the same command: it resumes from step " in line
        assert (workdir / "run.log").exists()
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True)
