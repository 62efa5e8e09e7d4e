"""Building and opening TFDS datasets without TensorFlow (array_record + data_source).

Builders subclass ``tfds.core.GeneratorBasedBuilder`` and yield the dicts of
:func:`data_prep.features.make_example`; images arrive as PNG bytes, which is the
form TFDS can store without TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_FORMAT = "array_record"


def prepare(builder) -> None:
    """Writes ``builder``'s splits as array_record files (no-op when already built)."""
    builder.download_and_prepare(file_format=FILE_FORMAT)


def dataset_dir(data_dir: str | os.PathLike, name: str) -> Path:
    """The directory of a built dataset ``name`` = ``'builder/config'`` or ``'builder/config/version'``.

    The newest version is taken when none is given.

    Raises:
      FileNotFoundError: naming the directory searched and what to run.
    """
    root = Path(data_dir).expanduser() / name
    if (root / "dataset_info.json").exists():
        return root
    versions = sorted((p for p in root.glob("*") if (p / "dataset_info.json").exists()),
                      key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")))
    if not versions:
        raise FileNotFoundError(
            f"dataset {name!r} not found under {Path(data_dir).expanduser()} (looked for "
            f"{root}/<version>/dataset_info.json); build it first, e.g. "
            f"`python -m data_prep.<builder> --data_dir={data_dir}`")
    return versions[-1]


def open_builder(data_dir: str | os.PathLike, name: str):
    """A read-only builder for a built dataset; needs no builder code."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(str(dataset_dir(data_dir, name)))


def data_sources(data_dir: str | os.PathLike, name: str) -> dict:
    """``{split: random-access data source}`` of a built dataset, plus its builder's info."""
    builder = open_builder(data_dir, name)
    return builder.as_data_source(), builder.info
