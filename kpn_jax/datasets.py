"""Finding and opening built TFDS datasets (array_record, no TensorFlow, no builder code).

Datasets are built by the builders in ``data_prep`` (``python -m data_prep.<builder>``);
the library only reads them. ``name`` is ``'builder/config'`` or ``'builder/config/version'``
under a ``data_dir``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kpn_jax import storage

SYNTHETIC_BUILDER = "synthetic_knee"
DEFAULT_CACHE = "~/.cache/kpn_jax/datasets"   # local copies of datasets on gs://


def dataset_dir(data_dir: str | os.PathLike, name: str) -> Path:
    """The directory of the built dataset ``name``; the newest version when none is given.

    Raises:
      FileNotFoundError: naming the directory searched and what to run.
    """
    root = Path(data_dir).expanduser() / name
    if (root / "dataset_info.json").exists():
        return root
    versions = sorted((p for p in root.glob("*") if (p / "dataset_info.json").exists()),
                      key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")))
    if not versions:
        builder = name.split("/")[0]
        raise FileNotFoundError(
            f"dataset {name!r} not found under {Path(data_dir).expanduser()} (looked for "
            f"{root}/<version>/dataset_info.json); build it first, e.g. "
            f"`python -m data_prep.{builder} --data_dir={data_dir}`"
            + (" (run.py builds the synthetic knees itself)" if builder == SYNTHETIC_BUILDER
               else ""))
    return versions[-1]


def readable_data_dir(data_dir: str | os.PathLike, name: str,
                      cache_root: str | os.PathLike = DEFAULT_CACHE) -> str:
    """A local folder from which the built dataset ``name`` under ``data_dir`` can be read:
    ``data_dir`` itself (``~`` expanded), or for ``gs://`` a local copy of the dataset (and
    of the dataset it was derived from) under ``cache_root`` (:func:`kpn_jax.storage.local_copy`:
    made once, checked by file sizes).

    Raises:
      FileNotFoundError: ``data_dir`` does not exist, or (gs://) the dataset is not there.
      kpn_jax.storage.UnsupportedStorage: another URL scheme.
    """
    storage.check_supported(data_dir, "config.data_dir")
    if not storage.is_object_store(data_dir):
        local = os.path.expanduser(os.fspath(data_dir))
        if not os.path.isdir(local):
            raise FileNotFoundError(f"config.data_dir {local!r} does not exist")
        return local
    local_root = storage.cache_folder(data_dir, cache_root)
    remote = storage.path(data_dir) / name
    if not storage.holds_dataset(remote):
        raise FileNotFoundError(
            f"dataset {name!r} not found under {data_dir}; build it first, e.g. "
            f"`python -m data_prep.{name.split('/')[0]} --data_dir=<local folder>` and copy "
            f"the folder there" + (" (run.py builds the synthetic knees itself)"
                                   if name.split("/")[0] == SYNTHETIC_BUILDER else ""))
    storage.local_copy(remote, local_root / name)
    summary_path = dataset_dir(local_root, name) / "build_summary.json"
    source = json.loads(summary_path.read_text()).get("source") if summary_path.exists() else None
    if source and source != name:
        readable_data_dir(data_dir, source, cache_root)
    return str(local_root)


def stores_png(info) -> bool:
    """Whether a built dataset's images are PNG-encoded (builds before version 2.0.0), which
    still read, at several times the CPU per example (benchmarks/README.md)."""
    import tensorflow_datasets as tfds

    return isinstance(info.features["image"], tfds.features.Image)


def preprocessing(data_dir: str | os.PathLike, name: str) -> dict:
    """What a build did to each file, from the ``build_summary.json`` beside the data, so
    that predict can do the same to a file: ``{'fix_polarity': bool}`` (kneeKL224 inverts
    crops whose grey levels are inverted) and, for builds that record it, ``'framing'``
    (:class:`kpn_jax.framing.KneeFraming` as a dict: crop, window, size)."""
    try:
        summary_path = dataset_dir(data_dir, name) / "build_summary.json"
    except FileNotFoundError:
        return {"fix_polarity": False}
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if summary.get("source") and summary["source"] != name:
        # A derived dataset (data_prep.fill_keypoints) keeps its source's images as they are.
        return preprocessing(data_dir, summary["source"])
    found = {"fix_polarity": bool(summary.get("polarity_fixed", False))}
    if "framing" in summary:
        found["framing"] = summary["framing"]
    return found


def rebuild_hint(data_dir: str | os.PathLike, name: str) -> str:
    """What to run to rebuild ``name`` in the current (raw-pixel) format."""
    builder = name.split("/")[0]
    if builder == SYNTHETIC_BUILDER:
        return "run.py builds the new version itself on its next start"
    return (f"rebuild it with `python -m data_prep.{builder} --data_dir={data_dir}` and the "
            "options that built it (the new version is written beside the old one and read "
            "from then on)")


def open_builder(data_dir: str | os.PathLike, name: str):
    """A read-only TFDS builder of the built dataset ``name``; logs a warning for a dataset
    in the older PNG format."""
    import tensorflow_datasets as tfds

    directory = dataset_dir(data_dir, name)
    builder = tfds.builder_from_directory(str(directory))
    if stores_png(builder.info):
        logging.warning("dataset %s stores PNG images, whose decoding makes reading it several "
                        "times slower; %s", directory, rebuild_hint(data_dir, name))
    return builder


def data_sources(data_dir: str | os.PathLike, name: str) -> tuple[dict, object]:
    """``({split: random-access data source}, info)`` of the built dataset ``name``."""
    builder = open_builder(data_dir, name)
    return builder.as_data_source(), builder.info


def synthetic_config_name(image_size: int, num_train: int, num_validation: int, num_test: int,
                          num_unlabeled: int, seed: int, rater_noise: float) -> str:
    """The config name of a ``synthetic_knee`` build, e.g.
    ``px320_tr2000_va500_te500_un2000_seed0_noise0.1`` (equal parameters, equal data)."""
    return (f"px{image_size}_tr{num_train}_va{num_validation}_te{num_test}"
            f"_un{num_unlabeled}_seed{seed}_noise{float(rater_noise):g}")


def synthetic_dataset_name(synthetic) -> str:
    """``'synthetic_knee/<config>'`` of a config's ``synthetic`` section."""
    return f"{SYNTHETIC_BUILDER}/" + synthetic_config_name(
        synthetic.image_size, synthetic.num_train, synthetic.num_validation, synthetic.num_test,
        synthetic.num_unlabeled, synthetic.seed, synthetic.rater_noise)
