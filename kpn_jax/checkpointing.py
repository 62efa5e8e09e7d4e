"""Orbax checkpoints of a training workdir: the latest N and the best on validation.

Layout (DESIGN.md section 4): ``workdir/checkpoints/latest/<step>/``,
``workdir/checkpoints/best/<step>/`` and ``workdir/checkpoints/best.json`` (the
best metric so far), beside ``workdir/config.json`` and ``workdir/gmm.npz``.
The data position is the step (the input pipeline is a pure function of the
step), so restoring the state is all a resume needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

MODEL_KEYS_THAT_CHANGE_SHAPES = ("pooling", "depth", "width", "aggregation", "densify_k",
                                 "feature_layer", "aux_regression", "input_mode")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model of the current config."""


class Checkpointer:
    """Saves and restores TrainState pytrees under ``workdir/checkpoints``."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2):
        root = Path(workdir).expanduser().resolve() / "checkpoints"
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
        self.latest.save(step, args=ocp.args.StandardSave(state))

    def best_record(self) -> dict | None:
        path = self.root / "best.json"
        return json.loads(path.read_text()) if path.exists() else None

    def save_best(self, step: int, state, metric_name: str, value: float) -> None:
        self.best.save(step, args=ocp.args.StandardSave(state), force=True)
        self.best.wait_until_finished()
        if jax.process_index() == 0:
            (self.root / "best.json").write_text(
                json.dumps({"step": int(step), "metric": metric_name, "value": float(value)}))

    def restore(self, state_template, step: int | None = None, which: str = "latest"):
        """Restores into the structure of ``state_template`` (arrays or ShapeDtypeStructs).

        Raises:
          FileNotFoundError: no checkpoint there.
          CheckpointMismatchError: the stored arrays do not fit the template.
        """
        manager = self.latest if which == "latest" else self.best
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no {which} checkpoint under {self.root / which}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
        try:
            return manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise CheckpointMismatchError(
                f"checkpoint {self.root / which / str(step)} does not fit the model of this "
                f"config (another architecture?): {first_line}") from None

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def check_config_compatible(saved: dict, config) -> None:
    """Raises CheckpointMismatchError when ``workdir/config.json`` describes another model."""
    saved_model = saved.get("model", {})
    for key in MODEL_KEYS_THAT_CHANGE_SHAPES:
        if key in saved_model and key in config.model and saved_model[key] != config.model[key]:
            raise CheckpointMismatchError(
                f"the workdir was trained with model.{key}={saved_model[key]!r} but the config "
                f"says {config.model[key]!r}; use a new --workdir or the same config")
    if "tasks" in saved and tuple(saved["tasks"]) != tuple(config.tasks):
        raise CheckpointMismatchError(
            f"the workdir was trained for tasks {tuple(saved['tasks'])}, the config says "
            f"{tuple(config.tasks)}")
