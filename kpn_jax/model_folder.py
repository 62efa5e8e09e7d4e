"""A trained model as a small, checksummed folder that predict and evaluate read like a workdir.

A workdir holds everything a run needs to go on (optimizer moments, several checkpoints,
logs): tens of MB. A model folder holds what grading needs, written by ``run.py
--mode=export``:

- ``variables.msgpack``: the evaluation weights (the moving average where the run kept
  one) and BatchNorm statistics, ``flax.serialization.msgpack_serialize`` of
  ``{'params': ..., 'batch_stats': ...}``;
- ``config.json``: the whole config, every field filled, so that no config file is needed
  to read it; ``data_info.json``: the training data's image size, keypoint schema and
  preprocessing (the data folder left out: it meant something only where it was trained);
- ``gmm.npz`` when the run fitted one;
- ``manifest.json``: the format, the kind of model, the checkpoint it came from and the
  SHA-256 of every other file, checked on every load, so a damaged or replaced file is an
  error, never a silently different model.

kpn-jax ships two (:data:`SHIPPED_GRADER`, :data:`SHIPPED_DETECTOR`, described in
``kpn_jax/shipped/MODEL_CARD.md``); ``run.py --mode=predict`` without ``--workdir`` uses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

MANIFEST = "manifest.json"
VARIABLES = "variables.msgpack"
FORMAT = 1
PORTABLE_DATA_DIR = "~/tensorflow_datasets"
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
SHIPPED_GRADER = SHIPPED_DIR / "kneekl224_kl_grader"
SHIPPED_DETECTOR = SHIPPED_DIR / "kneel16_detector"


class ModelFolderError(ValueError):
    """A model folder that is incomplete, damaged or of another kind; the message names the file."""


def is_model_folder(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / MANIFEST).is_file()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def write(out_dir: str | os.PathLike, *, kind: str, config: Mapping, data_info: Mapping,
          variables: Mapping, checkpoint: Mapping, extra_files: Mapping[str, Path] = (),
          description: Mapping | None = None) -> Path:
    """Writes a model folder (replacing one already at ``out_dir``) and returns its path.

    Args:
      kind: ``'grader'`` or ``'landmarks'``.
      config: the whole config as plain data (``ConfigDict.to_dict()``); its ``data_dir``
        becomes ``~/tensorflow_datasets``.
      data_info: the workdir's ``data_info.json``; its ``data_dir`` is dropped.
      variables: ``{'params': ..., 'batch_stats': ...}`` as trained (arrays).
      checkpoint: where the weights came from, e.g. ``{'which': 'best', 'step': 2896}``.
      extra_files: ``{name in the folder: source file}``, e.g. ``{'gmm.npz': ...}``.
      description: free-form facts kept in the manifest (training data, metrics).
    """
    from flax import serialization

    if kind not in ("grader", "landmarks"):
        raise ValueError(f"kind must be 'grader' or 'landmarks', got {kind!r}")
    out_dir = Path(out_dir).expanduser()
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / VARIABLES).write_bytes(serialization.msgpack_serialize(_to_numpy(variables)))
    # The training machine's data folder means nothing elsewhere: TFDS's default instead
    # (evaluate takes --config.data_dir).
    config = {**dict(config), "data_dir": PORTABLE_DATA_DIR} if "data_dir" in config else config
    (staging / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    info = {k: v for k, v in data_info.items() if k != "data_dir"}
    (staging / "data_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    for name, source in dict(extra_files).items():
        shutil.copyfile(source, staging / name)
    files = sorted(p.name for p in staging.iterdir())
    manifest = {"format": FORMAT, "kind": kind, "checkpoint": dict(checkpoint),
                "description": dict(description or {}),
                "sha256": {name: sha256(staging / name) for name in files}}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)  # a reader never sees a half-written folder
    return out_dir


def read_manifest(path: str | os.PathLike, kind: str | None = None) -> dict:
    """The verified manifest: every listed file present with its recorded SHA-256.

    Raises:
      ModelFolderError: naming the missing or damaged file, or the wrong kind.
    """
    path = Path(path).expanduser()
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ModelFolderError(f"{path} is not a model folder ({MANIFEST} missing)")
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded = dict(manifest["sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise ModelFolderError(f"{manifest_path} is damaged: {error}") from None
    if manifest.get("format") != FORMAT:
        raise ModelFolderError(f"{manifest_path}: format {manifest.get('format')!r}, this "
                               f"version of kpn-jax reads format {FORMAT}")
    if kind is not None and manifest.get("kind") != kind:
        raise ModelFolderError(f"{path} holds a {manifest.get('kind')!r} model, not a {kind!r} "
                               "model")
    for name in (VARIABLES, "config.json", "data_info.json"):
        if name not in recorded:
            raise ModelFolderError(f"{manifest_path} does not list {name}")
    for name, expected in recorded.items():
        file = path / name
        if not file.is_file():
            raise ModelFolderError(f"{file} is missing from the model folder")
        if sha256(file) != expected:
            raise ModelFolderError(f"{file} does not match its SHA-256 in {MANIFEST}: the file "
                                   "is damaged or was replaced")
    return manifest


def read_config(path: str | os.PathLike):
    """The folder's whole config as an ``ml_collections.ConfigDict`` (checksums verified):
    no config file is needed to grade with a model folder."""
    import ml_collections

    from kpn_jax import workdir_config

    read_manifest(path)
    saved = json.loads((Path(path).expanduser() / "config.json").read_text())
    return ml_collections.ConfigDict(workdir_config.with_tuples(saved))


def read_variables(path: str | os.PathLike, template: Any | None = None) -> dict:
    """The weights as numpy arrays; with ``template`` (the model's own variables or their
    shapes) every array's path and shape are checked against the model.

    Raises:
      ModelFolderError: a damaged file, or weights of another architecture.
    """
    import jax
    from flax import serialization

    path = Path(path).expanduser()
    read_manifest(path)
    variables = serialization.msgpack_restore((path / VARIABLES).read_bytes())
    if template is not None:
        expected = {jax.tree_util.keystr(k): tuple(np.shape(v))
                    for k, v in jax.tree_util.tree_leaves_with_path(template)}
        found = {jax.tree_util.keystr(k): tuple(np.shape(v))
                 for k, v in jax.tree_util.tree_leaves_with_path(variables)}
        if expected != found:
            differing = sorted(set(expected.items()) ^ set(found.items()))
            raise ModelFolderError(f"{path / VARIABLES} does not fit the model its config.json "
                                   f"describes (first difference: {differing[0]})")
    return variables
