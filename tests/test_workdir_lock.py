"""One training run per workdir: a live holder is named and refused, a dead one's lock is
taken over, a lock from another host is a lease the holder renews."""

import json
import socket
import subprocess
import sys
import time

import pytest

from kpn_jax import failures, workdir_lock


def _write_lock(workdir, **record):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(record))


def test_a_live_run_on_this_host_is_named_and_refused(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, host=socket.gethostname(), pid=sleeper.pid, started=time.time(),
                    renewed=time.time())
        with pytest.raises(workdir_lock.WorkdirInUse,
                           match=rf"in use by another run: host {socket.gethostname()}, "
                                 rf"process {sleeper.pid}, started 20") as refused:
            workdir_lock.WorkdirLock(tmp_path).acquire()
        # The console's one line (run.py) says so too, not the lock file's "File exists".
        line = failures.one_line(refused.value, tmp_path)
        assert line.startswith("WorkdirInUse: ") and "in use by another run" in line, line
    finally:
        sleeper.kill()
        sleeper.wait()
    # The same holder, now dead: its lock is taken over.
    lock = workdir_lock.WorkdirLock(tmp_path).acquire()
    assert lock.took_over["pid"] == sleeper.pid
    assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == lock.record["pid"]
    lock.release()
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_a_second_run_in_the_same_process_and_the_release(tmp_path):
    first = workdir_lock.WorkdirLock(tmp_path).acquire()
    with pytest.raises(workdir_lock.WorkdirInUse, match="in use by another run"):
        workdir_lock.WorkdirLock(tmp_path).acquire()
    first.release()
    with workdir_lock.held(tmp_path) as again:
        assert again.took_over is None
    assert not (tmp_path / workdir_lock.LOCK_FILE).exists()


def test_another_hosts_lock_is_a_lease(tmp_path):
    now = time.time()
    _write_lock(tmp_path, host="other-host", pid=1, started=now - 7200, renewed=now - 30)
    with pytest.raises(workdir_lock.WorkdirInUse, match="host other-host, process 1"):
        workdir_lock.WorkdirLock(tmp_path).acquire()
    _write_lock(tmp_path, host="other-host", pid=1, started=now - 7200,
                renewed=now - workdir_lock.LEASE_SECONDS - 1)
    lock = workdir_lock.WorkdirLock(tmp_path).acquire()
    assert lock.took_over["host"] == "other-host"
    lock.release()


def test_the_holder_renews_its_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "RENEW_SECONDS", 0.05)
    lock = workdir_lock.WorkdirLock(tmp_path).acquire()
    first = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["renewed"]
    deadline = time.time() + 10
    while json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["renewed"] == first:
        assert time.time() < deadline, "the lease was not renewed"
        time.sleep(0.05)
    lock.release()


@pytest.mark.slow
def test_training_refuses_a_workdir_in_use(tmp_path):
    from kpn_jax import train
    from tests.test_train import tiny_config

    with workdir_lock.held(tmp_path / "w"):
        with pytest.raises(workdir_lock.WorkdirInUse, match="in use by another run"):
            train.train_and_evaluate(tiny_config(str(tmp_path / "data"), max_steps=1),
                                     str(tmp_path / "w"))
    assert not (tmp_path / "w" / "config.json").exists()   # refused before writing anything
