"""Fills the missing keypoints of a built dataset with a trained landmark detector.

  python -m data_prep.fill_keypoints --data_dir=workdirs/data --dataset=knee_kl224/default \
      --detector=workdirs/landmarks [--mode=missing|all]

Writes a new TFDS dataset ``keypoints_filled/<config>`` beside the source (same splits,
same order-independent keys, same fields, same metadata plus where its keypoints came
from). An example whose keypoints are not all valid (``mode='missing'``), or every
example (``mode='all'``, so that training and evaluation see keypoints of one kind), gets
the detector's keypoints, all marked valid, with ``keypoints_predicted = True``; the
others are copied unchanged. The config name holds the source, the mode and a digest of
the detector's checkpoint, so a second call with the same inputs reuses the build and a
new detector never overwrites an old fill.

KPN training on detected keypoints: :func:`fill_keypoints` returns the name to put in
``config.dataset`` (or a config hook can call it; see docs/LANDMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

from data_prep import features as features_lib
from data_prep import tfds_util

BUILDER_NAME = "keypoints_filled"
DATASET_VERSION = "2.0.0"
MODES = ("missing", "all")
SUMMARY_FILE = "build_summary.json"


@dataclasses.dataclass(frozen=True)
class FillParams:
    """What a fill is made of; equal params give the same dataset."""

    source: str = ""              # 'builder/config' under the same data_dir
    detector: str = ""            # detector workdir (absolute)
    detector_digest: str = ""     # digest of the detector's checkpoint (files and step)
    mode: str = "missing"

    @property
    def config_name(self) -> str:
        """E.g. ``knee_kl224-default-missing-det1a2b3c4d``."""
        source = re.sub(r"[^\w.\-]", "-", self.source.replace("/", "-"))
        return f"{source}-{self.mode}-det{self.detector_digest}"


def needs_keypoints(valid: np.ndarray, mode: str) -> np.ndarray:
    """bool ``[M]``: examples to fill, from ``keypoints_valid`` ``[M, N]``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    valid = np.asarray(valid, bool)
    if mode == "all":
        return np.ones(valid.shape[0], bool)
    return ~valid.all(axis=1)


def detector_digest(detector) -> str:
    """8 hex digits naming a detector's checkpoint: its workdir, step and file sizes."""
    root = Path(detector.workdir) / "checkpoints" / detector.checkpoint["which"] / str(
        detector.checkpoint["step"])
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*")
                   if p.is_file()) if root.exists() else []
    text = json.dumps([detector.workdir, detector.checkpoint, files])
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def filled_examples(source, detector, mode: str, batch_size: int, counts: dict):
    """``(key, example)`` for every record of ``source``, detector keypoints where needed.

    ``counts`` gets ``{'examples': M, 'filled': F}``.
    """
    from kpn_jax import landmarks_predict

    counts.update(examples=0, filled=0)
    for start in range(0, len(source), batch_size):
        indices = list(range(start, min(start + batch_size, len(source))))
        records = [source[i] for i in indices]
        valid = np.stack([np.asarray(r["keypoints_valid"], bool) for r in records])
        fill = needs_keypoints(valid, mode)
        detected = None
        if fill.any():
            images = np.stack([np.asarray(r["image"], np.uint8) for r in records])[fill]
            detected = landmarks_predict.detect(detector, images, batch_size=batch_size)
        k = 0
        for index, record, filled in zip(indices, records, fill):
            num_points = np.asarray(record["keypoints"]).shape[0]
            if filled:
                keypoints, point_valid, predicted = detected[k], np.ones(num_points, bool), True
                k += 1
            else:
                keypoints = np.asarray(record["keypoints"], np.float32)
                point_valid = np.asarray(record["keypoints_valid"], bool)
                predicted = bool(record.get("keypoints_predicted", False))
            counts["examples"] += 1
            counts["filled"] += int(filled)
            yield f"{index:08d}", features_lib.make_example(
                np.asarray(record["image"], np.uint8), keypoints, record["grades"],
                subject_id=_text(record["subject_id"]), image_id=_text(record["image_id"]),
                side=_text(record["side"]), keypoints_valid=point_valid,
                keypoints_predicted=predicted)


@functools.cache
def _builder_class():
    """The TFDS config and builder classes, made once (TFDS registers builders by name)."""
    import tensorflow_datasets as tfds

    @dataclasses.dataclass
    class FillConfig(tfds.core.BuilderConfig):
        params: FillParams = dataclasses.field(default_factory=FillParams)

    class KeypointsFilled(tfds.core.GeneratorBasedBuilder):
        """A built dataset with detector keypoints where it had none."""

        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {
            "1.0.0": "First release.",
            "2.0.0": "Images stored as raw uint8 pixels instead of PNG (no decoding when read)."}

        def __init__(self, *, source_builder, detector, batch_size: int = 32, **kwargs):
            self._source = source_builder
            self._detector = detector
            self._batch_size = batch_size
            self.counts: dict[str, dict] = {}
            super().__init__(**kwargs)

        def _info(self):
            params = self.builder_config.params
            source_info = self._source.info
            image_size = int(source_info.metadata.get("image_size", 0)
                             or source_info.features["image"].shape[0])
            schema = source_info.metadata.get("keypoint_schema", "kneel16")
            metadata = dict(source_info.metadata or {})
            metadata.update(image_size=image_size, keypoint_schema=schema,
                            keypoints_filled=dict(source=params.source, mode=params.mode,
                                                  detector=params.detector,
                                                  detector_digest=params.detector_digest))
            return self.dataset_info_from_configs(
                description=f"{params.source} with keypoints filled by the landmark detector "
                            f"{params.detector} (mode {params.mode}).",
                features=features_lib.example_features(
                    image_size, source_info.features["keypoints"].shape[0]),
                metadata=tfds.core.MetadataDict(metadata))

        def _split_generators(self, dl_manager):
            del dl_manager
            sources = self._source.as_data_source()
            return {split: self._generate_examples(split, source)
                    for split, source in sources.items() if len(source)}

        def _generate_examples(self, split, source):
            self.counts[split] = {}
            yield from filled_examples(source, self._detector, self.builder_config.params.mode,
                                       self._batch_size, self.counts[split])

    return FillConfig, KeypointsFilled


def fill_keypoints(data_dir, dataset: str, detector_workdir, mode: str = "missing",
                   batch_size: int = 32, detector=None) -> str:
    """Builds (or finds) ``dataset`` with missing keypoints filled; returns its name.

    Args:
      data_dir: where ``dataset`` is built; the filled one is written there too.
      dataset: ``'builder/config'`` of the source.
      detector_workdir: a trained landmark detector's workdir.
      mode: ``'missing'`` (fill examples lacking any keypoint) or ``'all'``.
      detector: an already loaded :class:`kpn_jax.landmarks_predict.Detector` (optional).

    Returns:
      ``'keypoints_filled/<config>'``, to open like any built dataset.
    """
    from kpn_jax import landmarks_predict

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    data_dir = Path(data_dir).expanduser()
    source_builder = tfds_util.open_builder(data_dir, dataset)
    detector = detector or landmarks_predict.load_detector(detector_workdir)
    schema = source_builder.info.metadata.get("keypoint_schema", "kneel16")
    if schema != detector.keypoint_schema:
        raise ValueError(f"dataset {dataset} has keypoint schema {schema!r}, the detector finds "
                         f"{detector.keypoint_schema!r}")
    params = FillParams(source=dataset, detector=detector.workdir,
                        detector_digest=detector_digest(detector), mode=mode)
    name = f"{BUILDER_NAME}/{params.config_name}"
    try:
        tfds_util.dataset_dir(data_dir, name)
        return name  # built before with the same source, detector and mode
    except FileNotFoundError:
        pass
    config_cls, builder_cls = _builder_class()
    with tfds_util.without_custom_config_warning():
        builder = builder_cls(source_builder=source_builder, detector=detector,
                              batch_size=batch_size,
                              config=config_cls(name=params.config_name, params=params),
                              data_dir=str(data_dir))
    tfds_util.prepare(builder)
    summary = {"dataset": name, "source": dataset, "mode": mode, "detector": detector.workdir,
               "checkpoint": detector.checkpoint, "splits": builder.counts}
    (Path(builder.data_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.fill_keypoints",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="~/tensorflow_datasets")
    parser.add_argument("--dataset", required=True, help="source 'builder/config'")
    parser.add_argument("--detector", required=True, help="landmark detector workdir")
    parser.add_argument("--mode", choices=MODES, default="missing")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    # Through the package, not __main__: TFDS locates a builder class by its module's package.
    from data_prep import fill_keypoints as package_module

    name = package_module.fill_keypoints(args.data_dir, args.dataset, args.detector, args.mode,
                                         args.batch_size)
    summary_dir = tfds_util.dataset_dir(args.data_dir, name)
    print(f"{name} ({summary_dir})")
    summary = summary_dir / SUMMARY_FILE
    if summary.exists():
        print(summary.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
