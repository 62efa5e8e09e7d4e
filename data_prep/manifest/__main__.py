"""Builds a dataset from a CSV manifest: ``python -m data_prep.manifest --manifest=CSV``.

Writes ``<data_dir>/manifest/<config>/<version>/`` and ``build_summary.json`` beside it.
Every row problem is reported with its row number (header = row 1) and the row is
skipped; ``--strict`` stops at any problem instead. The columns are described in
``data_prep/manifest/builder.py`` and docs/DATASETS.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_prep import tfds_util


def parse_args(argv=None) -> argparse.Namespace:
    from data_prep.manifest import builder as builder_lib

    defaults = builder_lib.ManifestOptions()
    parser = tfds_util.cli_parser("python -m data_prep.manifest", __doc__)
    parser.add_argument("--manifest", required=True, help="the CSV, one row per knee")
    parser.add_argument("--image_root", default=None,
                        help="folder of relative image/pts paths (default: the CSV's folder)")
    tfds_util.add_dataset_arguments(parser, config_name_note="; one name per manifest")
    parser.add_argument("--strict", action="store_true", help="any row problem is fatal")
    parser.add_argument("--image_size", type=int, default=defaults.image_size)
    parser.add_argument("--roi_mm", type=float, default=defaults.roi_mm,
                        help="ROI side in mm, for images with a pixel spacing (default %(default)s)")
    parser.add_argument("--roi_px", type=float, default=defaults.roi_px,
                        help="ROI side in source pixels; overrides --roi_mm (default: unused)")
    parser.add_argument("--window", choices=builder_lib.WINDOWS, default=defaults.window,
                        help="auto: 8-bit images unchanged, deeper ones by the percentiles of "
                             "the whole image; image, dicom (WindowCenter/Width) or roi")
    parser.add_argument("--window_percentiles", default="%g,%g" % defaults.window_percentiles)
    parser.add_argument("--pts_units", choices=builder_lib.PTS_UNITS, default=defaults.pts_units,
                        help="units of .pts files: auto = mm when the image has a pixel spacing")
    parser.add_argument("--unlabeled_subjects", choices=builder_lib.UNLABELED_SUBJECTS,
                        default=defaults.unlabeled_subjects,
                        help="'train' (default) leaves out ungraded rows of subjects graded in "
                             "validation/test; 'all' keeps them")
    parser.add_argument("--split_seed", type=int, default=defaults.split_seed)
    return parser.parse_args(argv)


def build(args) -> dict:
    """Builds the dataset; returns the build summary (also written as JSON)."""
    from data_prep.manifest import builder as builder_lib

    options = builder_lib.ManifestOptions(
        image_size=args.image_size, roi_mm=args.roi_mm, roi_px=args.roi_px, window=args.window,
        window_percentiles=tuple(float(p) for p in args.window_percentiles.split(",")),
        pts_units=args.pts_units, unlabeled_subjects=args.unlabeled_subjects,
        split_seed=args.split_seed)
    name = tfds_util.config_name(options, args.config_name)
    with tfds_util.without_custom_config_warning():
        builder = builder_lib.Manifest(
            data_dir=str(Path(args.data_dir).expanduser()),
            config=tfds_util.builder_config(builder_lib.ManifestConfig, name, options),
            manifest_path=args.manifest, image_root=args.image_root, strict=args.strict)
    return tfds_util.build_with_summary(
        builder, f"manifest/{name}", extra={"manifest": str(Path(args.manifest).resolve())},
        rebuild_hint="delete it (or use --config_name) to rebuild")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from data_prep.manifest import builder as builder_lib

    try:
        summary = build(parse_args(argv))
    except builder_lib.ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tfds_util.print_build_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
