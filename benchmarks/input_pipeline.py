"""Input pipeline speed: examples/s the grain training pipeline delivers (read, check, batch).

Builds (once, reused afterwards) a synthetic_knee dataset at the requested size,
then reads it with the training pipeline itself (``kpn_jax.input_pipeline``:
``MixedStream`` of labelled + unlabelled examples -> ``train_iterator``), for each
``--num_workers`` (grain worker processes; 0 = in this process) and ``--num_threads``.
Reports examples per wall-clock second, the CPU time per example of this process and its
workers (the cost, which a shared machine's load does not change) and the cores used, and
with ``--train_step_json`` compares the delivery rate with what the train step consumes (a
``benchmarks/train_step.py --json`` report).

    python benchmarks/input_pipeline.py                        # 320 px, 48 + 48 per batch
    python benchmarks/input_pipeline.py --num_workers=0,1,2 --train_step_json=/tmp/step.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/input_pipeline.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))


def build_dataset(data_dir: str, image_size: int, num_train: int, num_unlabeled: int) -> str:
    """The synthetic knees (built on first use; an identical build is reused)."""
    from data_prep import synthetic_knee

    return synthetic_knee.build(data_dir, image_size=image_size, num_train=num_train,
                                num_validation=0, num_test=0, num_unlabeled=num_unlabeled,
                                num_workers=min(4, os.cpu_count() or 1))


def make_stream(data_dir: str, name: str, batch_labeled: int, batch_unlabeled: int,
                num_steps: int, seed: int = 0):
    """The training stream as ``train.load_training_data`` makes it for coherence learning."""
    import numpy as np

    from data_prep import tfds_util
    from kpn_jax import input_pipeline

    sources, info = tfds_util.data_sources(data_dir, name)
    train, unlabeled = sources["train"], sources["unlabeled"]
    labeled_pool = input_pipeline.Pool([(train, np.arange(len(train)))])
    unlabeled_pool = input_pipeline.Pool([(unlabeled, np.arange(len(unlabeled))),
                                           (train, np.arange(len(train)))])
    stream = input_pipeline.MixedStream(labeled_pool, unlabeled_pool, batch_labeled,
                                        batch_unlabeled, num_steps, seed)
    image_size = int(info.metadata.get("image_size", 0) or info.features["image"].shape[0])
    checker = input_pipeline.make_example_checker(image_size, 16, need_keypoints=True)
    return stream, checker


def cpu_seconds_with_children() -> float:
    """CPU seconds used so far by this process and its child processes (grain workers), live
    (psutil) or ended and waited for (getrusage)."""
    import resource

    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + ended.ru_utime + ended.ru_stime


def time_pipeline(stream, checker, num_threads: int | None, num_workers: int,
                  num_batches: int) -> dict[str, Any]:
    """Wall time and CPU time (this process and its workers) of ``num_batches`` batches after
    a few warm-up batches."""
    from kpn_jax import input_pipeline

    iterator = input_pipeline.train_iterator(
        stream, checker, 0, input_pipeline.Loading(num_threads, num_workers))
    for _ in range(max(2, num_workers)):  # starts threads/workers, fills the first buffers
        next(iterator)
    wall, cpu = time.perf_counter(), cpu_seconds_with_children()
    for _ in range(num_batches):
        batch = next(iterator)
    wall, cpu = time.perf_counter() - wall, cpu_seconds_with_children() - cpu
    if hasattr(iterator, "close"):
        iterator.close()
    examples = num_batches * stream.local_batch
    assert batch["image"].shape[0] == stream.local_batch
    return {"num_workers": num_workers, "num_threads": num_threads, "batches": num_batches,
            "examples": examples,
            "examples_per_s": round(examples / wall, 2),
            "cpu_ms_per_example": round(1e3 * cpu / examples, 3),
            "cores_used": round(cpu / wall, 2),
            "examples_per_s_per_core": round(examples / cpu, 1),
            "wall_s": round(wall, 3)}


def time_evaluation(data_dir: str, name: str, num_threads: int | None, num_workers: int,
                    batch_size: int, passes: int = 3) -> dict[str, Any]:
    """Wall and CPU time of ``passes`` evaluation passes over train + unlabeled (padded
    batches in order, as ``evaluate.predict_split`` reads them), each pass from creating the
    iterator (starting its workers) to its last batch, as every evaluation pays it."""
    import numpy as np

    from kpn_jax import datasets, input_pipeline

    sources, info = datasets.data_sources(data_dir, name)
    pool = input_pipeline.Pool([(sources[s], np.arange(len(sources[s])))
                                for s in ("train", "unlabeled")])
    image_size = int(info.metadata.get("image_size", 0) or info.features["image"].shape[0])
    checker = input_pipeline.make_example_checker(image_size, 16, need_keypoints=True)
    loading = input_pipeline.Loading(num_threads, num_workers)
    wall, cpu, examples = time.perf_counter(), cpu_seconds_with_children(), 0
    for _ in range(passes):
        iterator = input_pipeline.eval_batches(pool, batch_size, checker, loading=loading)
        examples += sum(int(batch["mask"].sum()) for batch in iterator)
        if hasattr(iterator, "close"):
            iterator.close()
    wall, cpu = time.perf_counter() - wall, cpu_seconds_with_children() - cpu
    return {"pipeline": "evaluation", "num_workers": num_workers, "num_threads": num_threads,
            "examples": examples, "examples_per_s": round(examples / wall, 2),
            "cpu_ms_per_example": round(1e3 * cpu / examples, 3),
            "cores_used": round(cpu / wall, 2),
            "examples_per_s_per_core": round(examples / cpu, 1), "wall_s": round(wall, 3)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "workdirs" / "bench_data"))
    parser.add_argument("--image_size", type=int, default=320)
    parser.add_argument("--num_train", type=int, default=600)
    parser.add_argument("--num_unlabeled", type=int, default=600)
    parser.add_argument("--batch_labeled", type=int, default=48)
    parser.add_argument("--batch_unlabeled", type=int, default=48)
    parser.add_argument("--num_batches", type=int, default=30)
    parser.add_argument("--num_workers", default="0,1,2",
                        help="comma list of grain worker processes (0: read in this process)")
    parser.add_argument("--num_threads", default="default",
                        help="comma list of reading threads per process; 'default': the "
                             "library's (one per CPU in this process, none in a worker)")
    parser.add_argument("--train_step_json", default="",
                        help="a benchmarks/train_step.py --json report to compare with")
    parser.add_argument("--pipeline", choices=("train", "evaluation"), default="train",
                        help="the training stream, or evaluation passes over train + unlabeled "
                             "(each pass starts its workers, as an evaluation does)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    name = build_dataset(args.data_dir, args.image_size, args.num_train, args.num_unlabeled)
    build_s = time.perf_counter() - start
    runs = [(int(w), None if t == "default" else int(t)) for w in args.num_workers.split(",")
            if w for t in args.num_threads.split(",") if t]
    stream, checker = make_stream(args.data_dir, name, args.batch_labeled, args.batch_unlabeled,
                                  num_steps=args.num_batches + 8)
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  {os.cpu_count()} CPUs, "
          f"load {[round(x, 2) for x in os.getloadavg()]}; {name} (ready in {build_s:.0f} s); "
          f"batches of {args.batch_labeled} + {args.batch_unlabeled}, {args.num_batches} timed "
          f"after 1 warm-up", flush=True)
    if args.pipeline == "train":
        results = [time_pipeline(stream, checker, t, w, args.num_batches) for w, t in runs]
    else:
        results = [time_evaluation(args.data_dir, name, t, w,
                                   args.batch_labeled + args.batch_unlabeled) for w, t in runs]
    print("workers threads   examples/s   CPU ms/example   cores used   examples/s per core")
    for r in results:
        threads = "default" if r["num_threads"] is None else r["num_threads"]
        print(f"{r['num_workers']:7d} {threads:>7} {r['examples_per_s']:12.1f} "
              f"{r['cpu_ms_per_example']:16.2f} {r['cores_used']:12.2f} "
              f"{r['examples_per_s_per_core']:21.1f}")
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "host_cpus": os.cpu_count(),
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "dataset": name,
        "settings": vars(args), "results": results}
    if args.train_step_json:
        step = json.loads(pathlib.Path(args.train_step_json).read_text())
        best = max(results, key=lambda r: r["examples_per_s"])
        consumption = {r["name"]: r["images_per_s"] for r in step["results"]
                       if r.get("mode") == "train" and "images_per_s" in r}
        report["train_step"] = {"settings": step["settings"], "images_per_s": consumption}
        for runner, images_per_s in consumption.items():
            busy = images_per_s * best["cpu_ms_per_example"] / 1e3
            delivered = best["examples_per_s"]
            print(f"# {runner} train step consumes {images_per_s:.2f} images/s; the pipeline "
                  f"delivers {delivered:.1f}/s ({delivered / images_per_s:.0f}x); keeping up "
                  f"costs {100 * busy:.2f} % of one core")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
