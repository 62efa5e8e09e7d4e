"""Trains a tiny KPN + CL run and kills itself at the N-th boundary event.

Used by tests/test_faults.py. The events are the moments a run writes something: every
metrics record, every checkpoint save started, every best-checkpoint save and the report.

  python train_with_faults.py CONFIG.json WORKDIR [--kill_at N] [--signal kill|int|term]

``--signal=kill`` is SIGKILL (nothing runs after it); ``int`` raises KeyboardInterrupt
there, as Ctrl-C would; ``term`` sends SIGTERM to itself with run.py's handler installed
(the run stops before its next step and exits 143). Prints ``events N`` at the end of a
complete run.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("workdir")
    parser.add_argument("--kill_at", type=int, default=0)
    parser.add_argument("--signal", default="kill", choices=("kill", "int", "term"))
    args = parser.parse_args()

    import ml_collections

    from kpn_jax import checkpointing, reporting, train, trainer

    events = {"n": 0}

    def event() -> None:
        events["n"] += 1
        if events["n"] == args.kill_at:
            if args.signal == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.signal == "term":
                os.kill(os.getpid(), signal.SIGTERM)
                return
            raise KeyboardInterrupt

    def after(method):
        def wrapped(*a, **k):
            result = method(*a, **k)
            event()
            return result
        return wrapped

    def before(method):
        def wrapped(*a, **k):
            event()
            return method(*a, **k)
        return wrapped

    trainer.MetricLog.write = after(trainer.MetricLog.write)
    checkpointing.Checkpointer.save = after(checkpointing.Checkpointer.save)
    checkpointing.Checkpointer.save_best = before(after(checkpointing.Checkpointer.save_best))
    reporting.write_report = before(reporting.write_report)

    import run  # the repository's run.py: its SIGTERM handler

    config = ml_collections.ConfigDict(json.loads(Path(args.config).read_text()))
    try:
        train.train_and_evaluate(config, args.workdir, stop_requested=run._stop_on_sigterm())
    except trainer.StopRequested:
        sys.stdout.flush()
        os._exit(run.EXIT_SIGTERM)
    except KeyboardInterrupt:
        sys.stdout.flush()
        os._exit(130)
    print(f"events {events['n']}", flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
