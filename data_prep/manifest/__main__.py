"""Builds a dataset from a CSV manifest: ``python -m data_prep.manifest --manifest=CSV``.

Writes ``<data_dir>/manifest/<config>/<version>/`` and ``build_summary.json`` beside it.
Every row problem is reported with its row number (header = row 1) after the build and
the row is skipped; the command then exits 1 unless ``--allow_row_problems``;
``--strict`` stops at the first problem instead. The dataset records the manifest's
SHA-256: building again from an edited manifest under the same name is refused unless
``--rebuild`` (which replaces the dataset). The columns are described in
``data_prep/manifest/builder.py`` and docs/DATASETS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
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
    parser.add_argument("--allow_row_problems", action="store_true",
                        help="exit 0 although rows were skipped (they are still listed)")
    parser.add_argument("--rebuild", action="store_true",
                        help="replace a dataset of the same name built from another version "
                             "of the manifest")
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
    parser.add_argument("--keypoints", choices=builder_lib.KEYPOINT_SOURCES,
                        default=defaults.keypoints,
                        help="rows without keypoints: 'given' stores them whole; 'detector' "
                             "lets --landmark_workdir find the knee on the film and cuts it "
                             "out (e.g. unread films listed by data_prep.manifest.list_films)")
    parser.add_argument("--landmark_workdir", default=None,
                        help="a trained kneel16 detector (workdir or model folder, e.g. "
                             "kpn_jax/shipped/kneel16_detector) for --keypoints=detector")
    parser.add_argument("--id_salt_file", default=None,
                        help="a secret file of >= 16 random bytes: store subject and image ids "
                             "as salted pseudonyms (HMAC-SHA256) instead of as written")
    return parser.parse_args(argv)


def build(args) -> dict:
    """Builds the dataset; returns the build summary (also written as JSON)."""
    from data_prep.manifest import builder as builder_lib
    from kpn_jax import identifiers

    id_salt = identifiers.read_salt(args.id_salt_file) if args.id_salt_file else None
    detector, digest = None, ""
    if args.keypoints == "detector":
        if not args.landmark_workdir:
            raise builder_lib.ManifestError("--keypoints=detector needs --landmark_workdir (a "
                                            "trained kneel16 detector; docs/LANDMARKS.md)")
        from data_prep import fill_keypoints
        from kpn_jax import landmarks_predict

        detector = landmarks_predict.load_detector(args.landmark_workdir)
        digest = fill_keypoints.detector_digest(detector)

    options = builder_lib.ManifestOptions(
        image_size=args.image_size, roi_mm=args.roi_mm, roi_px=args.roi_px, window=args.window,
        window_percentiles=tuple(float(p) for p in args.window_percentiles.split(",")),
        pts_units=args.pts_units, unlabeled_subjects=args.unlabeled_subjects,
        split_seed=args.split_seed,
        id_salt_fingerprint=identifiers.salt_fingerprint(id_salt) if id_salt else "",
        keypoints=args.keypoints, detector_digest=digest)
    name = tfds_util.config_name(options, args.config_name)
    manifest_sha256 = hashlib.sha256(Path(args.manifest).read_bytes()).hexdigest()
    _check_existing_build(Path(args.data_dir).expanduser() / "manifest" / name, manifest_sha256,
                          args.rebuild)
    with tfds_util.without_custom_config_warning():
        builder = builder_lib.Manifest(
            data_dir=str(Path(args.data_dir).expanduser()),
            config=tfds_util.builder_config(builder_lib.ManifestConfig, name, options),
            manifest_path=args.manifest, image_root=args.image_root, strict=args.strict,
            id_salt=id_salt, detector=detector)
    return tfds_util.build_with_summary(
        builder, f"manifest/{name}", extra={"manifest": str(Path(args.manifest).resolve()),
                                            "manifest_sha256": manifest_sha256,
                                            "framing": options.framing().to_dict()},
        rebuild_hint="the manifest is unchanged, so it is not rebuilt")


def _check_existing_build(dataset_dir: Path, manifest_sha256: str, rebuild: bool) -> None:
    """An existing build of another manifest version is replaced (``rebuild``) or refused;
    one of this version is reused, and the user is told so.

    Raises:
      ManifestError: a build from another manifest version, without ``rebuild``.
    """
    from data_prep.manifest import builder as builder_lib

    builds = sorted(p for p in dataset_dir.glob("*") if (p / "dataset_info.json").exists())
    for build_dir in builds:
        summary_path = build_dir / tfds_util.SUMMARY_FILE
        recorded = (json.loads(summary_path.read_text()).get("manifest_sha256")
                    if summary_path.exists() else None)
        if recorded == manifest_sha256:
            print(f"{build_dir} was built from this manifest (same SHA-256): reused, not rebuilt")
            continue
        if not rebuild:
            raise builder_lib.ManifestError(
                f"{build_dir} was built from another version of the manifest (SHA-256 "
                f"{(recorded or 'not recorded')[:12]} then, {manifest_sha256[:12]} now): pass "
                "--rebuild to replace it, or --config_name=NEW to build beside it")
        print(f"replacing {build_dir} (built from another version of the manifest)")
        shutil.rmtree(build_dir)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from data_prep.manifest import builder as builder_lib

    args = parse_args(argv)
    try:
        summary = build(args)
    except (builder_lib.ManifestError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    problems = summary.get("row_problems", [])
    tfds_util.print_build_summary(summary, {k: v for k, v in summary.items()
                                            if k != "row_problems"})
    if summary.get("subject_ids_merged"):
        print(f"subject ids merged (they differ only in case or spaces): "
              f"{summary['subject_ids_merged']}")
    if problems:
        print(f"{len(problems)} row problem(s), those rows were skipped:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        if not args.allow_row_problems:
            print("error: rows were skipped (listed above): fix them, or pass "
                  "--allow_row_problems to use the dataset without them", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
