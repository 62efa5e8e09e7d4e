"""Fault injection: a tiny run stopped (SIGKILL, Ctrl-C or SIGTERM) at every moment it writes
something, then started again with the same command, ends with the artefacts of an
uninterrupted run. ``KPN_FAULTS_FULL=1`` stops a fresh run at each moment in turn (Ctrl-C
at every one too); by default one run is stopped again and again, at each moment after
the last."""

import concurrent.futures
import json
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


def run(config_path: Path, workdir: Path, stop_at: str = "", signal: str = "kill"):
    env = process_env(config_path.parent / "compilation_cache")
    return subprocess.run([sys.executable, str(WORKER), str(config_path), str(workdir),
                           f"--stop_at={stop_at}", f"--signal={signal}"],
                          capture_output=True, text=True, env=env, timeout=600)


def test_killed_at_every_boundary_and_resumed_ends_as_uninterrupted(tmp_path):
    config = fault_config(str(tmp_path / "tfds"))
    config_path = tmp_path / "config.json"
    config_path.write_text(config.to_json_best_effort())
    reference = run(config_path, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    events = json.loads(reference.stdout.split("events")[-1])
    expected = artefacts(lambda name: (tmp_path / "reference" / name).read_text())
    assert len(events) >= 8 and events[-1] == "report:test", events
    # SIGKILL at every event; Ctrl-C (which saves and leaves a resume record) at a few:
    # inside a log window, during a validation, and at the end. SIGTERM (a scheduler's
    # stop) at the same three: the run stops before its next step with a checkpoint (exit
    # 143); sent during the final evaluation it lets the run finish (exit 0).
    few = [events[0], events[1], events[-2]]
    codes = {"kill": (-9,), "int": (130,), "term": (143, 0)}
    if os.environ.get("KPN_FAULTS_FULL"):
        # Each stop in a workdir of its own, Ctrl-C at every event too.
        chains = ([("kill", [e]) for e in events] + [("int", [e]) for e in events]
                  + [("term", [e]) for e in few])
    else:
        # One workdir stopped again and again, each resumed run at the next event, as a
        # preemptible machine is: every event is still a stop, with half the processes.
        # (Two SIGKILL chains, so that two run beside each other.)
        chains = [("kill", events[0::2]), ("kill", events[1::2]), ("int", few),
                  ("term", few)]

    def stop_and_resume(chain):
        signal, stops = chain
        workdir = tmp_path / f"{signal}-{events.index(stops[0])}-{len(stops)}"
        for stop in stops:
            stopped = run(config_path, workdir, stop, signal)
            assert stopped.returncode in codes[signal], (
                f"{signal} at {stop}: exit {stopped.returncode} (the run did not reach it?)\n"
                + stopped.stderr[-2000:])
        again = run(config_path, workdir)
        assert again.returncode == 0, again.stderr[-3000:]
        return signal, stops, artefacts(lambda name: (workdir / name).read_text()) == expected

    # Two at a time: each process is mostly Python start-up and tiny steps.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        table = list(pool.map(stop_and_resume, chains))
    print("\n".join(f"{signal} at {', '.join(stops)}: {'identical' if same else 'DIFFERENT'}"
                    for signal, stops, same in table))
    assert all(same for *_, same in table), table
