"""kpn-jax command line: flags only; the logic lives in kpn_jax.

  python run.py --config=configs/demo.py --workdir=workdirs/demo            # train (resumes)
  python run.py --config=configs/demo.py --workdir=workdirs/demo --mode=evaluate --config.eval_split=test
  python run.py --config=configs/demo.py --workdir=workdirs/demo --mode=predict \
      --images=knee.png --keypoints=knee.csv --output=predictions/
  python run.py --config=configs/default.py --workdir=DIR --mode=fit_gmm
  python run.py --config=configs/default.py --config.model.depth=34 ...   # any config override
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.DEFINE_enum("mode", "train",
                  ["train", "evaluate", "predict", "fit_gmm", "compare_torch", "report"],
                  "What to do.")
flags.DEFINE_list("workdirs", [], "report: finished workdirs (globs allowed); runs with the same "
                  "config.method_name are seeds of one row.")
flags.DEFINE_string("split", "test", "report: which split's results to tabulate.")
flags.DEFINE_list("images", [], "predict: image files (PNG, JPEG, 16-bit PNG or DICOM).")
flags.DEFINE_list("keypoints", [], "predict: one keypoint file per image (CSV of x,y rows or "
                  "BoneFinder .pts); empty = the landmark detector of --landmark_workdir.")
flags.DEFINE_string("sides", "", "predict: side of each image, e.g. 'R,L' (default R).")
flags.DEFINE_string("output", "", "predict: output folder (default WORKDIR/predictions); "
                    "report: folder for the tables and charts.")
flags.DEFINE_string("landmark_workdir", "", "predict: workdir of a trained landmark detector, "
                    "used for images without --keypoints.")
flags.DEFINE_bool("allow_config_change", False, "train: resume a workdir with a config that "
                  "differs from the one it was trained with (the old one is kept beside it).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (None = auto/1).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_bool("multihost", False, "Multi-host with the cluster auto-detected by "
                  "jax.distributed.initialize() (TPU pod slices, SLURM, Open MPI).")

# Errors a user can fix: print one line and exit non-zero instead of a traceback.
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


def _run(argv) -> None:
    if not FLAGS["verbosity"].present:
        # Library INFO logs (orbax, grain, tfds) drown the progress lines; --verbosity=0 shows them.
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.mode == "report":
        from kpn_jax import reporting

        if not FLAGS.workdirs or not FLAGS.output:
            raise app.UsageError("--mode=report needs --workdirs=... and --output=DIR")
        reporting.write_experiment_report(FLAGS.workdirs, FLAGS.output, FLAGS.split)
        return
    if FLAGS.config is None:
        raise app.UsageError("--config is required (e.g. --config=configs/demo.py)")
    config_file = config_flags.get_config_filename(FLAGS["config"])
    if not os.path.exists(config_file.split(":")[0]):
        raise FileNotFoundError(f"config file {config_file} does not exist")
    if FLAGS.workdir is None and FLAGS.mode != "compare_torch":
        raise app.UsageError("--workdir is required")
    from kpn_jax import parallel

    if FLAGS.multihost or (FLAGS.num_processes and FLAGS.num_processes > 1):
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id, auto=FLAGS.multihost)
    config = FLAGS.config
    if FLAGS.mode in ("train", "evaluate", "fit_gmm"):
        from data_prep import synthetic_knee

        # The embedded synthetic knees are built on first use (identical builds are reused).
        synthetic_knee.build_for_config(config)
    if config.get("task") == "landmarks":
        _run_landmarks(config)
    elif FLAGS.mode == "train":
        from kpn_jax import train

        train.train_and_evaluate(config, FLAGS.workdir, FLAGS.allow_config_change)
    elif FLAGS.mode == "evaluate":
        from kpn_jax import train

        train.evaluate_checkpoint(config, FLAGS.workdir)
    elif FLAGS.mode == "fit_gmm":
        from kpn_jax import train

        train.fit_gmm_to_workdir(config, FLAGS.workdir)
    elif FLAGS.mode == "predict":
        from kpn_jax import predict

        predict.predict_files(config, FLAGS.workdir, FLAGS.images, FLAGS.keypoints or None,
                              sides=_sides(), output_dir=FLAGS.output or None,
                              landmark_workdir=FLAGS.landmark_workdir or None)
    elif FLAGS.mode == "compare_torch":
        from kpn_jax.interop import compare_torch

        compare_torch.main_with_config(config)


def _sides() -> list[str] | None:
    """``--sides='R,L'`` -> ``['R', 'L']``; ``None`` when not given."""
    return [s.strip() for s in FLAGS.sides.split(",") if s.strip()] if FLAGS.sides else None


def _run_landmarks(config) -> None:
    """The landmark detector (configs/landmarks.py) through the same modes."""
    from kpn_jax import landmarks_predict, landmarks_train

    if FLAGS.mode == "train":
        landmarks_train.train_and_evaluate_landmarks(config, FLAGS.workdir,
                                                     FLAGS.allow_config_change)
    elif FLAGS.mode == "evaluate":
        landmarks_train.evaluate_landmarks(config, FLAGS.workdir)
    elif FLAGS.mode == "predict":
        landmarks_predict.predict_landmark_files(FLAGS.workdir, FLAGS.images, sides=_sides(),
                                               output_dir=FLAGS.output or None)
    else:
        raise ValueError(f"--mode={FLAGS.mode} does not apply to a landmark config")


def parse_flags(argv):
    """absl flag parsing with a config typo reported in one line, not a traceback."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":")[0]
            if not os.path.isfile(path):
                print(f"error: --config file {path} does not exist", file=sys.stderr)
                sys.exit(2)
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        # ml_collections raises these for unknown or ill-typed --config.* overrides.
        text = re.sub(r"\\n|\\'|'|\"", " ", str(error))
        message = " ".join(text.split())
        print(f"error: bad config override: {message}", file=sys.stderr)
    sys.exit(2)


def _exit_now(code: int) -> None:
    """Flushes and leaves at once: background threads (data loading, checkpoint writers) may
    print tracebacks or crash while the interpreter shuts down, after the line that matters."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv) -> None:
    try:
        _run(argv)
    except KeyboardInterrupt:
        # The trainers saved a checkpoint and said so; no traceback.
        print("stopped by Ctrl-C", file=sys.stderr)
        _exit_now(130)
    except USER_ERRORS as error:
        logging.debug("error", exc_info=True)
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        print(f"error: {type(error).__name__}: {message}", file=sys.stderr)
        _exit_now(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
