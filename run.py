"""kpn-jax command line: flags only; the logic lives in kpn_jax.

  python run.py --config=configs/demo.py --workdir=workdirs/demo            # train (resumes)
  python run.py --workdir=workdirs/demo --mode=evaluate --config.eval_split=test  # its own config
  python run.py --workdir=workdirs/demo --mode=predict --images=knee.png --keypoints=knee.csv
  python run.py --mode=predict --images=knees/      # the shipped kneeKL224 KL grader + detector
  python run.py --workdir=workdirs/demo --mode=export --output=my_model   # a small model folder
  python run.py --workdir=workdirs/demo --mode=serve   # a local page: grade files, browse mistakes
  python run.py --config=configs/default.py --workdir=DIR --mode=fit_gmm
  python run.py --config=configs/default.py --config.model.depth=34 ...   # any config override
"""

import os
import re
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report; for "
                    "evaluate/predict also a model folder (--mode=export); without it they use "
                    "the shipped kneeKL224 KL grader.")
flags.DEFINE_enum("mode", "train",
                  ["train", "evaluate", "predict", "export", "fit_gmm", "compare_torch",
                   "report", "serve"],
                  "What to do.")
flags.DEFINE_list("workdirs", [], "report: finished workdirs (globs allowed); runs whose "
                  "configs differ only in the seed (and paths, threads, logging) are one row.")
flags.DEFINE_string("split", "test", "report: which split's results to tabulate.")
flags.DEFINE_list("images", [], "predict: comma-separated image files (PNG, JPEG, 16-bit PNG "
                  "or DICOM), folders (every image file in them) or glob patterns "
                  "('knees/*.png').")
flags.DEFINE_list("keypoints", [], "predict: one keypoint file per image (CSV of x,y rows or "
                  "BoneFinder .pts); empty = the landmark detector of --landmark_workdir.")
flags.DEFINE_string("sides", "", "predict: side of each image, e.g. 'R,L' (default R).")
flags.DEFINE_string("output", "", "predict: output folder (default WORKDIR/predictions, "
                    "./predictions for a model folder); evaluate: report folder (default "
                    "WORKDIR/report, ./report for a model folder); export: the model folder "
                    "to write; report: folder for the tables and charts.")
flags.DEFINE_string("landmark_workdir", "", "predict: workdir or model folder of a trained "
                    "landmark detector, used for images without --keypoints (with the "
                    "shipped grader: the shipped detector).")
flags.DEFINE_string("id_salt_file", "", "predict: a secret file of >= 16 random bytes; outputs "
                    "name each image by its salted pseudonym instead of its path "
                    "(docs/DATASETS.md, identifiers).")
flags.DEFINE_string("host", "127.0.0.1", "serve: the address to listen on (127.0.0.1: this "
                    "machine only; 0.0.0.0 lets others reach the page).")
flags.DEFINE_integer("port", 8000, "serve: the port of the page.")
flags.DEFINE_bool("allow_other_data", False, "evaluate: allow a dataset other than the "
                  "workdir's training data (its results go to WORKDIR/report/<dataset>/).")
flags.DEFINE_bool("allow_config_change", False, "train: resume a workdir with a config that "
                  "differs from the one it was trained with (the old one is kept beside it).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (None = auto/1).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_bool("multihost", False, "Multi-host with the cluster auto-detected by "
                  "jax.distributed.initialize() (TPU pod slices, SLURM, Open MPI).")

# Errors a user can fix: print one line and exit non-zero instead of a traceback.
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)
REPO = os.path.dirname(os.path.abspath(__file__))
# After SIGTERM the run saves and exits with 128 + 15, what a shell reports for a process the
# signal ended, so schedulers see the usual code for a stopped job.
EXIT_SIGTERM = 143
# Modes that use a trained workdir's own config when no --config is given.
WORKDIR_MODES = ("evaluate", "predict", "export", "serve")


class UsageError(Exception):
    """A missing or contradictory flag: one line, exit 2 (the flags: --help)."""


def _log_file() -> str | None:
    """``WORKDIR/run.log`` for the modes that write a workdir, else None. For a gs://
    workdir, a local file that :func:`_keep_log` appends to ``WORKDIR/run.log`` at the end
    (a log handler writes a local file)."""
    from kpn_jax import storage

    if FLAGS.workdir is None or FLAGS.mode in ("report", "compare_torch"):
        return None
    if storage.is_object_store(FLAGS.workdir):
        return os.path.join(tempfile.gettempdir(), f"kpn_jax-{os.getpid()}-run.log")
    if storage.scheme(FLAGS.workdir):
        return None  # refused by _check_storage
    return os.path.join(os.path.expanduser(FLAGS.workdir), "run.log")


def _keep_log() -> None:
    """For a gs:// workdir: the local log appended to ``WORKDIR/run.log``, then removed (it
    stays where it is, and the console says so, when the upload fails)."""
    from kpn_jax import storage

    local = _log_file()
    if not local or not storage.is_object_store(FLAGS.workdir) or not os.path.exists(local):
        return
    try:
        with open(local, encoding="utf-8") as f:
            storage.append_text(storage.path(FLAGS.workdir) / "run.log", f.read())
        os.remove(local)
    except Exception as error:  # noqa: BLE001  (the run's own outcome is what matters)
        print(f"note: the log stays in {local} ({type(error).__name__})", file=sys.stderr)


def _route_library_errors(log_file: str | None) -> None:
    """Library log records go to ``log_file`` too; errors and tracebacks only there. orbax's
    background threads log every failed write with its traceback (dozens for one full disk),
    and TensorStore's callbacks on orbax's closed event loop raise hundreds of unraisable
    errors; the console keeps warnings and the one line :func:`main` prints."""
    import logging as std_logging

    import threading

    std_logging.raiseExceptions = False  # a log file on a full disk must not add tracebacks

    def log_thread_exception(args) -> None:  # background threads' exceptions: the log too
        std_logging.getLogger("kpn_jax").error(
            "exception in thread %s", getattr(args.thread, "name", "?"),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def log_unraisable(unraisable) -> None:  # storage callbacks after a failed write, ...
        std_logging.getLogger("kpn_jax").error(
            "unraisable exception (%s)", unraisable.err_msg or "ignored",
            exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))

    threading.excepthook = log_thread_exception
    sys.unraisablehook = log_unraisable
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno < std_logging.ERROR and not record.exc_info)
    if log_file:
        handler = std_logging.FileHandler(log_file, delay=True)  # opened on the first record
        handler.setLevel(std_logging.WARNING)
        handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s "
                                                   "%(threadName)s: %(message)s"))
        std_logging.getLogger().addHandler(handler)


def _append_traceback(log_file: str | None) -> str | None:
    """Appends the exception being handled to ``log_file``; returns it, or None when it
    could not be written (no workdir yet, a full disk)."""
    import traceback

    if not log_file or not os.path.isdir(os.path.dirname(log_file)):
        return None
    try:
        with open(log_file, "a", encoding="utf-8") as f:
            f.write(traceback.format_exc())
    except OSError:
        return None
    return log_file


def _run(argv) -> None:
    if not FLAGS["verbosity"].present:
        # Library INFO logs (orbax, grain, tfds) drown the progress lines; --verbosity=0 shows them.
        logging.set_verbosity(logging.WARNING)
    _route_library_errors(_log_file())
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.mode == "report":
        from kpn_jax import reporting

        if not FLAGS.workdirs or not FLAGS.output:
            raise UsageError("--mode=report needs --workdirs=... and --output=DIR")
        reporting.write_experiment_report(FLAGS.workdirs, FLAGS.output, FLAGS.split)
        return
    if FLAGS.config is None:
        raise UsageError("--config is required (e.g. --config=configs/demo.py)"
                         + (f"; --mode={FLAGS.mode} reads it from --workdir=DIR when given"
                            if FLAGS.mode in WORKDIR_MODES else ""))
    config_file = config_flags.get_config_filename(FLAGS["config"])
    if not os.path.exists(config_file.split(":")[0]):
        raise FileNotFoundError(f"config file {config_file} does not exist")
    if FLAGS.workdir is None and FLAGS.mode != "compare_torch":
        raise UsageError("--workdir is required")
    _check_storage(FLAGS.config)
    from kpn_jax import parallel

    if FLAGS.multihost or (FLAGS.num_processes and FLAGS.num_processes > 1):
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id, auto=FLAGS.multihost)
    config = FLAGS.config
    if FLAGS.mode in WORKDIR_MODES:
        config = _workdir_config(config, config_file)
    if config.get("matmul_precision", "default") != "default":
        # Process-wide, before anything is traced: the environment, set here, not in the library.
        import jax

        jax.config.update("jax_default_matmul_precision", config.matmul_precision)
    if FLAGS.mode == "evaluate":
        from kpn_jax import input_pipeline, workdir_config

        # Before any dataset is built: is it the one the workdir was trained on?
        workdir_config.check_dataset(FLAGS.workdir, input_pipeline.resolve_dataset_name(config),
                                     None, None, config.model.pooling, FLAGS.allow_other_data)
    if FLAGS.mode in ("train", "evaluate", "fit_gmm"):
        from data_prep import synthetic_knee

        # The embedded synthetic knees are built on first use (identical builds are reused),
        # by process 0 alone; the others find its build.
        import jax

        if jax.process_index() == 0:
            synthetic_knee.build_for_config(config)
        parallel.barrier("kpn_jax: synthetic knees built")
        if jax.process_index() != 0:
            synthetic_knee.build_for_config(config)
    if config.get("task") == "landmarks":
        _run_landmarks(config)
    elif FLAGS.mode == "train":
        from kpn_jax import train

        train.train_and_evaluate(config, FLAGS.workdir, FLAGS.allow_config_change,
                                 stop_requested=_stop_on_sigterm())
    elif FLAGS.mode == "evaluate":
        from kpn_jax import train

        train.evaluate_checkpoint(config, FLAGS.workdir, allow_other_data=FLAGS.allow_other_data,
                                  report_dir=FLAGS.output or None)
    elif FLAGS.mode == "fit_gmm":
        from kpn_jax import train

        train.fit_gmm_to_workdir(config, FLAGS.workdir)
    elif FLAGS.mode == "predict":
        from kpn_jax import predict

        predict.predict_files(config, FLAGS.workdir, FLAGS.images, FLAGS.keypoints or None,
                              sides=_sides(), output_dir=FLAGS.output or None,
                              landmark_workdir=_landmark_workdir(), id_salt=_id_salt())
    elif FLAGS.mode == "serve":
        from kpn_jax import serve

        serve.serve(config, FLAGS.workdir, landmark_workdir=_landmark_workdir(), host=FLAGS.host,
                    port=FLAGS.port)
    elif FLAGS.mode == "export":
        from kpn_jax import predict

        if not FLAGS.output:
            raise UsageError("--mode=export needs --output=DIR (the model folder to write)")
        written = predict.export_grader(config, FLAGS.workdir, FLAGS.output)
        print(f"model folder written to {written}")
    elif FLAGS.mode == "compare_torch":
        from kpn_jax.interop import compare_torch

        compare_torch.main_with_config(config)


def _workdir_config(config, config_file: str):
    """evaluate/predict: the workdir's own config (model, data, preprocessing) with the
    explicit ``--config.*`` overrides; a ``--config`` file's other values are not used."""
    from kpn_jax import workdir_config

    if config_file.startswith(os.path.join(REPO, "configs", "workdir.py") + ":"):
        return config  # already the workdir's config, overrides applied by the flag
    from kpn_jax import storage

    saved_path = storage.path(FLAGS.workdir) / workdir_config.CONFIG_FILE
    if not saved_path.exists():
        return config  # not trained by this version: the given config is all there is
    from configs import workdir as workdir_configs

    saved = workdir_configs.get_config(FLAGS.workdir)
    overrides = config_flags.get_override_values(FLAGS["config"])
    config, ignored = workdir_config.with_overrides(saved, config, overrides)
    if ignored:
        print(f"note: --mode={FLAGS.mode} uses {saved_path} (model, data, preprocessing) and "
              f"only the explicit --config.* overrides; {config_file} differs in "
              f"{len(ignored)} field(s), not used: {'; '.join(ignored[:3])}"
              f"{' ...' if len(ignored) > 3 else ''}", file=sys.stderr, flush=True)
    return config


OBJECT_STORE_MODES = ("train", "evaluate", "fit_gmm")


def _check_storage(config) -> None:
    """Refuses, before anything is written, a URL that is not gs:// (it would become a
    local folder named 'gs:'), and gs:// where a mode reads local files only."""
    from kpn_jax import storage

    given = {"--workdir": FLAGS.workdir, "--config.data_dir": config.get("data_dir"),
             "--output": FLAGS.output, "--landmark_workdir": FLAGS.landmark_workdir}
    for flag, value in given.items():
        if not value:
            continue
        try:
            storage.check_supported(value, flag)
        except storage.UnsupportedStorage as error:
            raise UsageError(str(error)) from None
        if storage.is_object_store(value) and (FLAGS.mode not in OBJECT_STORE_MODES
                                               or config.get("task") == "landmarks"
                                               or flag == "--landmark_workdir"):
            raise UsageError(
                f"{flag}={value}: gs:// is supported by --mode=train, evaluate and fit_gmm of "
                f"the grading model; for this one copy the folder to a local disk first "
                f"(gcloud storage cp -r)")


def _stop_on_sigterm():
    """SIGTERM, a scheduler's stop (SLURM, Kubernetes, spot VMs), as a flag the trainer reads
    before each step: it then saves a checkpoint and stops (exit 143). With several
    processes JAX's preemption service owns SIGTERM: a SIGTERM to any process makes every
    process stop before the same step (``parallel.stop_agreed``); Ctrl-C is turned into a
    SIGTERM to this process so that it stops the run the same way instead of interrupting
    one process mid-step."""
    import signal
    import threading

    import jax

    if jax.process_count() > 1:
        signal.signal(signal.SIGINT, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
        return None
    requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
    return requested.is_set


def _landmark_workdir() -> str | None:
    """predict: the detector for images without keypoint files: ``--landmark_workdir``, else
    with the shipped grader the shipped detector."""
    from kpn_jax import model_folder

    if FLAGS.landmark_workdir:
        return FLAGS.landmark_workdir
    shipped = os.path.realpath(os.path.expanduser(FLAGS.workdir)) == str(model_folder.SHIPPED_GRADER)
    return str(model_folder.SHIPPED_DETECTOR) if shipped and not FLAGS.keypoints else None


def _id_salt() -> bytes | None:
    from kpn_jax import identifiers

    return identifiers.read_salt(FLAGS.id_salt_file) if FLAGS.id_salt_file else None


def _sides() -> list[str] | None:
    """``--sides='R,L'`` -> ``['R', 'L']``; ``None`` when not given."""
    return [s.strip() for s in FLAGS.sides.split(",") if s.strip()] if FLAGS.sides else None


def _run_landmarks(config) -> None:
    """The landmark detector (configs/landmarks.py) through the same modes."""
    from kpn_jax import landmarks_predict, landmarks_train

    if FLAGS.mode == "train":
        landmarks_train.train_and_evaluate_landmarks(config, FLAGS.workdir,
                                                     FLAGS.allow_config_change,
                                                     stop_requested=_stop_on_sigterm())
    elif FLAGS.mode == "evaluate":
        landmarks_train.evaluate_landmarks(config, FLAGS.workdir)
    elif FLAGS.mode == "predict":
        landmarks_predict.predict_landmark_files(FLAGS.workdir, FLAGS.images, sides=_sides(),
                                               output_dir=FLAGS.output or None)
    elif FLAGS.mode == "export":
        if not FLAGS.output:
            raise UsageError("--mode=export needs --output=DIR (the model folder to write)")
        written = landmarks_predict.export_detector(FLAGS.workdir, FLAGS.output)
        print(f"model folder written to {written}")
    else:
        raise ValueError(f"--mode={FLAGS.mode} does not apply to a landmark config")


def _flag_value(argv, name: str) -> str | None:
    """The value of ``--name=V`` or ``--name V`` in ``argv`` (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def with_workdir_config(argv: list[str]) -> list[str]:
    """``--mode=evaluate|predict --workdir=W`` without ``--config``: adds
    ``--config=configs/workdir.py:W`` so that ``--config.*`` overrides apply to the
    workdir's own config."""
    mode, workdir = _flag_value(argv, "mode"), _flag_value(argv, "workdir")
    if (mode in ("evaluate", "predict", "serve") and not workdir
            and _flag_value(argv, "config") is None):
        from kpn_jax import model_folder

        workdir = str(model_folder.SHIPPED_GRADER)
        print(f"--mode={mode} without --workdir: the shipped kneeKL224 KL grader ({workdir}; "
              f"model card: {model_folder.SHIPPED_DIR / 'MODEL_CARD.md'})", file=sys.stderr)
        argv = [*argv, f"--workdir={workdir}"]
    if mode not in WORKDIR_MODES or not workdir or _flag_value(argv, "config") is not None:
        return argv
    from kpn_jax import storage

    if storage.scheme(workdir) and not storage.is_object_store(workdir):
        return argv  # refused with the other flags once they are parsed
    saved = storage.path(workdir) / "config.json"
    if not saved.exists():
        print(f"error: --mode={mode} without --config reads the workdir's config, but {saved} "
              f"does not exist: is {workdir} a trained workdir? (or give --config=FILE)",
              file=sys.stderr)
        sys.exit(2)
    return [argv[0], f"--config={os.path.join(REPO, 'configs', 'workdir.py')}:{workdir}",
            *argv[1:]]


def parse_flags(argv):
    """absl flag parsing with a config typo reported in one line, not a traceback."""
    argv = with_workdir_config(list(argv))
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
    _keep_log()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv) -> None:
    try:
        _run(argv)
        jax = sys.modules.get("jax")  # (not imported by every mode)
        if jax is not None and jax.process_count() > 1:
            # Every process done before any leaves, then out without the interpreter's
            # teardown: left to atexit, one process tore down its collectives and
            # coordination client while its peer was still finishing, and a process
            # sometimes aborted (SIGABRT) after a complete run.
            from kpn_jax import parallel

            parallel.finish("kpn_jax: run finished")
            _exit_now(0)  # (keeps the log, as every exit does)
        _keep_log()
    except UsageError as error:
        print(f"error: {error} (every flag: python run.py --help)", file=sys.stderr)
        _exit_now(2)
    except KeyboardInterrupt as interrupt:
        # The trainers saved a checkpoint and said so; no traceback.
        if type(interrupt).__name__ == "StopRequested":
            print("stopped by SIGTERM (exit 143); the same command resumes", file=sys.stderr)
            _exit_now(EXIT_SIGTERM)
        print("stopped by Ctrl-C", file=sys.stderr)
        _exit_now(130)
    except USER_ERRORS as error:
        from kpn_jax import failures

        written = _append_traceback(_log_file())
        workdir = os.path.expanduser(FLAGS.workdir) if FLAGS.workdir else None
        print(f"error: {failures.one_line(error, workdir, written)}", file=sys.stderr)
        _exit_now(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
