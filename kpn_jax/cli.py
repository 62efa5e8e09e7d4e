"""``kpn-jax``: grade knee crops with a model folder (the shipped one by default), no workdir,
no config file, no keypoint files.

  kpn-jax predict knees/                          # KL grade + probabilities, overlay, CSV
  kpn-jax predict a.png b.dcm --sides=R,L --output=graded
  kpn-jax evaluate --data_dir=~/tensorflow_datasets --split=validation
  kpn-jax serve                                   # a local page to grade files (web extra)
  kpn-jax info                                    # what the shipped models are

The shipped models are described in ``kpn_jax/shipped/MODEL_CARD.md``. Training and
everything else: ``run.py`` in the repository.
"""

from __future__ import annotations

import argparse
import json
import sys

from kpn_jax import model_folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kpn-jax", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = (f"model folder of a KL/OARSI grader (run.py --mode=export); default: the "
                  f"shipped kneeKL224 KL grader")

    predict = commands.add_parser("predict", help="grade image files or folders")
    predict.add_argument("images", nargs="+", help="image files (PNG, JPEG, 16-bit PNG, DICOM), "
                         "folders or glob patterns")
    predict.add_argument("--model", default=str(model_folder.SHIPPED_GRADER), help=model_help)
    predict.add_argument("--detector", default=str(model_folder.SHIPPED_DETECTOR),
                         help="landmark detector (model folder or workdir) for images without "
                              "--keypoints; 'none' to skip keypoints (global-pooling models)")
    predict.add_argument("--keypoints", nargs="*", default=[],
                         help="one keypoint file per image (CSV of x,y rows or .pts)")
    predict.add_argument("--sides", default="", help="side of each image, e.g. R,L (default: "
                         "from kneeKL224-style file names <id>L.png, else right)")
    predict.add_argument("--output", default="predictions", help="output folder")
    predict.add_argument("--id_salt_file", default="",
                         help="a secret file of >= 16 random bytes: name each image by its "
                              "salted pseudonym instead of its path in every output")

    evaluate = commands.add_parser("evaluate", help="evaluate on a built dataset split")
    evaluate.add_argument("--model", default=str(model_folder.SHIPPED_GRADER), help=model_help)
    evaluate.add_argument("--data_dir", required=True, help="TFDS data folder with the built "
                          "dataset the model was trained on (e.g. knee_kl224)")
    evaluate.add_argument("--split", default="validation")
    evaluate.add_argument("--output", default="report", help="report folder")

    serve = commands.add_parser("serve", help="a local page to grade radiographs and browse "
                                "an evaluated split (needs the web extra)")
    serve.add_argument("--model", default=str(model_folder.SHIPPED_GRADER), help=model_help)
    serve.add_argument("--detector", default=str(model_folder.SHIPPED_DETECTOR),
                       help="landmark detector (model folder or workdir); 'none' for a "
                            "global-pooling model without keypoints in its overlays")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: "
                       "this machine only)")
    serve.add_argument("--port", type=int, default=8000)

    info = commands.add_parser("info", help="print a model folder's manifest")
    info.add_argument("--model", default=str(model_folder.SHIPPED_GRADER), help=model_help)
    return parser


def run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.command == "info":
        manifest = model_folder.read_manifest(args.model)
        print(json.dumps(manifest, indent=2))
        print(f"model card: {model_folder.SHIPPED_DIR / 'MODEL_CARD.md'}")
        return 0
    config = model_folder.read_config(args.model)
    if config.get("task") == "landmarks":
        raise ValueError(f"{args.model} is a landmark detector; --model takes a grader")
    if args.command == "predict":
        from kpn_jax import predict

        sides = [s.strip() for s in args.sides.split(",") if s.strip()] or None
        detector = None if args.keypoints or args.detector == "none" else args.detector
        from kpn_jax import identifiers

        salt = identifiers.read_salt(args.id_salt_file) if args.id_salt_file else None
        predict.predict_files(config, args.model, args.images, args.keypoints or None,
                              sides=sides, output_dir=args.output, landmark_workdir=detector,
                              id_salt=salt)
        return 0
    if args.command == "serve":
        from kpn_jax import serve

        serve.serve(config, args.model, None if args.detector == "none" else args.detector,
                    host=args.host, port=args.port)
        return 0
    from kpn_jax import train

    config.data_dir = args.data_dir
    train.evaluate_checkpoint(config, args.model, split=args.split, report_dir=args.output)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one line on a user error, exit 1."""
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"error: {message}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
