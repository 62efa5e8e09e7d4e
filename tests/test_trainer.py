"""kpn_jax.trainer's pieces: the step guard, config records, metric logs; checkpoint fallback;
the best metric following the tasks."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

import numpy as np
import optax
import pytest

from kpn_jax import checkpointing, train, trainer


def tiny_state():
    params = {"w": jnp.ones((3,))}
    return trainer.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1),
                                     batch_stats={})


@jax.jit
def guarded_step(state, loss, health):
    grads = {"w": jnp.full((3,), loss)}
    new_state = state.apply_gradients(grads=grads)
    return trainer.guarded_update(state, new_state, loss, grads, health, 100.0)


def test_guard_refuses_the_first_bad_step_and_every_later_one():
    state, health = tiny_state(), trainer.initial_health()
    losses = [1.0, 2.0, float("nan"), 1.0, 1.0]
    for loss in losses:
        state, health = guarded_step(state, jnp.float32(loss), health)
    assert int(state.step) == 5                       # the counter always advances
    assert int(health["refused_at"]) == 3             # the true (1-based) step
    np.testing.assert_allclose(state.params["w"], 1.0 - 0.1 * (1.0 + 2.0))  # steps 1-2 only


def test_guard_stops_a_finite_divergence():
    state, health = tiny_state(), trainer.initial_health()
    for loss in (2.0, 1.0, 50.0, 150.0):
        state, health = guarded_step(state, jnp.float32(loss), health)
    assert int(health["refused_at"]) == 4 and float(health["refused_loss"]) == 150.0
    assert float(health["lowest_loss"]) == 1.0


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    state = tiny_state()
    checkpoints = checkpointing.Checkpointer(tmp_path, keep=3)
    for step in (2, 4):
        checkpoints.save(step, state.replace(step=step, params={"w": jnp.full((3,), step)}))
    checkpoints.wait()
    damaged = tmp_path / "checkpoints" / "latest" / "4"
    for path in damaged.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "METADATA" not in path.name:
            path.write_bytes(path.read_bytes()[:3])  # cut short
    restored = checkpoints.restore(state)
    assert int(restored.step) == 2 and float(restored.params["w"][0]) == 2.0
    assert "damaged" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "damaged" / "latest_4").exists()
    checkpoints.save(4, state.replace(step=4))  # the replayed step can be saved again
    checkpoints.wait()
    assert checkpoints.latest_step() == 4
    checkpoints.close()


def test_a_damaged_checkpoint_of_many_arrays_costs_one_line_not_a_flood(tmp_path, capfd,
                                                                          monkeypatch):
    # Orbax gives up at the first unreadable array and leaves the others' reads running;
    # their late errors (hundreds of tracebacks) must not reach the console. Python's own
    # hook prints them (pytest's would turn them into warnings).
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    params = {f"w{i}": jnp.full((64, 64), float(i)) for i in range(100)}
    state = trainer.TrainState.create(apply_fn=None, params=params, tx=optax.adam(0.1),
                                      batch_stats={})
    checkpoints = checkpointing.Checkpointer(tmp_path, keep=3)
    for step in (2, 4):
        checkpoints.save(step, state.replace(step=step))
    checkpoints.wait()
    newest = tmp_path / "checkpoints" / "latest" / "4"
    for path in newest.rglob("*"):
        if path.is_file() and "METADATA" not in path.name:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    restored = checkpoints.restore(state)
    checkpoints.close()
    assert int(restored.step) == 2
    captured = capfd.readouterr()
    assert "is damaged" in captured.out
    assert "Traceback" not in captured.err and "Event loop is closed" not in captured.err, \
        captured.err[:2000]


def test_no_intact_checkpoint_and_another_model_are_named(tmp_path):
    state = tiny_state()
    checkpoints = checkpointing.Checkpointer(tmp_path)
    checkpoints.save(2, state)
    checkpoints.wait()
    other = trainer.TrainState.create(apply_fn=None, params={"v": jnp.ones((5,))},
                                      tx=optax.sgd(0.1), batch_stats={})
    with pytest.raises(checkpointing.CheckpointMismatchError, match="another architecture"):
        checkpoints.restore(other)
    for path in (tmp_path / "checkpoints" / "latest" / "2").rglob("*"):
        if path.is_file():
            path.unlink()
    with pytest.raises(checkpointing.CheckpointMismatchError, match="no intact latest"):
        checkpoints.restore(state)
    checkpoints.close()


def test_a_changed_config_is_refused_unless_allowed_and_the_old_one_is_kept(tmp_path):
    def never(saved):
        return None

    trainer.write_config(tmp_path, {"learning_rate": 1e-3, "num_data_threads": 2}, never,
                         False, None)
    # A setting that does not change what is computed passes.
    trainer.write_config(tmp_path, {"learning_rate": 1e-3, "num_data_threads": 8}, never,
                         False, 10)
    with pytest.raises(ValueError, match=r"learning_rate: 0.001 -> 0.01.*--allow_config_change"):
        trainer.write_config(tmp_path, {"learning_rate": 1e-2, "num_data_threads": 8}, never,
                             False, 10)
    trainer.write_config(tmp_path, {"learning_rate": 1e-2, "num_data_threads": 8}, never,
                         True, 10)
    assert json.loads((tmp_path / "config.json").read_text())["learning_rate"] == 1e-2
    assert json.loads((tmp_path / "config.before_step10.json").read_text())["learning_rate"] == 1e-3


def test_metric_log_drops_a_torn_line_and_replaces_a_record_logged_again(tmp_path):
    log = trainer.MetricLog(tmp_path, 0)
    log.write(2, {"train/loss": 1.0})
    log.write(4, {"train/loss": 0.5})
    log.write(4, {"validation/kl/accuracy": 0.25})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "train/lo')  # killed mid-write
    log = trainer.MetricLog(tmp_path, 4)    # resumed at step 4
    log.write(4, {"validation/kl/accuracy": 0.25})  # the interrupted validation, again
    records = log.records()
    log.close()
    assert [(r["step"], sorted(r)) for r in records] == [
        (2, ["step", "train/loss"]), (4, ["step", "train/loss"]),
        (4, ["step", "validation/kl/accuracy"])]


def test_metric_log_writes_tensorboard_events_without_importing_torch_or_sklearn(tmp_path):
    # A training process imports neither (each costs seconds of every run's start-up):
    # torch only because tensorboardX reaches for it, scikit-learn only to fit a new GMM.
    script = f"""
import struct, sys
from pathlib import Path
from kpn_jax import gmm, train, trainer
log = trainer.MetricLog(Path({str(tmp_path)!r}), 0)
log.write(3, {{"train/loss": 0.25}})
log.close()
print(sorted(m for m in ("torch", "sklearn") if m in sys.modules))
from tensorboardX.proto import event_pb2
data = next(Path({str(tmp_path)!r}, "tensorboard").glob("events.out.tfevents.*")).read_bytes()
while data:
    (length,) = struct.unpack("<Q", data[:8])
    event = event_pb2.Event.FromString(data[12:12 + length])
    data = data[16 + length:]
    for value in event.summary.value:
        print(event.step, value.tag, value.simple_value)
try:
    import torch  # still importable where installed
except ModuleNotFoundError as e:
    assert e.name == "torch", e
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=str(Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["[]", "3 train/loss 0.25"], result.stdout


def test_best_metric_follows_the_trained_tasks_and_the_graded_data():
    from configs import default

    config = default.get_config()
    assert train.best_metric(config) == "validation/oarsi_average/accuracy"
    config.tasks = ("kl",)
    assert train.best_metric(config) == "validation/kl/accuracy"
    config.tasks = default.get_config().tasks
    kl_only = np.full((5, 7), -1)
    kl_only[:, 0] = 2
    assert train.best_metric(config, kl_only) == "validation/kl/accuracy"
    config.best_metric = "validation/oarsi_average/accuracy"
    with pytest.raises(ValueError, match="no oarsi_average grades"):
        train.best_metric(config, kl_only)
    config.tasks = ("kl",)
    with pytest.raises(ValueError, match="not a validation metric of the trained tasks"):
        train.best_metric(config)


def test_bad_optimiser_values_are_refused_before_anything_is_written():
    from configs import default

    for field, value in (("learning_rate", -0.001), ("lr_decay_factor", 1e20),
                         ("weight_decay", -1.0)):
        config = default.get_config()
        config[field] = value
        with pytest.raises(ValueError, match=f"config.{field}"):
            train.validate_config(config)


def test_a_pipeline_that_does_not_stop_is_left_behind_not_waited_for():
    import threading

    from kpn_jax import trainer

    stuck = threading.Event()
    assert not trainer.close_within(stuck.wait, 0.2)   # returns although close() hangs
    stuck.set()
    assert trainer.close_within(lambda: None, 5.0)


def test_config_json_is_never_seen_half_written(tmp_path):
    # Process 0 rewrites config.json on every start while the other processes read it.
    import threading

    config = {"model": {f"field_{i}": "x" * 40 for i in range(200)}}
    trainer.write_config(tmp_path, config, lambda saved: None, False, None)
    failures, stop = [], threading.Event()

    def read_repeatedly():
        while not stop.is_set():
            try:
                json.loads((tmp_path / "config.json").read_text())
            except ValueError as error:
                failures.append(error)

    reader = threading.Thread(target=read_repeatedly)
    reader.start()
    try:
        for _ in range(100):
            trainer.write_config(tmp_path, config, lambda saved: None, False, 1)
            if failures:
                break
    finally:
        stop.set()
        reader.join()
    assert not failures, failures[:1]
