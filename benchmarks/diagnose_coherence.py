"""Diagnoses a coherence-learning run: is its GMM healthy, did its predictions collapse?

  python benchmarks/diagnose_coherence.py --workdir=workdirs/experiments/kpn-1_cl-1_seed0
  python benchmarks/diagnose_coherence.py --workdir=A --workdir=B --num_images=100

For each workdir (its ``config.json``, ``gmm.npz`` and latest checkpoint):

- the GMM: smallest covariance eigenvalue against the noise floor ``sigma^2``, and the
  log-density of held-out expert grade vectors (validation one-hot grades): median and
  lowest. A healthy fit has a floor near ``sigma^2`` and held-out grades with positive
  median log-density (docs/RESULTS.md, section 1.3).
- the model on ``--num_images`` validation images: per head, the standard deviation of
  each logit across images (near 0 = the same prediction for every knee), the mean top
  probability, the histogram of predicted grades, and the GMM log-density of the
  predictions.

Read-only: writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def diagnose(workdir: Path, num_images: int) -> None:
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from kpn_jax import gmm as gmm_lib, grades as grades_lib
    from kpn_jax import input_pipeline, losses, predict, train

    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: not a training workdir (no config.json)")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    handle = input_pipeline.open_dataset(config)
    print(f"== {workdir}")

    gmm = gmm_lib.load(workdir / "gmm.npz") if (workdir / "gmm.npz").exists() else None
    if gmm is not None:
        sigma = gmm.sigma if gmm.sigma is not None else float("nan")
        line = (f"  GMM: K={gmm.num_components}, smallest covariance eigenvalue "
                f"{gmm_lib.covariance_floor(gmm):.3g} (sigma^2 = {sigma ** 2:.3g})")
        values = train.held_out_log_density(gmm, handle)
        if values is not None:
            line += (f"; log-density of {len(values)} validation grade vectors: median "
                     f"{np.median(values):.1f}, lowest {values.min():.1f}")
        print(line)
    else:
        print("  no gmm.npz: a run without coherence learning")

    model, variables, restored = predict.restore_variables(
        config, workdir, handle.image_size, handle.keypoint_schema, which="latest")
    source = handle.split("validation")
    count = min(num_images, len(source))
    examples = [source[i] for i in range(count)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 255.0
    if images.ndim == 3:
        images = images[..., None]
    keypoints = np.stack([e["keypoints"] for e in examples]).astype(np.float32)
    outputs = model.apply(variables, jnp.asarray(images), jnp.asarray(keypoints), train=False)
    print(f"  model at step {restored['step']} on {count} validation images:")
    for task in config.tasks:
        logits = np.asarray(outputs[task], np.float64)
        probabilities = np.asarray(jax.nn.softmax(outputs[task]), np.float64)
        histogram = np.bincount(logits.argmax(1), minlength=logits.shape[1])
        print(f"    {task:18s} logit std across images {logits.std(0).mean():6.3f}   mean top "
              f"probability {probabilities.max(1).mean():.3f}   predicted grades {histogram.tolist()}")
    if gmm is not None and tuple(config.tasks) == grades_lib.TASKS:
        values = np.asarray(gmm_lib.log_prob(gmm, losses.probabilities_vector(outputs)))
        print(f"    GMM log-density of the predictions: median {np.median(values):.1f}, "
              f"lowest {values.min():.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", action="append", required=True, help="repeatable")
    parser.add_argument("--num_images", type=int, default=100)
    args = parser.parse_args(argv)
    for workdir in args.workdir:
        diagnose(Path(workdir).expanduser().resolve(), args.num_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
