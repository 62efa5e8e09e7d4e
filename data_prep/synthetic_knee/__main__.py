"""Builds the synthetic_knee TFDS dataset, times the generator, or draws the contact sheet.

  python -m data_prep.synthetic_knee --data_dir=~/tensorflow_datasets --image_size=320 \
      --num_train=2000 --num_validation=500 --num_test=500 --num_unlabeled=2000
  python -m data_prep.synthetic_knee --benchmark=300 --image_size=320
  python -m data_prep.synthetic_knee --contact_sheet=docs/images/synthetic_knees.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from data_prep.synthetic_knee import builder as builder_lib
from data_prep.synthetic_knee import generator as generator_lib
from data_prep.synthetic_knee import preview
from kpn_jax import grades as grades_lib


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
    parser.add_argument("--num_workers", type=int, default=None,
                        help="processes that generate examples (default: one per core, <= 4)")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="only time the generator on N knees (one process) and print images/s")
    parser.add_argument("--contact_sheet", default="", metavar="PNG",
                        help="only draw the KL 0-4 contact sheet (200 px tiles) to this file")
    return parser


def _grade_summary(params: builder_lib.SyntheticKneeParams) -> dict:
    """Per labelled split: share of each KL grade (as stored, after rater noise)."""
    summary = {}
    for split, indices in builder_lib.split_indices(params).items():
        if split == "unlabeled" or not len(indices):
            continue
        kl = np.array([generator_lib.sample_grades(params.seed, int(i), params.rater_noise).grades[0]
                       for i in indices])
        counts = np.bincount(kl, minlength=grades_lib.NUM_CLASSES["kl"])
        summary[split] = {f"kl{g}": round(float(c) / len(kl), 3) for g, c in enumerate(counts)}
    return summary


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.benchmark:
        result = preview.measure_speed(args.seed, args.image_size, args.benchmark)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))
        return 0
    if args.contact_sheet:
        preview.contact_sheet(args.seed).save(args.contact_sheet, optimize=True)
        print(f"wrote {args.contact_sheet}")
        return 0
    params = builder_lib.SyntheticKneeParams(
        image_size=args.image_size, num_train=args.num_train, num_validation=args.num_validation,
        num_test=args.num_test, num_unlabeled=args.num_unlabeled, seed=args.seed,
        rater_noise=args.rater_noise)
    start = time.perf_counter()
    name = builder_lib.build(os.path.expanduser(args.data_dir), **{
        field: getattr(params, field) for field in builder_lib.DEFAULTS}, num_workers=args.num_workers)
    seconds = time.perf_counter() - start
    print(name)
    print(json.dumps({"dataset": name, "data_dir": os.path.expanduser(args.data_dir),
                      "splits": params.split_counts, "image_size": params.image_size,
                      "keypoint_schema": "kneel16", "seconds": round(seconds, 1),
                      "kl_share": _grade_summary(params)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
