"""The whole training loop on two processes through run.py (gloo on localhost): the same
metrics, best checkpoint and report as one process with two devices; a SIGTERM to one
process, or Ctrl-C in one, stops both before the same step, a damaged newest checkpoint is
set aside by both, a SIGKILL of both loses only what came after the last checkpoint, and the
same commands then finish the run as if it had never stopped."""

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.run_artefacts import artefacts, assert_close, process_env, xla_flags_with_devices

pytestmark = pytest.mark.slow  # three tiny trainings in subprocesses

REPO = Path(__file__).resolve().parents[1]


def _flags(data_dir: Path, workdir: Path) -> list[str]:
    # 48 labelled knees / batch 8 = 6 steps per epoch, 4 epochs: validation every 6 steps,
    # and room after each stop below for the next one to land before the end.
    return ["--config=configs/demo.py", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
            "--config.synthetic.image_size=64", "--config.synthetic.num_train=48",
            "--config.synthetic.num_validation=16", "--config.synthetic.num_test=16",
            "--config.synthetic.num_unlabeled=16", "--config.model.width=8",
            "--config.batch_size=8", "--config.unlabeled_batch_size=8",
            "--config.eval_batch_size=16", "--config.num_epochs=4",
            "--config.log_every_steps=2", "--config.eval_every_epochs=1.0",
            "--config.checkpoint_every_steps=1000", "--config.coherence.num_components=2",
            "--config.coherence.warmup_epochs=1.0", "--config.num_data_threads=1"]


def _start(flags, process_id=None, port=None, devices=1, output=subprocess.PIPE):
    # One compilation cache for every run of a test: beside its data folder.
    data_dir = next(f.split("=", 1)[1] for f in flags if f.startswith("--config.data_dir="))
    env = process_env(Path(data_dir).parent / "compilation_cache", PYTHONPATH=str(REPO),
                      XLA_FLAGS=xla_flags_with_devices(devices),
                      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    extra = ([] if process_id is None else
             ["--num_processes=2", f"--process_id={process_id}",
              f"--coordinator_address=127.0.0.1:{port}"])
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *flags, *extra], cwd=REPO,
                            env=env, stdout=output, stderr=subprocess.STDOUT, text=True)


def _why(output: str) -> str:
    """What to show of a failed process's output: around a fatal error's start (its thread
    stacks; the list of extension modules that ends it says nothing), else the end."""
    fatal = output.find("Fatal Python error")
    return output[max(0, fatal - 2000):fatal + 4000] if fatal >= 0 else output[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(flags, stop_after_step: int | None = None, workdir: Path | None = None,
                   send=((1, signal.SIGTERM),)):
    """Runs both processes; with ``stop_after_step``, once the metrics hold that step, sends
    ``send``'s ``(process, signal)`` pairs. Returns ``[(exit code, output), ...]``."""
    port = _free_port()
    # Each process writes to its own file: with pipes read one after the other, a process
    # that fills its pipe (64 KB) blocks while the other waits for it in a collective.
    outputs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    processes = [_start(flags, i, port, output=out) for i, out in zip(range(2), outputs)]
    if stop_after_step is not None:
        metrics = workdir / "metrics.jsonl"
        deadline = time.time() + 500
        while time.time() < deadline and processes[1].poll() is None:
            steps = ([json.loads(line)["step"] for line in metrics.read_text().splitlines()]
                     if metrics.exists() else [])
            if steps and max(steps) >= stop_after_step:
                for index, signum in send:
                    processes[index].send_signal(signum)
                break
            time.sleep(0.2)
    results = []
    for process, output in zip(processes, outputs):
        process.wait(timeout=600)
        output.seek(0)
        results.append((process.returncode, output.read()))
        output.close()
    return results


def test_two_processes_train_stop_together_and_resume_like_one(tmp_path):
    data_dir = tmp_path / "tfds"
    reference = _start(_flags(data_dir, tmp_path / "one"), devices=2)
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output[-3000:]
    expected = artefacts(lambda name: (tmp_path / "one" / name).read_text())

    workdir = tmp_path / "two"
    stopped = _two_processes(_flags(data_dir, workdir), stop_after_step=6, workdir=workdir)
    for code, output in stopped:
        assert code == 143, _why(output)
        assert "Traceback" not in output, output[-3000:]
    # Both stopped before the same step and saved it once.
    saved = sorted(int(p.name) for p in (workdir / "checkpoints" / "latest").iterdir()
                   if p.name.isdigit())
    assert saved and 6 <= saved[-1] < 24, saved
    assert "saved a checkpoint at step" in stopped[0][1]

    # Resumed, then Ctrl-C in process 0's terminal: run.py makes it a SIGTERM, same stop.
    interrupted = _two_processes(_flags(data_dir, workdir), stop_after_step=saved[-1] + 2,
                                 workdir=workdir, send=((0, signal.SIGINT),))
    assert [code for code, _ in interrupted] == [143, 143], interrupted[0][1][-3000:]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints" / "latest").iterdir()
                   if p.name.isdigit())
    assert saved[-1] < 24 and len(saved) == 2, saved
    # Resumed, then both killed (SIGKILL) two steps later: nothing saved since.
    killed = _two_processes(_flags(data_dir, workdir), stop_after_step=saved[-1] + 2,
                            workdir=workdir, send=((0, signal.SIGKILL), (1, signal.SIGKILL)))
    # (Whichever dies first, the other may end by itself, aborted by the lost peer.)
    assert all(code != 0 for code, _ in killed), [code for code, _ in killed]

    # The newest checkpoint damaged (its largest file cut short): both processes set it aside
    # together, go on from the one before and replay the steps since.
    newest = workdir / "checkpoints" / "latest" / str(saved[-1])
    largest = max((f for f in newest.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    resumed = _two_processes(_flags(data_dir, workdir))
    for code, output in resumed:
        assert code == 0, _why(output)
        # One line for the damaged checkpoint, not the storage library's late read errors.
        assert "Traceback" not in output, output[:3000]
    assert f"checkpoint {newest} is damaged" in resumed[0][1], resumed[0][1][-3000:]
    assert (workdir / "checkpoints" / "damaged" / f"latest_{saved[-1]}").is_dir()
    assert_close(artefacts(lambda name: (workdir / name).read_text()), expected)
