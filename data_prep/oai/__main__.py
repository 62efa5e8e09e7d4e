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
    from data_prep.oai import readings as readings_lib

    defaults = builder_lib.OaiOptions()
    parser = tfds_util.cli_parser("python -m data_prep.oai", __doc__)
    parser.add_argument("--manual_dir", required=True,
                        help="the OAI tree: <visit>m/contents.csv + DICOMs, readings, .pts")
    tfds_util.add_dataset_arguments(parser,
                                    data_dir_help="where TFDS datasets live (default %(default)s)")
    parser.add_argument("--image_size", type=int, default=defaults.image_size)
    parser.add_argument("--roi_mm", type=float, default=defaults.roi_mm,
                        help="side of the square ROI in mm (default %(default)s, as KNEEL)")
    parser.add_argument("--series_descriptions", default="|".join(defaults.series_descriptions),
                        help="'|'-separated SeriesDescription / image_description values to "
                             "use (default: the bilateral and both one-knee PA fixed-flexion "
                             "views); one-knee films give the knee they name")
    parser.add_argument("--graded", choices=builder_lib.GRADED, default=defaults.graded,
                        help="a knee is labelled when its reading has all 7 grades (default; "
                             "the paper's split fits it) or any; under 'all' partly graded "
                             "knees are unlabelled data")
    parser.add_argument("--fill_blank_osteophytes", action="store_true",
                        help="blank osteophyte grades of participants never at KL >= 2 become "
                             "0 (the OAI leaves them blank by design)")
    parser.add_argument("--readprj_priority", default=",".join(defaults.readprj_priority),
                        help="order of reading projects (default %(default)s; 42 is read as "
                             "37)")
    parser.add_argument("--reading_choice", choices=readings_lib.CHOICES,
                        default=defaults.reading_choice,
                        help="one reading per knee and visit: by project order, completeness "
                             "breaking ties (priority, default), or the most complete first")
    parser.add_argument("--fractional_grades", choices=readings_lib.FRACTIONS,
                        default=defaults.fractional_grades,
                        help="grades with a fraction: rounded half to even as published code "
                             "does (default) or floored")
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
    parser.add_argument("--keypoints", choices=builder_lib.KEYPOINT_SOURCES,
                        default=defaults.keypoints,
                        help="files: BoneFinder .pts / KNEEL's CSV, knees without are skipped "
                             "(default); detector: files, else the landmark detector of "
                             "--landmark_workdir; detector_all: the detector for every knee")
    parser.add_argument("--landmark_workdir", default=None,
                        help="a trained kneel16 detector's workdir (configs/landmarks.py)")
    parser.add_argument("--num_workers", type=int, default=0,
                        help="threads decoding DICOMs (default 0: none)")
    return parser.parse_args(argv)


def load_detector(args):
    """The landmark detector of ``--landmark_workdir`` (None for ``--keypoints=files``)."""
    if args.keypoints == "files":
        return None
    if not args.landmark_workdir:
        raise SystemExit(f"--keypoints={args.keypoints} needs --landmark_workdir (a trained "
                         "kneel16 detector; docs/LANDMARKS.md)")
    from kpn_jax import landmarks_predict

    return landmarks_predict.load_detector(args.landmark_workdir)


def options_from_args(args, detector=None):
    from data_prep.oai import builder as builder_lib

    digest = ""
    if detector is not None:
        from data_prep import fill_keypoints

        digest = fill_keypoints.detector_digest(detector)
    return builder_lib.OaiOptions(
        image_size=args.image_size, roi_mm=args.roi_mm,
        series_descriptions=tuple(d.strip() for d in args.series_descriptions.split("|")
                                  if d.strip()),
        readprj_priority=tuple(p.strip() for p in args.readprj_priority.split(",") if p.strip()),
        reading_choice=args.reading_choice, fractional_grades=args.fractional_grades,
        graded=args.graded, fill_blank_osteophytes=args.fill_blank_osteophytes,
        window=args.window,
        window_percentiles=tuple(float(p) for p in args.window_percentiles.split(",")),
        unlabeled_subjects=args.unlabeled_subjects, split_seed=args.split_seed,
        keypoints=args.keypoints, detector_digest=digest)


def build(args) -> dict:
    """Builds the dataset; returns the build summary (also written as JSON)."""
    from data_prep.oai import builder as builder_lib

    detector = load_detector(args)
    options = options_from_args(args, detector)
    name = tfds_util.config_name(options, args.config_name)
    with tfds_util.without_custom_config_warning():
        builder = builder_lib.Oai(
            data_dir=str(Path(args.data_dir).expanduser()),
            config=tfds_util.builder_config(builder_lib.OaiConfig, name, options),
            readings_files=args.readings, pts_dir=args.pts_dir, kneel_csv=args.kneel_csv,
            num_workers=args.num_workers, detector=detector)
    return tfds_util.build_with_summary(builder, f"oai/{name}", manual_dir=args.manual_dir,
                                        extra={"framing": options.framing().to_dict()})


def main(argv=None) -> int:
    from data_prep.oai import readings as readings_lib
    from data_prep.oai import tree as tree_lib

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        summary = build(args)
    except (FileNotFoundError, RuntimeError, tree_lib.TreeError,
            readings_lib.ReadingsError) as e:
        # What the user must change, without a traceback; nothing was written.
        print(f"error: {e}", file=sys.stderr)
        return 1
    tfds_util.print_build_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
