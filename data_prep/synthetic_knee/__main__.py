"""Builds the synthetic_knee TFDS dataset, times the generator, or draws the contact sheet.

  python -m data_prep.synthetic_knee --data_dir=~/tensorflow_datasets --image_size=320 \
      --num_train=2000 --num_validation=500 --num_test=500 --num_unlabeled=2000
  python -m data_prep.synthetic_knee --benchmark=300 --image_size=320
  python -m data_prep.synthetic_knee --contact_sheet=docs/images/synthetic_knees.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from data_prep.synthetic_knee import builder as builder_lib
from data_prep.synthetic_knee import preview


def _parser() -> argparse.ArgumentParser:
    d = builder_lib.DEFAULTS
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic_knee",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", default="~/tensorflow_datasets",
                        help="TFDS data directory to build into")
    parser.add_argument("--image_size", type=int, default=d["image_size"])
    parser.add_argument("--num_train", type=int, default=d["num_train"])
    parser.add_argument("--num_validation", type=int, default=d["num_validation"])
    parser.add_argument("--num_test", type=int, default=d["num_test"])
    parser.add_argument("--num_unlabeled", type=int, default=d["num_unlabeled"])
    parser.add_argument("--seed", type=int, default=d["seed"])
    parser.add_argument("--rater_noise", type=float, default=d["rater_noise"],
                        help="expected share of grades moved by one step")
    parser.add_argument("--num_workers", type=int, default=1,
                        help="processes that draw and encode examples (helps on idle cores only)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="only time the generator on N knees (one process) and print images/s")
    parser.add_argument("--contact_sheet", default="", metavar="PNG",
                        help="only draw the KL 0-4 contact sheet (200 px tiles) to this file")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.benchmark:
        result = preview.measure_speed(args.seed, args.image_size, args.benchmark)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                          for k, v in result.items()}))
        return 0
    if args.contact_sheet:
        preview.contact_sheet(args.seed).save(args.contact_sheet, optimize=True)
        print(f"wrote {args.contact_sheet}")
        return 0
    params = builder_lib.SyntheticKneeParams(
        image_size=args.image_size, num_train=args.num_train, num_validation=args.num_validation,
        num_test=args.num_test, num_unlabeled=args.num_unlabeled, seed=args.seed,
        rater_noise=args.rater_noise)
    data_dir = os.path.expanduser(args.data_dir)
    name = builder_lib.build(data_dir, **dataclasses.asdict(params), num_workers=args.num_workers)
    print(name)
    print(json.dumps(builder_lib.read_summary(data_dir, name), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
