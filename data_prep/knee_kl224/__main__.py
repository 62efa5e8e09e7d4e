"""Builds kneeKL224: ``python -m data_prep.knee_kl224 --manual_dir=DIR --data_dir=DIR``.

``--manual_dir`` is the folder holding train/ val/ (and test/ if you have it), so the
same command builds the shared copy and a full one. Writes
``<data_dir>/knee_kl224/<config>/<version>/`` and ``build_summary.json`` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path


def config_name(options, requested: str | None) -> str:
    """``requested``, else 'default' for default options, else a name from the changes."""
    if requested:
        return requested
    changed = [f"{f.name}{getattr(options, f.name)}" for f in dataclasses.fields(options)
               if getattr(options, f.name) != f.default]
    return re.sub(r"[^\w+.\-]", "_", "-".join(changed)) if changed else "default"


def parse_args(argv=None) -> argparse.Namespace:
    from data_prep.knee_kl224 import builder as builder_lib

    defaults = builder_lib.KneeKl224Options()
    parser = argparse.ArgumentParser(prog="python -m data_prep.knee_kl224", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manual_dir", required=True, help="the kneeKL224 folder")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets")
    parser.add_argument("--config_name", default=None,
                        help="TFDS config name (default: 'default', or one made from the options "
                             "that differ from the defaults)")
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
    import tensorflow_datasets as tfds

    from data_prep.knee_kl224 import builder as builder_lib

    options = builder_lib.KneeKl224Options(image_size=args.image_size, landmarks=args.landmarks,
                                           fix_polarity=not args.keep_polarity)
    name = config_name(options, args.config_name)
    # TFDS refuses a config object named like a registered one: name the registered one.
    registered = name == "default" and options == builder_lib.KneeKl224Options()
    builder = builder_lib.KneeKl224(
        data_dir=str(Path(args.data_dir).expanduser()),
        config=name if registered else builder_lib.KneeKl224Config(name=name, options=options),
        landmarks_csv=args.landmarks_csv)
    summary_path = Path(builder.data_dir) / "build_summary.json"
    if (Path(builder.data_dir) / "dataset_info.json").exists():
        logging.info("%s exists already; delete it to rebuild", builder.data_dir)
        return json.loads(summary_path.read_text()) if summary_path.exists() else {}
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(Path(args.manual_dir).expanduser())))
    summary = builder_lib.summary_as_json(builder.summary)
    summary["dataset"] = f"knee_kl224/{name}"
    summary["dataset_dir"] = str(builder.data_dir)
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = build(parse_args(argv))
    brief = {k: v for k, v in summary.items() if k != "polarity_inverted"}
    brief["polarity_inverted"] = len(summary.get("polarity_inverted", []))
    print(f"build summary of {summary.get('dataset')} "
          f"({summary.get('dataset_dir')}/build_summary.json):")
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
