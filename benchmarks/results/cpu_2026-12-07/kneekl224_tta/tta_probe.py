"""KL metrics on kneeKL224 validation with more test-time views than the mirror: each knee
shifted by 4 px left, right, up and down and scaled by 0.95 and 1.05, each view also
mirrored (14 views), probabilities averaged; validation only.

  python benchmarks/results/cpu_2026-12-07/kneekl224_tta/tta_probe.py \
      --data_dir=workdirs/kl224data --out=/tmp/tta workdirs/kl224/adamw_s0 ...

Rows: ``id`` (the knee alone), ``id+flip`` (what evaluate does with eval_hflip),
``shifts+flip`` (the five translations, mirrored), ``all14`` (every view).
"""
import argparse, json, sys
from pathlib import Path
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from configs import workdir as workdir_configs
from kpn_jax import augment, evaluate, input_pipeline, metrics, parallel, predict, trainer

VIEWS = {"id": ((0, 0), 1.0), "x+4": ((4, 0), 1.0), "x-4": ((-4, 0), 1.0), "y+4": ((0, 4), 1.0),
         "y-4": ((0, -4), 1.0), "s0.95": ((0, 0), 0.95), "s1.05": ((0, 0), 1.05)}

def run(workdir, data_dir, out):
    config = workdir_configs.get_config(workdir); config.data_dir = data_dir
    handle = input_pipeline.open_dataset(config)
    model, variables, _ = predict.restore_variables(config, Path(workdir), handle.image_size, handle.keypoint_schema)
    size = (handle.image_size, handle.image_size) if np.isscalar(handle.image_size) else tuple(handle.image_size)
    def step(variables, batch):
        images = batch["image"].astype(jnp.float32) / 255.0
        b = images.shape[0]; out = {}
        for name, (t, s) in VIEWS.items():
            for flip in (False, True):
                m = augment.affine_matrices(jnp.tile(jnp.asarray([t], jnp.float32), (b, 1)), jnp.zeros(b),
                                            jnp.full(b, s), size, jnp.full(b, flip))
                x = augment.warp_images(images, m)
                o = model.apply(variables, x, batch["keypoints"].astype(jnp.float32), train=False)
                out[f"{name}{'_f' if flip else ''}"] = jax.nn.softmax(o["kl"])
        return out
    checker = input_pipeline.make_example_checker(handle.image_size, 16, False)
    res = trainer.predict_dataset(jax.jit(step), variables, handle.split("validation"), checker,
                                  parallel.make_mesh(), 64, fields=("image", "keypoints", "grades"),
                                  loading=input_pipeline.Loading(), outputs=("grades",))
    true = res["grades"][:, 0]
    def m(p):
        pred = p.argmax(-1)
        return dict(acc=round(metrics.accuracy(true, pred), 4), kappa=round(metrics.quadratic_kappa(true, pred, 5), 4),
                    rmse=round(metrics.rmse(true, pred), 4))
    views = {k: v for k, v in res.items() if k != "grades"}
    rows = {"id+flip": m((views["id"] + views["id_f"]) / 2),
            "all14": m(np.mean(list(views.values()), 0)),
            "shifts+flip": m(np.mean([v for k, v in views.items() if not k.startswith("s")], 0)),
            "id": m(views["id"])}
    print(json.dumps({"workdir": workdir, **rows}))
    np.savez(Path(out) / f"{Path(workdir).name}.npz", true=true, **views)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for w in args.workdirs:
        run(w, args.data_dir, args.out)
