"""One training run per workdir: ``workdir/run.lock`` names the run that holds it.

A scheduler may requeue a job while its old copy still runs, and a user may start the same
command in a second terminal; two runs writing one workdir interleave their metrics and
break each other's checkpoints. The lock file holds the holder's host, process id and
start time, and a ``renewed`` time the holder refreshes every :data:`RENEW_SECONDS`.

A lock is taken over when its holder is gone: on the same host, when its process no longer
exists; from another host (a shared file system), when it was not renewed for
:data:`LEASE_SECONDS`. Creation is atomic: ``O_EXCL`` on local and POSIX shared file
systems, and on Google Cloud Storage (``gs://`` workdirs) an upload with the
``ifGenerationMatch=0`` precondition, which the service refuses when the object exists.
(The storage stand-in the tests run ignores that precondition, so there only the
sequential cases are tested: a live holder refuses a second run, a dead one's lock is
taken over.)
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time

from kpn_jax import storage

LOCK_FILE = "run.lock"
RENEW_SECONDS = 60.0
LEASE_SECONDS = 600.0


class WorkdirInUse(ValueError):
    """Another live run holds the workdir."""


def _now_text(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).isoformat(timespec="seconds")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def holder_alive(record: dict, now: float, host: str) -> bool:
    """Whether the run described by ``record`` may still be writing."""
    if record.get("host") == host:
        return _process_exists(int(record.get("pid", -1)))
    return now - float(record.get("renewed", 0.0)) < LEASE_SECONDS


class WorkdirLock:
    """Holds ``workdir/run.lock`` until :meth:`release`; renews it in a daemon thread."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = storage.path(workdir) / LOCK_FILE
        self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": time.time(), "renewed": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None

    def acquire(self) -> "WorkdirLock":
        """Takes the lock, or raises :class:`WorkdirInUse` naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race to take over a dead run's lock is tried again
            try:
                storage.create_exclusive(self.path, json.dumps(self.record))
            except FileExistsError:
                existing = self._read()
                if existing is not None and holder_alive(existing, time.time(),
                                                         self.record["host"]):
                    raise WorkdirInUse(
                        f"{self.path.parent} is in use by another run: host "
                        f"{existing.get('host')}, process {existing.get('pid')}, started "
                        f"{_now_text(float(existing.get('started', 0)))}; wait for it to end, "
                        f"stop it, or use another --workdir") from None
                self.took_over = existing
                self.path.unlink(missing_ok=True)
                continue
            self._thread = threading.Thread(target=self._renew, daemon=True,
                                            name="workdir-lock")
            self._thread.start()
            return self
        raise WorkdirInUse(f"{self.path}: could not take the lock (another run is starting?)")

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # being written, or damaged: a holder would have written it whole

    def _write(self) -> None:
        storage.write_atomic(self.path, json.dumps(self.record))

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            current = self._read()
            if current is None or current.get("pid") != self.record["pid"] \
                    or current.get("host") != self.record["host"]:
                return  # taken over (we were presumed dead): do not fight for it
            self.record["renewed"] = time.time()
            try:
                self._write()
            except OSError:
                pass  # a full disk: the next renewal tries again

    def release(self) -> None:
        self._stop.set()
        current = self._read()
        if current is not None and current.get("pid") == self.record["pid"] \
                and current.get("host") == self.record["host"]:
            self.path.unlink(missing_ok=True)


class held:
    """``with held(workdir, holder):`` the lock for the block (only where ``holder``: one
    process of a multi-process run takes it for all)."""

    def __init__(self, workdir: str | os.PathLike, holder: bool = True):
        self.lock = WorkdirLock(workdir) if holder else None

    def __enter__(self):
        if self.lock is not None:
            self.lock.acquire()
            if self.lock.took_over:
                print(f"took over {self.lock.path} from a run that is gone (host "
                      f"{self.lock.took_over.get('host')}, process "
                      f"{self.lock.took_over.get('pid')})", flush=True)
        return self.lock

    def __exit__(self, *exc_info):
        if self.lock is not None:
            self.lock.release()
        return False
