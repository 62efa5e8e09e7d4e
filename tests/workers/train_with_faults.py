"""Trains a tiny KPN + CL run and stops itself at a named boundary event.

Used by tests/test_faults.py. The events are the moments a run writes something: every
metrics record, every checkpoint save started, every best-checkpoint save and the report.
Each has a name that does not depend on where the run started: ``metrics:train@2``,
``metrics:validation@2``, ``best-before@2``, ``best-after@2``, ``checkpoint@2``,
``report:test``, with ``#2`` added to the second event of the same name. So a resumed run
reaches the named event of the uninterrupted run, which a count of events would not.

  python train_with_faults.py CONFIG.json WORKDIR [--stop_at NAME] [--signal kill|int|term]

``--signal=kill`` is SIGKILL (nothing runs after it); ``int`` raises KeyboardInterrupt
there, as Ctrl-C would; ``term`` sends SIGTERM to itself with run.py's handler installed
(the run stops before its next step and exits 143). Prints ``events ["NAME", ...]`` (JSON)
at the end of a complete run.
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
    parser.add_argument("--stop_at", default="")
    parser.add_argument("--signal", default="kill", choices=("kill", "int", "term"))
    args = parser.parse_args()

    import ml_collections

    from kpn_jax import checkpointing, reporting, train, trainer

    events: list[str] = []

    def event(name: str) -> None:
        if name in events:
            name = f"{name}#{sum(e.split('#')[0] == name for e in events) + 1}"
        events.append(name)
        if name == args.stop_at:
            if args.signal == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if args.signal == "term":
                os.kill(os.getpid(), signal.SIGTERM)
                return
            raise KeyboardInterrupt

    def after(method, name):
        def wrapped(*a, **k):
            result = method(*a, **k)
            event(name(*a, **k))
            return result
        return wrapped

    def before(method, name):
        def wrapped(*a, **k):
            event(name(*a, **k))
            return method(*a, **k)
        return wrapped

    def metrics_name(log, step, values):
        kind = "validation" if any(k.startswith("validation/") for k in values) else "train"
        return f"metrics:{kind}@{step}"

    trainer.MetricLog.write = after(trainer.MetricLog.write, metrics_name)
    checkpointing.Checkpointer.save = after(checkpointing.Checkpointer.save,
                                            lambda self, step, *_: f"checkpoint@{step}")
    checkpointing.Checkpointer.save_best = before(
        after(checkpointing.Checkpointer.save_best, lambda self, step, *_: f"best-after@{step}"),
        lambda self, step, *_: f"best-before@{step}")
    reporting.write_report = before(reporting.write_report,
                                    lambda report_dir, split, *_, **__: f"report:{split}")

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
    print(f"events {json.dumps(events)}", flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
