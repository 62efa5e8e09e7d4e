"""Workdirs and data on gs:// against a Cloud Storage stand-in on 127.0.0.1
(gcp-storage-emulator, in memory): gcsfs reaches it through ``STORAGE_EMULATOR_HOST``,
orbax's TensorStore through ``TENSORSTORE_GCS_HTTP_URL``. A training on gs:// stopped and
resumed ends with the same metrics, best checkpoint and report as the same training on a
local disk; the workdir lock holds there too. Not covered (the stand-in cannot): Google's
authentication, the service's refusal of a second lock (the stand-in ignores upload
preconditions), latency and retries."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.run_artefacts import artefacts, assert_close, process_env

# Read when gcsfs is imported: no gRPC probe of the bucket's type (the stand-in speaks HTTP).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
pytest.importorskip("gcsfs", reason="the gcs extra: pip install -e '.[gcstest]'")
emulator = pytest.importorskip("gcp_storage_emulator.server",
                               reason="the gcstest extra: pip install -e '.[gcstest]'")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "kpn-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_generation_headers(download):
    """The stand-in's object download without the ``x-goog-generation`` header that Cloud
    Storage sends and TensorStore reads (without it: 'Malformed StorageGeneration')."""

    def download_with_headers(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            resource = storage.get_file_obj(request.params["bucket_name"],
                                            request.params["object_id"])
        except Exception:  # noqa: BLE001  (not found: the original answered 404)
            return
        response["x-goog-generation"] = resource["generation"]
        response["x-goog-metageneration"] = resource["metageneration"]

    return download_with_headers


@pytest.fixture(scope="module")
def gcs_env():
    """The stand-in's address in the variables gcsfs and TensorStore read, for this process
    and the runs it starts."""
    from gcp_storage_emulator.handlers import objects

    original = objects.download
    patched = _with_generation_headers(original)
    objects.download = patched  # also what its JSON API's ``?alt=media`` calls
    for _, handlers in emulator.HANDLERS:
        if handlers.get(emulator.GET) is original:
            handlers[emulator.GET] = patched
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "stand-in",  # TensorStore: no credential lookup
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC bucket probe
           # google-auth's search for credentials asks a metadata server: one that refuses
           # at once, not one that times out (anonymous access follows, as the stand-in wants)
           "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fsspec.filesystem("gs").invalidate_cache()
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()
    objects.download = original
    for _, handlers in emulator.HANDLERS:
        if handlers.get(emulator.GET) is patched:
            handlers[emulator.GET] = original


def _flags(workdir: str, data_dir: str, cache: Path) -> list[str]:
    return [f"--config={REPO / 'configs' / 'demo.py'}", f"--workdir={workdir}",
            f"--config.data_dir={data_dir}",
            f"--config.data_cache_dir={cache}", "--config.synthetic.image_size=64",
            "--config.synthetic.num_train=32", "--config.synthetic.num_validation=16",
            "--config.synthetic.num_test=16", "--config.synthetic.num_unlabeled=16",
            "--config.model.width=8", "--config.batch_size=8", "--config.unlabeled_batch_size=8",
            "--config.eval_batch_size=16", "--config.num_epochs=3", "--config.log_every_steps=2",
            "--config.eval_every_epochs=1.0", "--config.checkpoint_every_steps=4",
            "--config.coherence.num_components=2", "--config.coherence.warmup_epochs=1.0",
            "--config.num_data_threads=1"]


def _run(flags, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *flags], cwd=cwd,
                            env=process_env(cwd.parent / "compilation_cache",
                                            PYTHONPATH=str(REPO), **env),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.mark.slow
def test_a_run_on_gs_stops_resumes_and_ends_as_on_a_local_disk(gcs_env, tmp_path):
    from etils import epath

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cache = tmp_path / "cache"
    local = tmp_path / "local"
    _run(_flags(str(local), str(tmp_path / "tfds"), cache), cwd, gcs_env)  # the reference

    # On gs://: stopped by SIGTERM (a scheduler's stop) once step 4 is logged, then the
    # same command finishes the run.
    workdir, data_dir = f"gs://{BUCKET}/runs/one", f"gs://{BUCKET}/tfds"
    flags = _flags(workdir, data_dir, cache)
    remote = epath.Path(workdir)
    first = subprocess.Popen([sys.executable, str(REPO / "run.py"), *flags], cwd=cwd,
                             env=process_env(cwd.parent / "compilation_cache",
                                             PYTHONPATH=str(REPO), **gcs_env),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        metrics = remote / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] >= 4
                                    for line in metrics.read_text().splitlines()):
            first.send_signal(signal.SIGTERM)
            break
        time.sleep(0.5)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 143, (out + err)[-3000:]
    assert "Traceback" not in err, err[-3000:]
    stopped_at = max(int(p.name) for p in (remote / "checkpoints" / "latest").iterdir()
                     if p.name.isdigit())
    assert 4 <= stopped_at < 12, stopped_at
    second = _run(flags, cwd, gcs_env)
    assert f"at step {stopped_at}" in second.stdout, second.stdout[-3000:]

    assert_close(artefacts(lambda name: (remote / name).read_text()),
                  artefacts(lambda name: (local / name).read_text()))
    for name in ("config.json", "data_info.json", "gmm.npz", "report/results.md",
                 "report/predictions_test.csv", "report/confusion_matrices_test.png",
                 "report/learning_curves.png"):
        assert (remote / name).exists(), name
    assert list((remote / "tensorboard").glob("events.out.tfevents.*"))
    assert not (remote / "run.lock").exists()  # released at the end
    # The synthetic knees were built once, stored in the bucket, read from a local copy.
    assert list(epath.Path(data_dir).glob("synthetic_knee/*/*/dataset_info.json"))
    assert list(cache.glob(f"{BUCKET}/tfds/synthetic_knee/*/*/dataset_info.json"))
    assert not list(cwd.iterdir())  # no local folder named 'gs:'

    # A workdir on gs:// is evaluated from there too.
    evaluated = _run(["--mode=evaluate", f"--workdir={workdir}",
                      f"--config.data_cache_dir={cache}"], cwd, gcs_env)
    assert "test (best checkpoint" in evaluated.stdout, evaluated.stdout[-2000:]


def test_the_workdir_lock_on_gs_refuses_a_second_run_and_takes_over_a_dead_ones(gcs_env):
    from etils import epath
    from kpn_jax import workdir_lock

    workdir = f"gs://{BUCKET}/locks/run"
    held = workdir_lock.WorkdirLock(workdir).acquire()
    try:
        with pytest.raises(workdir_lock.WorkdirInUse, match=f"process {os.getpid()}"):
            workdir_lock.WorkdirLock(workdir).acquire()
    finally:
        held.release()
    assert not (epath.Path(workdir) / workdir_lock.LOCK_FILE).exists()

    # A lock left by a process of this host that is gone is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (epath.Path(workdir) / workdir_lock.LOCK_FILE).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead), "started": time.time(),
         "renewed": time.time()}))
    lock = workdir_lock.WorkdirLock(workdir).acquire()
    assert lock.took_over["pid"] == int(dead)
    lock.release()


def test_storage_helpers_on_gs(gcs_env, tmp_path):
    from kpn_jax import storage

    folder = storage.path(f"gs://{BUCKET}/helpers")
    storage.write_atomic(folder / "a.txt", "one")
    storage.append_text(folder / "a.txt", " two")
    assert (folder / "a.txt").read_text() == "one two"
    storage.create_exclusive(folder / "b.txt", "x")  # (the stand-in cannot refuse a second)
    storage.create_exclusive(tmp_path / "lock", "x")
    with pytest.raises(FileExistsError):
        storage.create_exclusive(tmp_path / "lock", "y")
    storage.write_atomic(folder / "sub" / "c.bin", b"\x00\x01")
    assert storage.files_under(folder) == {"a.txt": 7, "b.txt": 1, "sub/c.bin": 2}
    copy = storage.local_copy(folder, tmp_path / "copy")
    assert (copy / "sub" / "c.bin").read_bytes() == b"\x00\x01"
    storage.move(folder / "sub", folder / "moved")
    assert storage.files_under(folder) == {"a.txt": 7, "b.txt": 1, "moved/c.bin": 2}
    with pytest.raises(storage.UnsupportedStorage, match="s3:// is not supported"):
        storage.path("s3://bucket/x")
