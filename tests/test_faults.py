"""Fault injection: a tiny run killed (SIGKILL, Ctrl-C or SIGTERM) at every moment it writes
something, then started again with the same command, ends with the artefacts of an
uninterrupted run."""

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_artefacts import artefacts, process_env

pytestmark = pytest.mark.slow  # dozens of training processes

WORKER = Path(__file__).parent / "workers" / "train_with_faults.py"


def fault_config(data_dir: str):
    from tests.test_train import tiny_config

    # 16 labelled knees / batch 8 = 2 steps per epoch: log, validate and checkpoint every
    # 2 steps, 4 steps in all, so every kind of boundary happens twice.
    return tiny_config(data_dir, max_steps=4, **{
        "synthetic.num_train": 16, "synthetic.num_validation": 8, "synthetic.num_test": 8,
        "synthetic.num_unlabeled": 8, "unlabeled_batch_size": 8, "num_epochs": 2,
        "eval_every_epochs": 1.0, "log_every_steps": 2, "checkpoint_every_steps": 2,
        "coherence.warmup_epochs": 1.0})


def run(config_path: Path, workdir: Path, kill_at: int = 0, signal: str = "kill"):
    env = process_env(config_path.parent / "compilation_cache")
    return subprocess.run([sys.executable, str(WORKER), str(config_path), str(workdir),
                           f"--kill_at={kill_at}", f"--signal={signal}"],
                          capture_output=True, text=True, env=env, timeout=600)


def test_killed_at_every_boundary_and_resumed_ends_as_uninterrupted(tmp_path):
    config = fault_config(str(tmp_path / "tfds"))
    config_path = tmp_path / "config.json"
    config_path.write_text(config.to_json_best_effort())
    reference = run(config_path, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    num_events = int(reference.stdout.split("events")[-1])
    expected = artefacts(lambda name: (tmp_path / "reference" / name).read_text())
    assert num_events >= 8
    # SIGKILL at every event; Ctrl-C (which saves and leaves a resume record) at a few:
    # inside a log window, during a validation, and at the end.
    # (KPN_FAULTS_FULL=1: Ctrl-C at every event too.)
    points = [("kill", n) for n in range(1, num_events + 1)]
    int_points = (range(1, num_events + 1) if os.environ.get("KPN_FAULTS_FULL")
                  else (1, 2, num_events - 1))
    points += [("int", n) for n in int_points]
    # SIGTERM (a scheduler's stop): the run stops before its next step with a checkpoint
    # (exit 143); sent during the final evaluation it lets the run finish (exit 0).
    points += [("term", n) for n in (1, 2, num_events - 1)]
    codes = {"kill": (-9,), "int": (130,), "term": (143, 0)}

    def kill_and_resume(point):
        signal, n = point
        workdir = tmp_path / f"{signal}{n}"
        killed = run(config_path, workdir, n, signal)
        assert killed.returncode in codes[signal], killed.stderr[-2000:]
        again = run(config_path, workdir)
        assert again.returncode == 0, again.stderr[-3000:]
        return signal, n, artefacts(lambda name: (workdir / name).read_text()) == expected

    # Two at a time: each process is mostly Python start-up and tiny steps.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        table = list(pool.map(kill_and_resume, points))
    print("\n".join(f"{signal} at event {n}: {'identical' if same else 'DIFFERENT'}"
                    for signal, n, same in table))
    assert all(same for *_, same in table), table
