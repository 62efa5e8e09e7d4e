"""TFDS builder ``synthetic_knee``: the generator's knees in the project's example format.

Splits are made per subject from contiguous runs of subjects (train, validation, test,
then unlabeled), so the counts are exact and no subject is in two splits; a split with an
odd count ends with a subject that has only its right knee. Stored images and keypoints
are in right-knee orientation (left knees flipped back with
``data_prep.roi.to_right_orientation``); ``side`` keeps the original side. ``unlabeled``
stores grades as all -1 (the generator still knows them: ``generator.generate_knee``).

Every parameter is part of the config name, so a build with the same parameters is found
and reused, and a different one never overwrites it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np

from data_prep import features as features_lib
from data_prep import roi as roi_lib
from data_prep import tfds_util
from data_prep.synthetic_knee import generator as generator_lib
from kpn_jax import grades as grades_lib
from kpn_jax import keypoints as kp_lib

BUILDER_NAME = "synthetic_knee"
DATASET_VERSION = "1.0.0"
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
        for name in ("image_size", "num_train", "num_validation", "num_test", "num_unlabeled",
                     "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"synthetic_knee: {name} must be a non-negative integer, got {value!r}")
        if self.image_size < 32:
            raise ValueError(f"synthetic_knee: image_size must be >= 32, got {self.image_size}")
        if self.num_train + self.num_validation + self.num_test + self.num_unlabeled == 0:
            raise ValueError("synthetic_knee: all split counts are 0; nothing to build")
        if not 0.0 <= float(self.rater_noise) <= generator_lib.MAX_RATER_NOISE:
            raise ValueError(f"synthetic_knee: rater_noise must be in "
                             f"[0, {generator_lib.MAX_RATER_NOISE:.3f}], got {self.rater_noise}")

    @property
    def config_name(self) -> str:
        """E.g. ``px320_tr2000_va500_te500_un2000_seed0_noise0.1``."""
        return (f"px{self.image_size}_tr{self.num_train}_va{self.num_validation}"
                f"_te{self.num_test}_un{self.num_unlabeled}_seed{self.seed}"
                f"_noise{float(self.rater_noise):g}")

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


def make_example(seed: int, index: int, image_size: int, rater_noise: float, labelled: bool) -> dict:
    """One stored example (DESIGN.md section 3) from generator index ``index``."""
    knee = generator_lib.generate_knee(seed, int(index), image_size, rater_noise)
    image, keypoints = roi_lib.to_right_orientation(knee["image"], knee["keypoints"], knee["side"])
    grades = knee["grades"] if labelled else np.full(len(grades_lib.TASKS), grades_lib.MISSING)
    return features_lib.make_example(
        image=image, keypoints=keypoints, grades=grades, subject_id=knee["subject_id"],
        image_id=knee["image_id"], side=knee["side"],
        keypoints_valid=np.ones(kp_lib.KNEEL16.num_points, bool), keypoints_predicted=False)


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
        RELEASE_NOTES = {DATASET_VERSION: "First release."}
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
            return {split: self._generate_examples(split, indices)
                    for split, indices in split_indices(params).items()}

        def _generate_examples(self, split, indices):
            params = self.builder_config.params
            for index in indices:
                yield int(index), make_example(params.seed, int(index), params.image_size,
                                               float(params.rater_noise),
                                               labelled=split != "unlabeled")

    return SyntheticKneeConfig, SyntheticKnee


def build(data_dir: str | os.PathLike, image_size: int = DEFAULTS["image_size"],
          num_train: int = DEFAULTS["num_train"], num_validation: int = DEFAULTS["num_validation"],
          num_test: int = DEFAULTS["num_test"], num_unlabeled: int = DEFAULTS["num_unlabeled"],
          seed: int = DEFAULTS["seed"], rater_noise: float = DEFAULTS["rater_noise"]) -> str:
    """Builds ``synthetic_knee`` under ``data_dir`` (reusing an identical build) and names it.

    Returns:
      ``'synthetic_knee/<config>'``, to open with ``data_prep.tfds_util.data_sources``.

    Raises:
      ValueError: naming the parameter at fault.
    """
    params = SyntheticKneeParams(image_size=image_size, num_train=num_train,
                                 num_validation=num_validation, num_test=num_test,
                                 num_unlabeled=num_unlabeled, seed=seed,
                                 rater_noise=float(rater_noise))
    config_cls, builder_cls = _builder_class()
    data_dir = Path(data_dir).expanduser()
    builder = builder_cls(config=config_cls(name=params.config_name, params=params),
                          data_dir=str(data_dir))
    tfds_util.prepare(builder)
    return f"{BUILDER_NAME}/{params.config_name}"
