"""Orbax checkpoints of a training workdir: the latest N and the best on validation.

Layout: ``workdir/checkpoints/latest/<step>/``,
``workdir/checkpoints/best/<step>/`` and ``workdir/checkpoints/best.json`` (the
best metric so far), beside ``workdir/config.json`` and ``workdir/gmm.npz``.
The data position is the step (the input pipeline is a pure function of the
step), so restoring the state is all a resume needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import os
import sys
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from kpn_jax import failures, parallel, storage

# Model fields that make another network: the parameters' shapes, or (stem_max_pool) what
# the same parameters compute.
MODEL_KEYS_OF_THE_NETWORK = ("pooling", "depth", "width", "aggregation", "densify_k",
                             "feature_layer", "aux_regression", "input_mode", "head",
                             "stem_max_pool")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model of the current config."""


class Checkpointer:
    """Saves and restores TrainState pytrees under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2):
        root = storage.path(workdir) / "checkpoints"
        self.root = root
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.latest = ocp.CheckpointManager(root / "latest", options=options)
        self.best = ocp.CheckpointManager(
            root / "best", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.latest_step()

    def save(self, step: int, state) -> None:
        """Saves ``latest/<step>`` (asynchronously); a step already saved is kept as it is:
        the state of a step is a pure function of the run, so it holds the same arrays."""
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.StandardSave(saved_items(state)))

    def best_record(self) -> dict | None:
        path = self.root / "best.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save_best(self, step: int, state, metric_name: str, value: float) -> None:
        """Saves ``best/<step>`` and then ``best.json``; a replayed step (a run killed between
        the two) is saved again."""
        if step in self.best.all_steps():
            self.best.delete(step)
        self.best.save(step, args=ocp.args.StandardSave(saved_items(state)), force=True)
        self.best.wait_until_finished()
        if jax.process_index() == 0:
            storage.write_atomic(self.root / "best.json", json.dumps(
                {"step": int(step), "metric": metric_name, "value": float(value)}))

    def restore(self, state_template, step: int | None = None, which: str = "latest"):
        """Restores into the structure of ``state_template`` (arrays or ShapeDtypeStructs).

        Without ``step``, the newest intact checkpoint: a damaged one (a file missing or cut
        short) is moved to ``checkpoints/damaged/`` with a one-line warning and the next
        older one is tried.

        Raises:
          FileNotFoundError: no checkpoint there.
          CheckpointMismatchError: no checkpoint fits the template (another model), or every
            one is damaged.
        """
        with _late_read_errors_to_log():
            return self._restore(state_template, step, which)

    def _restore(self, state_template, step: int | None, which: str):
        manager = self.latest if which == "latest" else self.best
        steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
        if not steps or steps == [None]:
            raise FileNotFoundError(f"no {which} checkpoint under {self.root / which}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved_items(state_template))
        errors = []
        for candidate in steps:
            restored, failure = None, None
            try:
                # Agreed before any process reads: a restore is collective, so either every
                # process reads this checkpoint or none does.
                if not parallel.all_processes(_readable_metadata(manager, candidate)):
                    raise FileNotFoundError("its metadata is missing or unreadable")
                restored = manager.restore(candidate, args=ocp.args.StandardRestore(abstract))
            except (ValueError, KeyError, TypeError) as error:
                # With readable metadata, a refused template means another model.
                if _is_structure_mismatch(error):
                    raise CheckpointMismatchError(
                        f"checkpoint {self.root / which / str(candidate)} does not fit the model "
                        f"of this config (another architecture?): {_first_line(error)}") from None
                failure = error
            except Exception as error:  # noqa: BLE001  (orbax/tensorstore: unreadable files)
                failure = error
            # Every process goes on with the same checkpoint, or sets it aside together.
            if parallel.all_processes(failure is None):
                return state_template.replace(**restored)
            errors.append((candidate, failure or FileNotFoundError(
                "another process could not read it")))
            if step is not None:
                break
            self._set_aside(manager, which, candidate, errors[-1][1])
        candidate, error = errors[-1]
        raise CheckpointMismatchError(
            f"no intact {which} checkpoint under {self.root / which} (the last tried, step "
            f"{candidate}: {_first_line(error)}); damaged ones are in {self.root / 'damaged'}. "
            f"Delete {self.root} to start afresh, or restore the folder from a backup")

    def _set_aside(self, manager, which: str, step: int, error: Exception) -> None:
        """Moves a damaged checkpoint out of the manager's way, so that the steps replayed
        after the fallback can be saved again; nothing is deleted."""
        source = self.root / which / str(step)
        target = self.root / "damaged" / f"{which}_{step}"
        if jax.process_index() == 0 and source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target = target.with_name(f"{target.name}_{os.getpid()}")
            storage.move(source, target)
        parallel.barrier(f"kpn_jax: {which} {step} set aside")  # renamed before anyone reloads
        manager.reload()
        # The storage library's message (a TensorStore repr) goes to the log, not the console.
        logging.error("checkpoint %s is damaged: %s", source, error)
        print(f"WARNING: checkpoint {source} is damaged ({_short_reason(error)}); moved to "
              f"{target}, trying the previous one", flush=True)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def saved_items(state) -> dict:
    """What a checkpoint holds of a train state: its array fields by name, leaving out those
    that are None (a state without a moving average of the weights is saved, and read
    back, as states were before that field existed)."""
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)
            if field.metadata.get("pytree_node", True) and getattr(state, field.name) is not None}


def _readable_metadata(manager, step: int) -> bool:
    """Whether the checkpoint's metadata files (orbax's step and item ``_METADATA``) exist
    and parse: without them orbax cannot tell the saved tree, and would blame the model."""
    folder = storage.path(manager.directory) / str(step)
    try:
        for path in (folder / "_CHECKPOINT_METADATA", folder / "default" / "_METADATA"):
            json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _late_read_errors_to_log(quiet_s: float = 0.5, longest_s: float = 10.0):
    """Sends to the log, not the console, the errors that orbax's reads of a damaged
    checkpoint raise after it gave up on it.

    Orbax stops at the first unreadable array but leaves the other reads running; each then
    ends in an "Event loop is closed" traceback or a coroutine closed mid-read, through
    ``sys.unraisablehook``: hundreds of lines, and on several processes enough to fill a
    pipe that a scheduler or test reads one process at a time. They are counted and logged
    until none has come for ``quiet_s`` (at most ``longest_s``); any other unraisable error
    goes to the previous hook."""
    previous = sys.unraisablehook
    late = {"count": 0, "last": 0.0, "first": ""}

    def hook(unraisable):
        if not _is_late_read_error(unraisable):
            previous(unraisable)
            return
        late["count"] += 1
        late["last"] = time.monotonic()
        late["first"] = late["first"] or f"{type(unraisable.exc_value).__name__}: " \
                                         f"{_first_line(unraisable.exc_value)}"

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()  # coroutines of the abandoned reads are closed here, inside the hook
        if late["count"]:
            deadline = time.monotonic() + longest_s
            while time.monotonic() < deadline and time.monotonic() - late["last"] < quiet_s:
                time.sleep(0.05)
            logging.error("%d reads of a damaged checkpoint failed after orbax gave up on it "
                         "(the first: %s)", late["count"], late["first"])
        sys.unraisablehook = previous


def _is_late_read_error(unraisable) -> bool:
    """An abandoned checkpoint read's error: an orbax coroutine closed mid-read, or a
    TensorStore callback on orbax's closed event loop."""
    error, source = unraisable.exc_value, unraisable.object
    if inspect.iscoroutine(source) and "orbax" in source.cr_code.co_filename:
        return True
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _short_reason(error: Exception) -> str:
    """Why a checkpoint could not be read, in words (not the storage library's repr)."""
    text = _first_line(error)
    if len(text) <= 100 and "tensorstore" not in text.lower() and "{" not in text:
        return text
    return "a file of it is missing, cut short or unreadable"


def _first_line(error: Exception) -> str:
    return failures.first_line(error, limit=300)


def _is_structure_mismatch(error: Exception) -> bool:
    """Whether orbax refused the template (another model), not the files (damage)."""
    text = str(error).lower()
    return any(hint in text for hint in ("tree structure", "user-provided restore item",
                                         "structure", "shape", "mismatch"))


def check_config_compatible(saved: dict, config) -> None:
    """Raises CheckpointMismatchError when ``workdir/config.json`` describes another model."""
    saved_model = saved.get("model", {})
    for key in MODEL_KEYS_OF_THE_NETWORK:
        if key in saved_model and key in config.model and saved_model[key] != config.model[key]:
            raise CheckpointMismatchError(
                f"the workdir was trained with model.{key}={saved_model[key]!r} but the config "
                f"says {config.model[key]!r}; use a new --workdir or the same config")
    if "tasks" in saved and tuple(saved["tasks"]) != tuple(config.tasks):
        raise CheckpointMismatchError(
            f"the workdir was trained for tasks {tuple(saved['tasks'])}, the config says "
            f"{tuple(config.tasks)}")
