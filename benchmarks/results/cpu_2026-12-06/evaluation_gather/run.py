"""Evaluation throughput: copying every batch's outputs to the host (the earlier
predict_dataset, kept here as the reference) vs gathering once per split (kpn_jax now).

  python benchmarks/results/cpu_2026-12-06/evaluation_gather/run.py --data_dir=workdirs/kl224data

The shipped KL grader on kneeKL224 validation (826 knees, 224 px, each knee and its mirror),
batch 64, after a warm-up pass; the two are run alternately, 3 times each.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from kpn_jax import evaluate, input_pipeline, model_folder, parallel, predict, trainer  # noqa: E402


def per_batch_copies(predict_fn, variables, source, checker, mesh, batch_size, fields, loading,
                     outputs=()):
    """The earlier trainer.predict_dataset: every output copied to the host after each batch."""
    loading = input_pipeline.Loading(num_threads=loading.num_threads, num_workers=0)
    collected, masks = {}, []
    for local in input_pipeline.eval_batches(source, batch_size, checker, 0, 1, loading):
        batch = parallel.global_batch({k: local[k] for k in (*fields, "mask")}, mesh)
        values = dict(predict_fn(variables, batch))
        values.update({k: batch[k] for k in outputs})
        masks.append(trainer.to_host(batch["mask"]))
        for name, value in values.items():
            collected.setdefault(name, []).append(trainer.to_host(value))
    mask = np.concatenate(masks)
    return {name: np.concatenate(parts)[mask] for name, parts in collected.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = model_folder.SHIPPED_GRADER
    config = model_folder.read_config(folder)
    config.data_dir = args.data_dir
    handle = input_pipeline.open_dataset(config)
    source = handle.split("validation")
    model, variables, _ = predict.restore_variables(config, folder, 224, handle.keypoint_schema)
    variables = parallel.replicate(variables, parallel.make_mesh())
    eval_step = evaluate.make_eval_step(model, ("kl",), hflip=True)
    checker = input_pipeline.make_example_checker(224, 16, False)
    mesh, loading = parallel.make_mesh(), input_pipeline.Loading(num_threads=2)

    def fn(v, b):
        pred, prob = eval_step(v, b)
        return {"pred": pred, "probabilities": prob}

    fields = ("image", "keypoints", "grades")
    ways = {"per batch (before)": lambda: per_batch_copies(fn, variables, source, checker, mesh,
                                                            64, fields, loading, ("grades",)),
            "once per split (now)": lambda: trainer.predict_dataset(
                fn, variables, source, checker, mesh, 64, fields, loading, ("grades",))}
    results = {name: way() for name, way in ways.items()}            # warm-up, and equal?
    a, b = results.values()
    assert all(np.array_equal(a[k], b[k]) for k in a), "the two ways disagree"
    times = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(json.dumps({"way": name, "seconds": [round(t, 2) for t in values],
                          "examples_per_s": round(len(source) / float(np.median(values)), 1)}))


if __name__ == "__main__":
    main()
