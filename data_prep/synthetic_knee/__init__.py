"""Procedural knee radiographs with coherent KL/OARSI grades and exact kneel16 keypoints.

- :func:`generate_knee` / :func:`generate_batch`: knees in memory, deterministic in
  ``(seed, index)``; ``generator`` holds the grade model and the renderer.
- :func:`build`: the TFDS dataset ``synthetic_knee/<config>`` (array_record).
- ``python -m data_prep.synthetic_knee --data_dir=DIR``: the same from the shell.

See docs/SYNTHETIC.md.
"""

from data_prep.synthetic_knee.builder import (BUILDER_NAME, DEFAULTS, SyntheticKneeParams, build,
                                              build_for_config, split_indices)
from data_prep.synthetic_knee.generator import generate_batch, generate_knee, sample_grades

__all__ = ["BUILDER_NAME", "DEFAULTS", "SyntheticKneeParams", "build", "build_for_config",
           "generate_batch",
           "generate_knee", "sample_grades", "split_indices"]
