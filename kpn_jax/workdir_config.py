"""What a trained workdir was trained with, so that evaluate and predict use the same.

A training run writes ``config.json`` (its whole config) and ``data_info.json`` (the
dataset's name, image size, keypoint schema and data folder). ``--mode=evaluate`` and
``--mode=predict`` rebuild the config from them (:func:`load`); a ``--config`` file only
supplies explicit ``--config.field=value`` overrides (:func:`with_overrides`), and a
dataset other than the training data is refused unless asked for
(:func:`check_dataset`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

from kpn_jax import storage

CONFIG_FILE = "config.json"
DATA_INFO = "data_info.json"

# Fields whose value says how a run goes (threads, logging, kernels, paths), not which
# experiment it is: a --config file that differs from the workdir only in these is not
# worth a note.
RUN_SETTINGS = ("num_data_threads", "num_data_workers", "keep_checkpoints", "eval_batch_size",
                "log_every_steps", "checkpoint_every_steps", "model.kernels", "eval_split",
                "data_dir", "data_cache_dir")


def absolute_data_dir(data_dir: str) -> str:
    """``data_dir`` as a path that means the same from any working folder (URLs as given)."""
    if "://" in data_dir:
        return data_dir
    return os.path.abspath(os.path.expanduser(data_dir))


def data_info(workdir: str | os.PathLike) -> dict:
    """``workdir/data_info.json`` (``{}`` when the workdir has none)."""
    path = storage.path(workdir) / DATA_INFO
    return json.loads(path.read_text()) if path.exists() else {}


def with_tuples(value: Any) -> Any:
    """JSON lists back to the tuples the configs hold (``tasks``, ``lr_decay_epochs``)."""
    if isinstance(value, dict):
        return {k: with_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(with_tuples(v) for v in value)
    return value


def _update(config: ml_collections.ConfigDict, saved: Mapping) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
            _update(config[key], value)
        else:
            with config.unlocked():
                config[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def load(workdir: str | os.PathLike, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``base`` updated with ``workdir/config.json`` (fields the saved config lacks, from
    before they existed, keep ``base``'s values) and the training data's folder from
    ``data_info.json`` (so a relative ``data_dir`` means where the training read it).

    Raises:
      FileNotFoundError: the workdir has no ``config.json``.
    """
    path = storage.path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a trained workdir? (without "
                                f"one, give --config=FILE)")
    config = ml_collections.ConfigDict(base.to_dict())
    _update(config, with_tuples(json.loads(path.read_text())))
    recorded_dir = data_info(workdir).get("data_dir")
    if recorded_dir:
        config.data_dir = recorded_dir
    return config


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for part in path:
        config = config[part]
    with config.unlocked():
        config[last] = value


def with_overrides(saved: ml_collections.ConfigDict, given: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """The workdir's config with the explicit ``--config.*`` overrides of ``given`` applied.

    Returns:
      ``(config, ignored)``: ``ignored`` names the experiment fields where ``given`` (the
      ``--config`` file) differs from the workdir without an explicit override, as
      ``'field: workdir value, file value'``.
    """
    config = ml_collections.ConfigDict(saved.to_dict())
    for dotted in overrides:
        set_field(config, dotted, get(given, dotted))
    ignored = []
    flat_saved, flat_given = flatten(saved.to_dict()), flatten(given.to_dict())
    for dotted in sorted(set(flat_saved) | set(flat_given)):
        if dotted in overrides or dotted in RUN_SETTINGS or dotted in ("method_name",):
            continue
        a, b = flat_saved.get(dotted, "<absent>"), flat_given.get(dotted, "<absent>")
        if _normal(a) != _normal(b):
            ignored.append(f"{dotted}: {a!r} in the workdir, {b!r} in the file")
    # What decides the numbers first: the data, then the model.
    first = ("dataset", "synthetic.", "model.", "tasks", "dtype")
    ignored.sort(key=lambda text: next((i for i, p in enumerate(first) if text.startswith(p)),
                                       len(first)))
    return config, ignored


def _normal(value: Any) -> Any:
    return tuple(_normal(v) for v in value) if isinstance(value, (list, tuple)) else value


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """A nested config dict as ``{'model.depth': 18, ...}`` (lists as tuples)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


class OtherDataError(ValueError):
    """The dataset to evaluate on is not the one the workdir was trained on."""


def check_dataset(workdir: str | os.PathLike, name: str, image_size: int | None,
                  keypoint_schema: str | None, pooling: str,
                  allow_other_data: bool) -> str | None:
    """Compares a dataset with the training data recorded in ``data_info.json``
    (``image_size`` / ``keypoint_schema`` ``None``: not known yet, compared by name only,
    as before a dataset is built).

    Returns:
      ``None`` for the training data (or a workdir without a record); the dataset's name
      when it differs and ``allow_other_data``: its results belong under
      ``report/<name>/``.

    Raises:
      OtherDataError: it differs and ``allow_other_data`` is off, or its keypoint schema
        differs for a keypoint-pooling model (whose heads are sized by the points).
    """
    info = data_info(workdir)
    if not info:
        return None
    trained = (info.get("dataset"), int(info.get("image_size", 0)),
               info.get("keypoint_schema", "kneel16"))
    given = (name, trained[1] if image_size is None else int(image_size),
             trained[2] if keypoint_schema is None else keypoint_schema)
    if given == trained:
        return None
    what = "; ".join(f"{field} {b!r} (trained on {a!r})" for field, a, b in
                     zip(("dataset", "image size", "keypoint schema"), trained, given) if a != b)
    if trained[2] != given[2] and pooling == "keypoints":
        raise OtherDataError(f"{workdir} cannot evaluate on this dataset: {what}; a keypoint-"
                             f"pooling model needs the schema it was trained with")
    if not allow_other_data:
        raise OtherDataError(
            f"{workdir} was trained on other data: {what}. Leave --config.dataset, "
            f"--config.data_dir and --config.synthetic.* out to evaluate on the training data, "
            f"or pass --allow_other_data (results go to report/{name}/)")
    return name
