"""Building and opening TFDS datasets without TensorFlow (array_record + data_source).

Builders subclass ``tfds.core.GeneratorBasedBuilder`` and yield the dicts of
:func:`data_prep.features.make_example`; images arrive as uint8 arrays stored as one bytes
value each (TFDS encodes that without TensorFlow), in uncompressed array_record files.

Opening a built dataset is the library's (:mod:`kpn_jax.datasets`, re-exported here). The
OAI, kneeKL224 and manifest builders and their command lines share the helpers below:
config naming, argument parsing, building with a
``build_summary.json`` beside the data, and the builders' ``_info`` /
``_split_generators``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
from pathlib import Path

from kpn_jax.datasets import data_sources, dataset_dir, open_builder  # noqa: F401  (builders' API)

FILE_FORMAT = "array_record"
# Records stay uncompressed: TFDS writes array_record with its default compression, which
# saved about 10 % of disk on 320 px synthetic knees and made each read several times dearer
# than a plain copy.
RECORD_OPTIONS = "group_size:1,uncompressed"


def rewrite_uncompressed(directory: str | os.PathLike) -> None:
    """Rewrites the array_record files in ``directory`` with :data:`RECORD_OPTIONS`, each
    through a temporary file replaced at once, so an interrupted rewrite leaves readable files."""
    from array_record.python import array_record_module

    for path in sorted(Path(directory).glob(f"*.{FILE_FORMAT}-*-of-*")):
        reader = array_record_module.ArrayRecordReader(str(path))
        records = reader.read_all()
        reader.close()
        temporary = path.with_name(path.name + ".tmp")
        writer = array_record_module.ArrayRecordWriter(str(temporary), RECORD_OPTIONS)
        for record in records:
            writer.write(record)
        writer.close()
        os.replace(temporary, path)


class _DropCustomConfigWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def without_custom_config_warning():
    """Constructs builders without TFDS's "Using custom data configuration: <repr>" warning:
    every configuration of these builders is made from options, so the warning (with the
    config's repr) would print on every run."""
    absl_logger = logging.getLogger("absl")
    dropper = _DropCustomConfigWarning()
    absl_logger.addFilter(dropper)
    try:
        yield
    finally:
        absl_logger.removeFilter(dropper)


def download_and_prepare(builder, **kwargs) -> None:
    """``builder.download_and_prepare`` (array_record) in words that fit a generated or local
    dataset: one line saying what is built where, not TFDS's "Downloading and preparing
    dataset Unknown size" lines, and progress bars only on a terminal (their carriage
    returns and cursor codes would fill a log file)."""
    import sys

    import tensorflow_datasets as tfds

    # Instance attributes shadow TFDS's two bold download messages (nothing is downloaded).
    builder._log_download_bytes = lambda: None
    builder._log_download_done = lambda: None
    if not sys.stderr.isatty():
        tfds.disable_progress_bar()
    print(f"building {builder.name}/{builder.builder_config.name if builder.builder_config else ''}"
          f" in {builder.data_dir}", flush=True)
    builder.download_and_prepare(file_format=FILE_FORMAT, **kwargs)


def prepare(builder) -> None:
    """Writes ``builder``'s splits as uncompressed array_record files (no-op when built)."""
    if (Path(builder.data_dir) / "dataset_info.json").exists():
        return
    download_and_prepare(builder)
    rewrite_uncompressed(builder.data_dir)


SUMMARY_FILE = "build_summary.json"
CONFIG_NAME_HELP = ("TFDS config name (default: 'default', or one made from the options "
                    "that differ from the defaults)")


def summary_as_json(summary: dict) -> dict:
    """The summary with Counters turned into plain dicts."""
    return {k: dict(sorted(v.items())) if isinstance(v, collections.Counter) else v
            for k, v in summary.items()}


def config_name(options, requested: str | None) -> str:
    """``requested``, else 'default' for default options, else a name from the changes.

    ``options`` is a dataclass; each field that differs from its default adds
    ``<field><value>`` (tuples joined with '+'), the parts joined with '-'.
    """
    if requested:
        return requested
    changed = []
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        if value != field.default:
            text = "+".join(map(str, value)) if isinstance(value, tuple) else str(value)
            changed.append(f"{field.name}{text}")
    return re.sub(r"[^\w+.\-]", "_", "-".join(changed)) if changed else "default"


def builder_config(config_cls, name: str, options):
    """What to pass as a builder's ``config``: ``config_cls(name=name, options=options)``, or
    just ``name`` for the registered 'default' config (TFDS refuses a config object named
    like a registered one)."""
    if name == "default" and options == type(options)():
        return name
    return config_cls(name=name, options=options)


def cli_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A builder command line's parser; ``description`` (the module docstring) kept as written."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_dataset_arguments(parser: argparse.ArgumentParser, data_dir_help: str | None = None,
                          config_name_note: str = "") -> None:
    """Adds ``--data_dir`` (default ~/tensorflow_datasets) and ``--config_name``."""
    parser.add_argument("--data_dir", default="~/tensorflow_datasets", help=data_dir_help)
    parser.add_argument("--config_name", default=None, help=CONFIG_NAME_HELP + config_name_note)


def build_with_summary(builder, dataset_name: str, manual_dir: str | os.PathLike | None = None,
                       extra: dict | None = None,
                       rebuild_hint: str = "delete it to rebuild") -> dict:
    """Builds ``builder`` (array_record) and writes its summary as ``build_summary.json``
    beside the data; returns that summary.

    The summary is :func:`summary_as_json` of ``builder.summary`` plus ``dataset``
    (``dataset_name``), ``dataset_dir`` and ``extra``. An existing dataset is not rebuilt:
    the summary of the build that made it is returned ({} when it has none).

    Args:
      manual_dir: TFDS's manual_dir (``~`` expanded), for builders that read one.
      rebuild_hint: what the log line about an existing dataset says to do.
    """
    import tensorflow_datasets as tfds

    summary_path = Path(builder.data_dir) / SUMMARY_FILE
    if (Path(builder.data_dir) / "dataset_info.json").exists():
        # TFDS does not rebuild an existing dataset; keep the summary of the build that made it.
        logging.info("%s exists already; %s", builder.data_dir, rebuild_hint)
        return json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if manual_dir is None:
        download_and_prepare(builder)
    else:
        download_and_prepare(builder, download_config=tfds.download.DownloadConfig(
            manual_dir=str(Path(manual_dir).expanduser())))
    rewrite_uncompressed(builder.data_dir)
    summary = summary_as_json(builder.summary)
    summary["dataset"] = dataset_name
    summary["dataset_dir"] = str(builder.data_dir)
    summary.update(extra or {})
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def print_build_summary(summary: dict, shown: dict | None = None) -> None:
    """Prints where the summary lies, then ``shown`` (default: the summary) as JSON."""
    print(f"build summary of {summary.get('dataset')} "
          f"({summary.get('dataset_dir')}/{SUMMARY_FILE}):")
    print(json.dumps(summary if shown is None else shown, indent=1))


def example_info(builder, homepage: str | None = None, **metadata):
    """``_info`` of a builder of :func:`data_prep.features.make_example` dicts.

    The features are at ``builder.options.image_size`` with kneel16 keypoints; the
    metadata holds the keypoint schema, the image size, ``metadata`` and the options.
    """
    import tensorflow_datasets as tfds

    from data_prep import features as features_lib
    from kpn_jax import keypoints as kp_lib

    options = builder.options
    return builder.dataset_info_from_configs(
        features=features_lib.example_features(options.image_size, kp_lib.KNEEL16.num_points),
        metadata=tfds.core.MetadataDict(
            keypoint_schema=kp_lib.KNEEL16.name, image_size=options.image_size, **metadata,
            options=dataclasses.asdict(options)),
        homepage=homepage,
    )


def split_generators(builder, jobs: dict, source, what: str, error=RuntimeError) -> dict:
    """``_split_generators``'s result, ``{split: builder._generate_examples(split_jobs)}``.

    Raises:
      error: when ``jobs`` is empty (TFDS cannot write an empty dataset), naming
        ``source``, ``what`` was not found and ``builder.summary``.
    """
    if not jobs:
        raise error(f"{source}: no {what} to write: {summary_as_json(builder.summary)}")
    return {split: builder._generate_examples(split_jobs)  # pylint: disable=protected-access
            for split, split_jobs in jobs.items()}
