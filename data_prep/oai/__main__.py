"""Builds the OAI dataset: ``python -m data_prep.oai --manual_dir=DIR --data_dir=DIR``.

Writes ``<data_dir>/oai/<config>/<version>/`` and, next to it, ``build_summary.json``
(what was written, skipped and why); prints the summary. See docs/DATASETS.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_prep import tfds_util


def parse_args(argv=None) -> argparse.Namespace:
    from data_prep.oai import builder as builder_lib

    defaults = builder_lib.OaiOptions()
    parser = tfds_util.cli_parser("python -m data_prep.oai", __doc__)
    parser.add_argument("--manual_dir", required=True,
                        help="the OAI tree: <visit>m/contents.csv + DICOMs, readings, .pts")
    tfds_util.add_dataset_arguments(parser,
                                    data_dir_help="where TFDS datasets live (default %(default)s)")
    parser.add_argument("--image_size", type=int, default=defaults.image_size)
    parser.add_argument("--roi_mm", type=float, default=defaults.roi_mm,
                        help="side of the square ROI in mm (default %(default)s, as KNEEL)")
    parser.add_argument("--series_description", default=defaults.series_description)
    parser.add_argument("--readprj_priority", default=",".join(defaults.readprj_priority),
                        help="tie-break order of reading projects (default %(default)s)")
    parser.add_argument("--window", choices=builder_lib.WINDOWS, default=defaults.window,
                        help="grey-level window: percentiles of the whole radiograph (image), "
                             "the DICOM's WindowCenter/Width (dicom), or of the ROI (roi)")
    parser.add_argument("--window_percentiles", default="%g,%g" % defaults.window_percentiles)
    parser.add_argument("--unlabeled_subjects", choices=builder_lib.UNLABELED_SUBJECTS,
                        default=defaults.unlabeled_subjects,
                        help="whose ungraded knees go to 'unlabeled': 'train' (default) leaves "
                             "out subjects with graded knees in validation/test, so no held-out "
                             "subject is trained on; 'all' keeps every one")
    parser.add_argument("--split_seed", type=int, default=defaults.split_seed)
    parser.add_argument("--readings", nargs="*", default=None,
                        help="readings files (default: every kxr_sq_bu??.sas7bdat/.txt and "
                             "*kxrsemiquant*.txt under manual_dir)")
    parser.add_argument("--pts_dir", default=None, help="BoneFinder .pts tree (default manual_dir)")
    parser.add_argument("--kneel_csv", default=None, help="KNEEL's bf_landmarks_1_0.3.csv")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="threads decoding DICOMs (default 0: none)")
    return parser.parse_args(argv)


def options_from_args(args):
    from data_prep.oai import builder as builder_lib

    return builder_lib.OaiOptions(
        image_size=args.image_size, roi_mm=args.roi_mm,
        series_description=args.series_description,
        readprj_priority=tuple(p.strip() for p in args.readprj_priority.split(",") if p.strip()),
        window=args.window,
        window_percentiles=tuple(float(p) for p in args.window_percentiles.split(",")),
        unlabeled_subjects=args.unlabeled_subjects, split_seed=args.split_seed)


def build(args) -> dict:
    """Builds the dataset; returns the build summary (also written as JSON)."""
    from data_prep.oai import builder as builder_lib

    options = options_from_args(args)
    name = tfds_util.config_name(options, args.config_name)
    builder = builder_lib.Oai(
        data_dir=str(Path(args.data_dir).expanduser()),
        config=tfds_util.builder_config(builder_lib.OaiConfig, name, options),
        readings_files=args.readings, pts_dir=args.pts_dir, kneel_csv=args.kneel_csv,
        num_workers=args.num_workers)
    return tfds_util.build_with_summary(builder, f"oai/{name}", manual_dir=args.manual_dir)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tfds_util.print_build_summary(build(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
