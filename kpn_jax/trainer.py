"""The training loop both trainers share: guarded steps, logging, evaluation, checkpoints.

:func:`fit` runs the steps of a program (``kpn_jax.train``, ``kpn_jax.landmarks_train``) from
a resumed step to the end, and promises that a run killed at any moment (SIGKILL, Ctrl-C,
a full disk) and started again with the same command ends with the same ``metrics.jsonl``
(timings aside), best checkpoint and report as a run never interrupted:

* At a step ``s`` that ends a log window, needs an evaluation or a checkpoint, the order
  is fixed: log the window, evaluate (and save the best checkpoint), then save
  ``latest/s``. A checkpoint therefore exists only after everything due at its step is
  recorded; killed earlier, the rerun resumes from the previous checkpoint and replays
  the same steps, and :class:`MetricLog` drops the records it is about to write again.
* Ctrl-C saves ``latest/s`` with a sidecar (``checkpoints/resume.json``) holding what the
  next boundary still needs: the log window's per-step values and whether step ``s``'s
  evaluation is still due.
* Every step is guarded on the device (:func:`guarded_update`): an update whose loss or
  gradient is not finite, or whose loss is ``divergence_factor`` times above the lowest
  seen, is not applied, and every later one neither; the host reads the guard at each
  boundary (no per-step sync), stops with the true step, and never saves a checkpoint
  after a refused update.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax.training import train_state
from jax.experimental import multihost_utils

from kpn_jax import input_pipeline, parallel, storage

RESUME_FILE = "resume.json"  # in checkpoints/: what a Ctrl-C left for the next boundary


class TrainState(train_state.TrainState):
    """flax's TrainState plus BatchNorm statistics."""

    batch_stats: Any = None
    # ``{'params', 'batch_stats'}``: their exponential moving average (config.ema_decay), or
    # None (no leaves: checkpoints without it keep their structure).
    ema: Any = None

    @classmethod
    def create(cls, **kwargs):
        # flax starts ``step`` at a Python 0, which a jit returns weakly typed; a strong
        # int32 keeps one train-step signature from the first step and from any resume.
        return super().create(**kwargs).replace(step=jnp.zeros((), jnp.int32))


class StopRequested(KeyboardInterrupt):
    """A stop asked for from outside (SIGTERM from a scheduler): raised at a step boundary,
    after which :func:`fit` saves as for Ctrl-C."""


class TrainingStopped(FloatingPointError):
    """The guard refused an update (non-finite or diverging loss); the message says which."""


def variables_of(state) -> dict:
    """The model variables a state trains: ``{'params', 'batch_stats'}``."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def eval_variables(state) -> dict:
    """What evaluation and prediction use: the weights' moving average when the state
    keeps one, else the trained weights."""
    return state.ema if state.ema is not None else variables_of(state)


def update_ema(state, decay: float):
    """``state`` with ``ema <- d * ema + (1 - d) * variables``, ``d = min(decay, (1 + t) /
    (10 + t))`` at step ``t``: early averages forget the random start quickly."""
    step = state.step.astype(jnp.float32)
    d = jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))
    ema = jax.tree.map(lambda average, value: (d * average + (1.0 - d) * value).astype(value.dtype),
                       state.ema, variables_of(state))
    return state.replace(ema=ema)


# ----------------------------------------------------------------------------- guard


def initial_health() -> dict[str, jax.Array]:
    """The guard's device state: the first refused step (0 = none) and the lowest loss.

    Every leaf has the dtype :func:`guarded_update` returns (a weakly typed ``inf`` would
    give the second step another signature and compile the train step twice)."""
    return {"refused_at": jnp.zeros((), jnp.int32),
            "lowest_loss": jnp.full((), jnp.inf, jnp.float32),
            "refused_loss": jnp.zeros((), jnp.float32)}


def guarded_update(state, new_state, loss: jax.Array, grads, health: dict,
                   divergence_factor: float):
    """``new_state`` where the step is healthy, else ``state``; the updated guard.

    Healthy: loss and every gradient finite, the loss at most ``divergence_factor`` times
    the lowest loss of the run's healthy steps (0 disables that test), and no step refused
    before. Both trainers' steps call this last; the step counter always advances.
    """
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    healthy = finite & (health["refused_at"] == 0)
    if divergence_factor:
        healthy &= loss <= divergence_factor * jnp.maximum(health["lowest_loss"], 1e-3)
    chosen = jax.tree.map(lambda new, old: jnp.where(healthy, new, old), new_state, state)
    done = (state.step + 1).astype(jnp.int32)
    first_refusal = (health["refused_at"] == 0) & ~healthy
    health = {"refused_at": jnp.where(first_refusal, done, health["refused_at"]),
              "lowest_loss": jnp.where(healthy, jnp.minimum(health["lowest_loss"],
                                                            loss.astype(jnp.float32)),
                                       health["lowest_loss"]),
              "refused_loss": jnp.where(first_refusal, loss.astype(jnp.float32),
                                        health["refused_loss"])}
    return chosen.replace(step=state.step + 1), health


# ----------------------------------------------------------------------------- logging


class MetricLog:
    """JSON lines (``metrics.jsonl``) + TensorBoard events, written by process 0 only."""

    def __init__(self, workdir: Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self.writer = None
        self._tensorboard_upload = None   # (local staging folder, gs:// folder)
        self.resume_step = resume_step
        # Record layouts already logged at the resumed step: a run interrupted at that step
        # may log them again (the same values), which then replace the old lines.
        self._at_resume: set[frozenset] = set()
        if not self.enabled:
            return
        # Drop records past the checkpoint we resume from (they will be logged again) and a
        # last line cut short by a kill.
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
        self._at_resume = {frozenset(r) for r in kept if r.get("step", 0) == resume_step}
        _write_records(self.path, kept)
        try:
            SummaryWriter = _summary_writer_class()
            logdir = workdir / "tensorboard"
            if storage.is_object_store(logdir):
                # Event files are written locally and copied up after each flush.
                staging = Path(tempfile.mkdtemp(prefix="kpn_jax_tensorboard_"))
                self._tensorboard_upload = (staging, logdir)
                logdir = staging
            self.writer = SummaryWriter(str(logdir))
        except ImportError:  # TensorBoard files are a convenience, metrics.jsonl is the record
            self.writer = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: (float(v) if isinstance(v, (int, float, np.floating,
                                                                          np.integer)) else v)
                                        for k, v in values.items()}}
        if step == self.resume_step and frozenset(record) in self._at_resume:
            self._at_resume.discard(frozenset(record))
            _write_records(self.path, [r for r in read_records(self.path)
                                       if not (r.get("step") == step and set(r) == set(record))])
        storage.append_text(self.path, json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
            self._upload_tensorboard()

    def _upload_tensorboard(self) -> None:
        if self._tensorboard_upload is not None:
            storage.upload(*self._tensorboard_upload)

    def records(self) -> list[dict]:
        return read_records(self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self._upload_tensorboard()
        if self._tensorboard_upload is not None:
            shutil.rmtree(self._tensorboard_upload[0], ignore_errors=True)


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without torch.

    tensorboardX imports torch when it is installed, only to accept torch tensors; the
    metric log writes Python floats, and torch's import costs each run about 1.5 s and
    memory. A ``None`` in ``sys.modules`` makes that one ``import torch`` fail (the import
    system's documented way to block a module); torch stays importable afterwards.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def read_records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` in order, skipping a line cut short by a kill."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _write_records(path: Path, records: list[dict]) -> None:
    storage.write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def format_duration(seconds: float) -> str:
    """``'3m07s'``, or ``'1h02m'`` from an hour on."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def print_once(message: str) -> None:
    """Prints on process 0 only (every process runs the same program)."""
    if jax.process_index() == 0:
        print(message, flush=True)


# ----------------------------------------------------------------------------- workdir


def write_config(workdir: Path, config_dict: dict, saved_check: Callable[[dict], None],
                 allow_change: bool, resume_step: int | None,
                 absent_means: Mapping[str, Any] | None = None) -> None:
    """Records the run's config in ``workdir/config.json``, keeping every earlier one.

    ``saved_check(saved)`` raises when the saved config describes another model. Any other
    difference on a resume is refused unless ``allow_change``; then the earlier config is
    kept as ``config.before_step<N>.json``. ``absent_means`` gives fields added after a
    config was saved (dotted names) the value that meant the old behaviour: a saved config
    without the field equals one with that value.
    """
    path = workdir / "config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        for dotted, value in (absent_means or {}).items():
            *parents, last = dotted.split(".")
            target = saved
            for part in parents:
                target = target.setdefault(part, {})
            target.setdefault(last, value)
        saved_check(saved)
        changed = config_differences(saved, config_dict)
        if changed:
            if not allow_change:
                raise ValueError(
                    f"the workdir {workdir} was trained with another config ({'; '.join(changed[:3])}"
                    f"{' ...' if len(changed) > 3 else ''}): rerun with the same config, use a "
                    f"new --workdir, or pass --allow_config_change to continue with this one")
            if jax.process_index() == 0:
                kept = workdir / f"config.before_step{resume_step or 0}.json"
                storage.write_atomic(kept, path.read_text())
    if jax.process_index() == 0:
        # Whole or not at all: the other processes read it at the same time.
        storage.write_atomic(path, json.dumps(config_dict, indent=2, sort_keys=True))


# Settings that change how a run goes, not what it computes (max_steps only stops the same
# sequence of steps earlier or later).
NEUTRAL_CONFIG_KEYS = ("num_data_threads", "num_data_workers", "keep_checkpoints", "data_dir",
                       "data_cache_dir", "eval_batch_size", "max_steps")


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``'key: saved -> current'`` for every value that differs (neutral keys aside)."""
    found = []
    for key in sorted(set(saved) | set(current)):
        name = prefix + key
        if not prefix and key in NEUTRAL_CONFIG_KEYS:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, name + ".")
        elif a != b and not (isinstance(a, list) and isinstance(b, list) and tuple(a) == tuple(b)):
            found.append(f"{name}: {a!r} -> {b!r}")
    return found


# ----------------------------------------------------------------------------- loop


def _read_resume(checkpoints, step: int) -> dict:
    path = checkpoints.root / RESUME_FILE
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    return record if record.get("step") == step else {}


def _write_resume(checkpoints, step: int, window: list[dict], log_due: bool,
                  evaluation_due: bool) -> None:
    if jax.process_index() == 0:
        path = checkpoints.root / RESUME_FILE
        storage.write_atomic(path, json.dumps({"step": step, "window": window,
                                                "log_due": log_due,
                                                "evaluation_due": evaluation_due}))


def fit(*, state, health: dict, train_step: Callable, batches: Iterator[dict],
        to_device: Callable[[dict], Any], start_step: int,
        total_steps: int, checkpoints, log: MetricLog, log_every: int, checkpoint_every: int,
        evaluate_every: int, evaluate: Callable[[int, Any], None],
        window_record: Callable[[int, list[dict], float], tuple[dict, str]],
        refusal_message: Callable[[int, float], str],
        stop_requested: Callable[[], bool] | None = None):
    """Runs steps ``start_step .. total_steps - 1``; returns the final state.

    Args:
      state, health: the restored train state and :func:`initial_health`.
      train_step: jitted ``(state, batch, health, step) -> (state, aux, health)``.
      batches: host batches from ``start_step`` on (prepared ahead by the input pipeline).
      to_device: host batch -> device batch; called while the previous step runs.
      evaluate: ``(step, state) -> None``; logs, prints and saves the best checkpoint.
      window_record: ``(done, per-step aux values, seconds) -> (metrics record, progress
        line)`` for a log window.
      refusal_message: ``(step, loss) -> str``, why the guard stopped the run.
      stop_requested: ``() -> bool``, asked before each step (a SIGTERM flag); when it
        says yes the run stops there, with the previous step's logging, evaluation and
        checkpoint done. With several processes a SIGTERM to any of them stops all before
        the same step instead (:func:`kpn_jax.parallel.stop_agreed`).

    Raises:
      TrainingStopped: the guard refused an update; nothing after it was saved.
      KeyboardInterrupt: after saving ``latest`` and the resume sidecar (``StopRequested``
        for a ``stop_requested`` stop).
    """
    resume = _read_resume(checkpoints, start_step) if start_step else {}
    window = list(resume.get("window", []))  # host floats restored; device arrays appended
    log_due = bool(resume.get("log_due", False))
    evaluation_due = bool(resume.get("evaluation_due", False))
    # Seconds of the log window in which the device had nothing to run: waiting for the
    # input pipeline's next batch, and copying it to the device.
    window_start, input_wait, transfer_wait = time.time(), 0.0, 0.0

    def check_health() -> None:
        refused_at, refused_loss = jax.device_get((health["refused_at"], health["refused_loss"]))
        if int(refused_at):
            raise TrainingStopped(refusal_message(int(refused_at), float(refused_loss)))

    def write_window(done: int) -> None:
        values = [{k: float(x) for k, x in jax.device_get(v).items()} for v in window]
        elapsed = time.time() - window_start
        record, line = window_record(done, values, elapsed)
        record["train/input_wait_fraction"] = input_wait / max(elapsed, 1e-9)
        record["train/transfer_wait_fraction"] = transfer_wait / max(elapsed, 1e-9)
        log.write(done, record)
        print_once(f"{line} | input wait {100 * record['train/input_wait_fraction']:.0f}% "
                   f"+ transfer {100 * record['train/transfer_wait_fraction']:.0f}%")

    done = start_step
    try:
        # What an interruption at this step left undone, in the boundary's order.
        if log_due and window:
            write_window(done)
        window, log_due = ([], False) if log_due else (window, False)
        if evaluation_due:
            evaluate(done, state)
            evaluation_due = False
        for step in range(start_step, total_steps):
            if parallel.stop_agreed(step, stop_requested):
                raise StopRequested(f"stop requested before step {step}")
            # The device is idle while the host fetches or copies a batch only once the
            # previous step has finished; what overlaps a running step costs nothing. (A step
            # that ends midway through a fetch is not counted: a slight underestimate.)
            last = window[-1]["loss"] if window else None
            step_done = (lambda: True) if not hasattr(last, "is_ready") else last.is_ready
            idle_fetch = step_done()
            fetch_start = time.time()
            host_batch = next(batches)
            copy_start = time.time()
            idle_copy = idle_fetch or step_done()
            batch = to_device(host_batch)
            if idle_fetch:
                input_wait += copy_start - fetch_start
            if idle_copy:
                transfer_wait += time.time() - copy_start
            state, aux, health = train_step(state, batch, health, step)
            window.append(aux)
            done = step + 1
            log_due = done % log_every == 0 or done == total_steps
            evaluation_due = done % evaluate_every == 0 or done == total_steps
            save_due = done % checkpoint_every == 0
            if not (log_due or evaluation_due or save_due):
                continue
            check_health()
            if log_due:
                write_window(done)
                window, window_start, log_due = [], time.time(), False
                input_wait = transfer_wait = 0.0
            if evaluation_due:
                evaluate(done, state)
                evaluation_due = False
            if save_due:
                checkpoints.save(done, state)
    except KeyboardInterrupt:
        check_health()
        now = int(jax.device_get(state.step))
        values = [{k: float(x) for k, x in jax.device_get(v).items()} for v in window]
        checkpoints.save(now, state)
        checkpoints.wait()
        _write_resume(checkpoints, now, values, log_due, evaluation_due)
        print_once(f"{'Stopped on request' if isinstance(sys.exc_info()[1], StopRequested) else 'Interrupted'}"
                   f": saved a checkpoint at step {now}; run the same command to resume")
        raise
    finally:
        if hasattr(batches, "close"):  # stops the input pipeline's worker processes
            close_within(batches.close, CLOSE_TIMEOUT_S)
    check_health()
    if total_steps > start_step:
        checkpoints.save(total_steps, state)
    checkpoints.wait()
    return state


# How long the input pipeline may take to stop once training is done. grain's prefetch
# thread has been seen to wait forever for a worker process under heavy load; the run's
# results are written by then, so it goes on and the workers end with the process.
CLOSE_TIMEOUT_S = 60.0


def close_within(close: Callable[[], None], seconds: float) -> bool:
    """Runs ``close()`` in a daemon thread and waits at most ``seconds``; False (with a
    warning in the log) when it did not return in time."""
    import threading

    closer = threading.Thread(target=close, name="close input pipeline", daemon=True)
    closer.start()
    closer.join(seconds)
    if closer.is_alive():
        logging.warning("the input pipeline did not stop within %.0f s; its worker processes "
                        "end with this process", seconds)
        return False
    return True


def to_host(x) -> np.ndarray:
    """A (sharded) device array as one numpy array, gathered over every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def predict_dataset(predict: Callable[[Any, dict], dict], variables, source, checker, mesh,
                    batch_size: int, fields: tuple[str, ...],
                    loading: input_pipeline.Loading = input_pipeline.Loading(),
                    outputs: tuple[str, ...] = (), first: dict[str, int] | None = None) -> dict:
    """Runs ``predict(variables, batch) -> {name: [B, ...]}`` over every example of
    ``source`` once, in order, sharded over ``mesh``.

    Args:
      fields: the batch fields the device batch holds (``mask`` is added).
      loading: its threads are used; examples are read in this process.
      outputs: the batch fields returned beside ``predict``'s outputs.
      first: ``{field: n}``, fields of which only the first ``n`` examples are kept.

    Returns:
      numpy ``{name: [M, ...]}`` for every output of ``predict`` and every field in
      ``outputs``, padding dropped.
    """
    batch_size = max(mesh.devices.size, batch_size - batch_size % mesh.devices.size)
    # Read in this process: starting worker processes costs about 3 s per pass, more than
    # reading a few thousand examples here (benchmarks/README.md, evaluation pipeline).
    loading = input_pipeline.Loading(num_threads=loading.num_threads, num_workers=0)
    first = first or {}
    collected: dict[str, list] = {}
    masks = []
    # Outputs stay on the devices until the split is done: the host reads the next batch
    # while the devices compute, and the gather (an all-gather with several processes)
    # happens once per output, not once per batch.
    for local in input_pipeline.eval_batches(source, batch_size, checker, jax.process_index(),
                                             jax.process_count(), loading):
        batch = parallel.global_batch({k: local[k] for k in (*fields, "mask")}, mesh)
        values = dict(predict(variables, batch))
        values.update({k: batch[k] for k in outputs})
        masks.append(batch["mask"])
        for name, value in values.items():
            kept = collected.setdefault(name, [])
            if name not in first or sum(v.shape[0] for v in kept) < first[name]:
                kept.append(value)
    if not masks:
        raise ValueError("nothing to evaluate: the split has no examples")
    mask = to_host(jnp.concatenate(masks))
    return {name: to_host(jnp.concatenate(parts))[mask[: sum(p.shape[0] for p in parts)]]
            [: first.get(name)] for name, parts in collected.items()}
