"""Builds kneeKL224: ``python -m data_prep.knee_kl224 --manual_dir=DIR --data_dir=DIR``.

``--manual_dir`` is the folder holding train/ val/ (and test/ if you have it), so the
same command builds the shared copy and a full one. Writes
``<data_dir>/knee_kl224/<config>/<version>/`` and ``build_summary.json`` beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_prep import tfds_util


def parse_args(argv=None) -> argparse.Namespace:
    from data_prep.knee_kl224 import builder as builder_lib

    defaults = builder_lib.KneeKl224Options()
    parser = tfds_util.cli_parser("python -m data_prep.knee_kl224", __doc__)
    parser.add_argument("--manual_dir", required=True, help="the kneeKL224 folder")
    tfds_util.add_dataset_arguments(parser)
    parser.add_argument("--image_size", type=int, default=defaults.image_size,
                        help="output size; %(default)s = the stored size, no resampling")
    parser.add_argument("--landmarks", choices=builder_lib.LANDMARK_CHOICES,
                        default=defaults.landmarks,
                        help="landmarks16.csv rows to use: ok=1 only (default), all, or none")
    parser.add_argument("--landmarks_csv", default=None,
                        help="keypoints CSV (default <manual_dir>/landmarks16.csv if present)")
    parser.add_argument("--keep_polarity", action="store_true",
                        help="do not invert the images whose grey levels are inverted")
    return parser.parse_args(argv)


def build(args) -> dict:
    """Builds the dataset; returns the build summary (also written as JSON)."""
    from data_prep.knee_kl224 import builder as builder_lib

    options = builder_lib.KneeKl224Options(image_size=args.image_size, landmarks=args.landmarks,
                                           fix_polarity=not args.keep_polarity)
    name = tfds_util.config_name(options, args.config_name)
    with tfds_util.without_custom_config_warning():
        builder = builder_lib.KneeKl224(
            data_dir=str(Path(args.data_dir).expanduser()),
            config=tfds_util.builder_config(builder_lib.KneeKl224Config, name, options),
            landmarks_csv=args.landmarks_csv)
    return tfds_util.build_with_summary(builder, f"knee_kl224/{name}", manual_dir=args.manual_dir)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = build(parse_args(argv))
    brief = {k: v for k, v in summary.items() if k != "polarity_inverted"}
    brief["polarity_inverted"] = len(summary.get("polarity_inverted", []))
    tfds_util.print_build_summary(summary, brief)
    return 0


if __name__ == "__main__":
    sys.exit(main())
