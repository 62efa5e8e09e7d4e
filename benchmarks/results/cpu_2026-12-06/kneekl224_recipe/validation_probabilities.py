"""Each workdir's (or model folder's) KL probabilities on kneeKL224 validation through the
evaluation path, saved to NAME.npz with the image ids, and the metrics of their average
(an ensemble), on validation only.

  python benchmarks/results/cpu_2026-12-06/kneekl224_recipe/validation_probabilities.py \
      --data_dir=workdirs/kl224data --out=/tmp/probs workdirs/kl224/recipe_s0 workdirs/kl224/recipe_s1
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from configs import workdir as workdir_configs  # noqa: E402
from kpn_jax import evaluate, input_pipeline, metrics, parallel, predict  # noqa: E402


def probabilities(workdir: str, data_dir: str, out: Path) -> tuple[np.ndarray, np.ndarray]:
    cached = out / f"{Path(workdir).name}.npz"
    if cached.exists():
        saved = np.load(cached)
        return saved["probabilities"], saved["true"]
    config = workdir_configs.get_config(workdir)
    config.data_dir = data_dir
    handle = input_pipeline.open_dataset(config)
    model, variables, _ = predict.restore_variables(config, Path(workdir), handle.image_size,
                                                    handle.keypoint_schema)
    step = evaluate.make_eval_step(model, ("kl",), hflip=config.eval_hflip)
    checker = input_pipeline.make_example_checker(handle.image_size, 16, False)
    result = evaluate.predict_split(step, variables, handle.split("validation"), checker,
                                    parallel.make_mesh(), 64)
    probs, true = result["probabilities"][:, :5], result["true"][:, 0]
    ids = [i.decode() if isinstance(i, bytes) else str(i)
           for i in input_pipeline.read_field(handle.split("validation"), "image_id")]
    np.savez(cached, probabilities=probs, true=true, image_id=np.asarray(ids))
    return probs, true


def kl_metrics(true, probs) -> dict:
    pred = probs.argmax(-1)
    return {"accuracy": round(metrics.accuracy(true, pred), 4),
            "balanced_accuracy": round(metrics.balanced_accuracy(true, pred, 5), 4),
            "rmse": round(metrics.rmse(true, pred), 4),
            "kappa": round(metrics.quadratic_kappa(true, pred, 5), 4)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_probs, true = [], None
    for workdir in args.workdirs:
        probs, t = probabilities(workdir, args.data_dir, out)
        assert true is None or np.array_equal(true, t)
        true = t
        all_probs.append(probs)
        print(json.dumps({"workdir": workdir, **kl_metrics(true, probs)}))
    if len(all_probs) > 1:
        print(json.dumps({"ensemble": args.workdirs, **kl_metrics(true, np.mean(all_probs, 0))}))


if __name__ == "__main__":
    main()
