"""Compile time of the tests' tiny training under the XLA_FLAGS given in the environment.

One fresh process per measurement, no persistent compilation cache (as a CI machine starts):
trains test_train.py's tiny config (ResNet-18 of width 8, 64 px, batch 8) for four steps
with its evaluation, and prints one JSON line: XLA_FLAGS, wall seconds, the seconds XLA spent
compiling (jax.monitoring's backend_compile_duration events) and how many programs it
compiled.

  python benchmarks/results/cpu_2026-12-07/test_compile_flags/compile_tiny_training.py
  XLA_FLAGS="--xla_backend_optimization_level=0 ..." python .../compile_tiny_training.py
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.monitoring  # noqa: E402

compiled = {"seconds": 0.0, "programs": 0}


def _count(event, duration, **_):
    if event.endswith("backend_compile_duration"):
        compiled["seconds"] += duration
        compiled["programs"] += 1


def main():
    jax.monitoring.register_event_duration_secs_listener(_count)
    from test_train import tiny_config  # noqa: E402

    from kpn_jax import train  # noqa: E402

    root = Path(tempfile.mkdtemp())
    config = tiny_config(str(root / "data"))
    config.max_steps = 4
    start = time.time()
    train.train_and_evaluate(config, str(root / "workdir"))
    print(json.dumps(dict(xla_flags=os.environ.get("XLA_FLAGS", ""),
                          wall_s=round(time.time() - start, 1),
                          compile_s=round(compiled["seconds"], 1),
                          programs=compiled["programs"])))


if __name__ == "__main__":
    main()
