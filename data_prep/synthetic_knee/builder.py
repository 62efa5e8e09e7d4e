"""TFDS builder ``synthetic_knee``: the generator's knees in the project's example format.

Splits are made per subject from contiguous runs of subjects (train, validation, test,
then unlabeled), so the counts are exact and no subject is in two splits; a split with an
odd count ends with a subject that has only its right knee. Stored images and keypoints
are in right-knee orientation (left knees flipped back with
``kpn_jax.roi.to_right_orientation``); ``side`` keeps the original side. ``unlabeled``
stores grades as all -1 (the generator still knows them: ``generator.generate_knee``).

Every parameter is part of the config name, so a build with the same parameters is found
and reused, and a different one never overwrites it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from data_prep import features as features_lib
from kpn_jax import roi as roi_lib
from data_prep import tfds_util
from data_prep.synthetic_knee import generator as generator_lib
from kpn_jax import datasets, storage
from kpn_jax import grades as grades_lib
from kpn_jax import keypoints as kp_lib

BUILDER_NAME = "synthetic_knee"
SUMMARY_FILE = "build_summary.json"  # written beside the data, as the other builders do
# Bump with any change to what the generator draws: builds are cached by version.
DATASET_VERSION = "2.0.0"
DEFAULTS = dict(image_size=generator_lib.DEFAULT_IMAGE_SIZE, num_train=2000, num_validation=500,
                num_test=500, num_unlabeled=2000, seed=0,
                rater_noise=generator_lib.DEFAULT_RATER_NOISE)


@dataclasses.dataclass(frozen=True)
class SyntheticKneeParams:
    """What a synthetic_knee build is made of; equal params give the same dataset."""

    image_size: int = DEFAULTS["image_size"]
    num_train: int = DEFAULTS["num_train"]
    num_validation: int = DEFAULTS["num_validation"]
    num_test: int = DEFAULTS["num_test"]
    num_unlabeled: int = DEFAULTS["num_unlabeled"]
    seed: int = DEFAULTS["seed"]
    rater_noise: float = DEFAULTS["rater_noise"]

    def __post_init__(self):
        for name in ("num_train", "num_validation", "num_test", "num_unlabeled", "seed"):
            generator_lib.check_int(f"synthetic_knee: {name}", getattr(self, name))
        generator_lib.check_int("synthetic_knee: image_size", self.image_size, minimum=32)
        if self.num_train + self.num_validation + self.num_test + self.num_unlabeled == 0:
            raise ValueError("synthetic_knee: all split counts are 0; nothing to build")
        if not 0.0 <= float(self.rater_noise) <= generator_lib.MAX_RATER_NOISE:
            raise ValueError(f"synthetic_knee: rater_noise must be in "
                             f"[0, {generator_lib.MAX_RATER_NOISE:.3f}], got {self.rater_noise}")

    @property
    def config_name(self) -> str:
        """E.g. ``px320_tr2000_va500_te500_un2000_seed0_noise0.1``."""
        return datasets.synthetic_config_name(
            self.image_size, self.num_train, self.num_validation, self.num_test,
            self.num_unlabeled, self.seed, self.rater_noise)

    @property
    def split_counts(self) -> dict[str, int]:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test,
                "unlabeled": self.num_unlabeled}


def split_indices(params: SyntheticKneeParams) -> dict[str, np.ndarray]:
    """Generator indices of each split: contiguous runs of subjects, two knees each.

    Returns:
      ``{split: int64 [count]}``; subject ``k`` owns indices ``2k`` (R) and ``2k + 1`` (L).
    """
    out, first_subject = {}, 0
    for split, count in params.split_counts.items():
        out[split] = 2 * first_subject + np.arange(count, dtype=np.int64)
        first_subject += (count + 1) // 2
    return out


def make_example(seed: int, index: int, image_size: int, rater_noise: float,
                 labelled: bool) -> dict:
    """One stored example (docs/DESIGN.md, section 3) from generator index ``index``."""
    knee = generator_lib.generate_knee(seed, int(index), image_size, rater_noise)
    image, keypoints = roi_lib.to_right_orientation(knee["image"], knee["keypoints"], knee["side"])
    grades = knee["grades"] if labelled else np.full(len(grades_lib.TASKS), grades_lib.MISSING)
    return features_lib.make_example(
        image=image, keypoints=keypoints, grades=grades, subject_id=knee["subject_id"],
        image_id=knee["image_id"], side=knee["side"],
        keypoints_valid=np.ones(kp_lib.KNEEL16.num_points, bool), keypoints_predicted=False)


def _make_example_job(job: tuple) -> dict:
    return make_example(*job)


def _make_examples(jobs: list[tuple], num_workers: int):
    """``make_example`` of each job, in order; in ``num_workers`` processes when > 1.

    Processes are spawned, not forked: the caller may have started JAX's threads, which a
    fork would copy mid-flight.
    """
    if num_workers <= 1:
        yield from map(_make_example_job, jobs)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers) as pool:
        yield from pool.imap(_make_example_job, jobs, chunksize=8)


@functools.cache
def _builder_class():
    """The TFDS config and builder classes, made once (TFDS registers builder classes by
    name) and only when a build is needed (TFDS is slow to import)."""
    import tensorflow_datasets as tfds

    @dataclasses.dataclass
    class SyntheticKneeConfig(tfds.core.BuilderConfig):
        params: SyntheticKneeParams = dataclasses.field(default_factory=SyntheticKneeParams)

    class SyntheticKnee(tfds.core.GeneratorBasedBuilder):
        """Procedural knee radiographs with KL/OARSI grades and kneel16 keypoints."""

        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {"1.0.0": "First release.",
                         "1.1.0": "Osteophytes 1.4x longer (learnable at 96-128 px).",
                         "2.0.0": "Images stored as raw uint8 pixels instead of PNG (no decoding when read)."}
        BUILDER_CONFIGS = [SyntheticKneeConfig(name=SyntheticKneeParams().config_name,
                                               params=SyntheticKneeParams())]

        def _info(self):
            params = self.builder_config.params
            return self.dataset_info_from_configs(
                description=("Synthetic knee radiographs (data_prep.synthetic_knee): grades "
                             "drawn from a latent severity, KL derived from the OARSI grades, "
                             "rater noise; exact kneel16 keypoints."),
                features=features_lib.example_features(params.image_size,
                                                       kp_lib.KNEEL16.num_points),
                metadata=tfds.core.MetadataDict(
                    keypoint_schema=kp_lib.KNEEL16.name, image_size=params.image_size,
                    seed=params.seed, rater_noise=float(params.rater_noise),
                    split_counts=params.split_counts, tasks=list(grades_lib.TASKS),
                    generator="data_prep.synthetic_knee.generator"),
                homepage="https://arxiv.org/abs/2112.09177",
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            params = self.builder_config.params
            # TFDS cannot write an empty split: a split of count 0 is left out.
            return {split: self._generate_examples(split, indices)
                    for split, indices in split_indices(params).items() if len(indices)}

        def __init__(self, *, num_workers: int = 1, **kwargs):
            super().__init__(**kwargs)
            self._num_workers = num_workers
            # What was written, per split: examples and stored KL grades (for the summary).
            self.written: dict[str, dict] = {}

        def _generate_examples(self, split, indices):
            params = self.builder_config.params
            jobs = [(params.seed, int(i), params.image_size, float(params.rater_noise),
                     split != "unlabeled") for i in indices]
            kl_counts = np.zeros(grades_lib.NUM_CLASSES["kl"], np.int64)
            self.written[split] = {"examples": 0, "kl_counts": kl_counts}
            for index, example in zip(indices, _make_examples(jobs, self._num_workers)):
                self.written[split]["examples"] += 1
                if example["grades"][0] >= 0:
                    kl_counts[example["grades"][0]] += 1
                yield int(index), example

    return SyntheticKneeConfig, SyntheticKnee


def build(data_dir: str | os.PathLike, image_size: int = DEFAULTS["image_size"],
          num_train: int = DEFAULTS["num_train"], num_validation: int = DEFAULTS["num_validation"],
          num_test: int = DEFAULTS["num_test"], num_unlabeled: int = DEFAULTS["num_unlabeled"],
          seed: int = DEFAULTS["seed"], rater_noise: float = DEFAULTS["rater_noise"],
          num_workers: int = 1) -> str:
    """Builds ``synthetic_knee`` under ``data_dir`` (reusing an identical build) and names it.

    ``num_workers > 1`` spawns that many processes to draw and encode the examples: faster
    on idle cores, slower on busy ones (each process starts Python and JAX), and the caller's
    main module must be import-safe. It changes the speed only, never the data.

    Returns:
      ``'synthetic_knee/<config>'``, to open with ``data_prep.tfds_util.data_sources``.

    Raises:
      ValueError: naming the parameter at fault.
    """
    params = SyntheticKneeParams(image_size=image_size, num_train=num_train,
                                 num_validation=num_validation, num_test=num_test,
                                 num_unlabeled=num_unlabeled, seed=seed,
                                 rater_noise=float(rater_noise))
    generator_lib.check_int("synthetic_knee: num_workers", num_workers, minimum=1)
    builder = make_builder(data_dir, params, num_workers)
    if not (Path(builder.data_dir) / "dataset_info.json").exists():
        start = time.perf_counter()
        tfds_util.prepare(builder)
        summary = {
            "dataset": f"{BUILDER_NAME}/{params.config_name}", "dataset_dir": str(builder.data_dir),
            "params": dataclasses.asdict(params), "num_workers": int(num_workers),
            "seconds": round(time.perf_counter() - start, 1),
            "splits": {split: {"examples": w["examples"], "kl_share": _shares(w["kl_counts"])}
                       for split, w in builder.written.items()}}
        (Path(builder.data_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return f"{BUILDER_NAME}/{params.config_name}"


def _shares(counts: np.ndarray) -> list[float] | None:
    """Counts as rounded shares; None when there are none (an unlabelled split)."""
    total = int(counts.sum())
    return np.round(counts / total, 4).tolist() if total else None


def make_builder(data_dir: str | os.PathLike, params: SyntheticKneeParams, num_workers: int = 1):
    """The TFDS builder of ``params`` under ``data_dir`` (nothing is built yet)."""
    config_cls, builder_cls = _builder_class()
    # TFDS refuses a config object named like the registered (default) one: name it.
    config = (params.config_name if params == SyntheticKneeParams()
              else config_cls(name=params.config_name, params=params))
    with tfds_util.without_custom_config_warning():
        return builder_cls(config=config, data_dir=str(Path(data_dir).expanduser()),
                           num_workers=int(num_workers))


def read_summary(data_dir: str | os.PathLike, name: str) -> dict:
    """The ``build_summary.json`` of a built dataset (``{}`` when there is none)."""
    path = tfds_util.dataset_dir(data_dir, name) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def build_for_config(config) -> list[str]:
    """Builds every synthetic dataset a run's config reads (``config.dataset``, or any of
    ``config.sources.*.dataset``) from ``config.synthetic``, unless already built.

    ``run.py`` calls it before training, so ``make demo`` needs no separate build step.
    Returns the names built or found.
    """
    datasets_read = [config.get("dataset")]
    datasets_read += [spec.get("dataset") for spec in config.get("sources", {}).values()]
    if BUILDER_NAME not in datasets_read:
        return []
    syn = config.synthetic
    params = dict(image_size=syn.image_size, num_train=syn.num_train,
                  num_validation=syn.num_validation, num_test=syn.num_test,
                  num_unlabeled=syn.num_unlabeled, seed=syn.seed, rater_noise=syn.rater_noise)
    if not storage.is_object_store(config.data_dir):
        return [build(os.path.expanduser(config.data_dir), **params)]
    # On gs://: built once in the local cache, then shared through the bucket.
    name = datasets.synthetic_dataset_name(syn)
    remote = storage.path(config.data_dir) / name
    if not storage.holds_dataset(remote):
        local_root = storage.cache_folder(config.data_dir, config.get("data_cache_dir",
                                                                      datasets.DEFAULT_CACHE))
        build(local_root, **params)
        storage.upload(local_root / name, remote)
    return [name]
