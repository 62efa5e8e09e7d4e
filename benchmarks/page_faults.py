"""Per-step time, minor page faults and system CPU of one framework's train step.

  python benchmarks/page_faults.py --framework=jax            # glibc's malloc as started
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/page_faults.py --framework=torch
  GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776 \
      python benchmarks/page_faults.py --framework=jax      # freed memory kept for reuse

The ResNet-50 KPN + CL train step at 320 px, batch 8 (4 labelled), float32, of
``benchmarks/train_step.py``; one warm-up step, then ``--steps`` steps, each with its wall
time and this process's minor page faults, user and system CPU (``getrusage``). Run one
process per malloc setting (glibc reads ``GLIBC_TUNABLES`` only at start-up).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    import train_step

    batch_size, image_size = 8, 320
    batch = train_step.synthetic_batch(batch_size, batch_size // 2, image_size)
    config = train_step.make_config(50, 64, image_size, batch_size, batch_size // 2, "float32",
                                    "keypoints")
    class_weights, gmm = train_step.class_weights_and_gmm(config, seed=0)
    if args.framework == "jax":
        runner = train_step.jax_train_runner(config, batch, image_size, gmm, class_weights)
    else:
        runner = train_step.torch_train_runner(config, batch, gmm, class_weights, False, None)
    runner.run()
    print(f"# {args.framework}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    times = []
    for _ in range(args.steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        runner.run()
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        times.append(seconds)
        print(f"step {seconds:.3f} s  minor faults {after.ru_minflt - before.ru_minflt:7d}  "
              f"user {after.ru_utime - before.ru_utime:.2f} s  "
              f"system {after.ru_stime - before.ru_stime:.2f} s", flush=True)
    print(f"median step {statistics.median(times):.3f} s")


if __name__ == "__main__":
    main()
