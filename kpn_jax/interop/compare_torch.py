"""Flax vs PyTorch on one batch: every stage, head, loss and head-weight gradient.

Runs the Flax model (float32, then bfloat16 compute) and its PyTorch twin
(``kpn_jax.interop.torch_reference``: torchvision ResNet, grid_sample,
torch.distributions GMM) with the same weights on the same batch, in eval and
in train (batch-statistics) mode, and prints for every output the max absolute
and the max relative difference, relative = max|flax - torch| / max|torch|.
A last column, torch float32 vs torch float64, shows the float32 floor.

    python run.py --mode=compare_torch --config=configs/default.py [--config.model.depth=18]
    python -m kpn_jax.interop.compare_torch --depth=50 --batch_size=5 [--init_from=resnet50.pth]

The batch: real kneeKL224 radiographs with their KNEEL landmarks (left knees
flipped) when the data is found (``--data_dir`` or ``$KPN_KNEEKL224_DIR``, a folder
holding ``landmarks16.csv``), else random images.
kneeKL224 has KL grades only: the OARSI grades are missing (-1).
Weights: ``--init_from`` (a torchvision checkpoint) or random, with BatchNorm
statistics of the batch itself (random statistics blow ResNet-50 logits up to
~100, an unrealistic regime). The GMM is ``--gmm`` or one fitted on random grades:
this is a numerical comparison, not a trained model.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import time
from typing import Any, Sequence

import numpy as np

DTYPES = ("float32", "bfloat16")
MODES = ("eval", "train")


# ----------------------------------------------------------------------------- batches


def find_kneekl224(data_dir: str | None = None) -> pathlib.Path | None:
    """The kneeKL224 folder holding ``landmarks16.csv``, or None."""
    for candidate in ([data_dir] if data_dir else [os.environ.get("KPN_KNEEKL224_DIR", "")]):
        if candidate and (pathlib.Path(candidate) / "landmarks16.csv").is_file():
            return pathlib.Path(candidate)
    if data_dir:
        raise FileNotFoundError(f"--data_dir {data_dir}: no landmarks16.csv there")
    return None


def kneekl224_batch(data_dir: pathlib.Path, batch_size: int):
    """Real radiographs with landmarks: one per KL grade in turn, sides alternating.

    Only rows that passed the landmark quality check (``ok == 1``) and have normal
    grey levels are used; ``L`` images and their points are mirrored to the
    right-knee orientation.

    Returns:
      ``images [B, 224, 224, 1]`` float32 in [0, 1], ``keypoints [B, 16, 2]``,
      ``grades [B, 7]`` (KL, OARSI -1), and a description.
    """
    from PIL import Image

    from kpn_jax import grades as grades_lib
    from kpn_jax.keypoints import flip_horizontal

    path = data_dir / "landmarks16.csv"
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["ok"] == "1" and r["inverted_polarity"] == "0"]
    rows.sort(key=lambda r: r["path"])
    chosen = []
    for i in range(batch_size):
        kl, side = str(i % 5), "L" if i % 2 == 0 else "R"
        candidates = [r for r in rows if r["kl_grade"] == kl and r not in chosen]
        preferred = [r for r in candidates if r["side"] == side] or candidates
        if not preferred:
            raise ValueError(f"{path}: no usable row left for KL {kl}")
        chosen.append(preferred[0])
    images, keypoints = [], []
    for row in chosen:
        image = np.asarray(Image.open(data_dir / row["path"]).convert("L"), np.float32) / 255.0
        points = np.array([[float(row[f"x{j}"]), float(row[f"y{j}"])] for j in range(16)],
                          np.float32)
        if row["side"] == "L":
            image = image[:, ::-1]
            points = flip_horizontal(points, image.shape[1])
        images.append(image[..., None])
        keypoints.append(points)
    grades = np.full((batch_size, len(grades_lib.TASKS)), -1, np.int32)
    grades[:, 0] = [int(r["kl_grade"]) for r in chosen]
    names = ", ".join(f"{pathlib.Path(r['path']).name} (KL {r['kl_grade']})" for r in chosen)
    return (np.stack(images), np.stack(keypoints), grades,
            f"{batch_size} real kneeKL224 radiographs, 224 px, KNEEL landmarks, L flipped: {names}")


def random_batch(batch_size: int, image_size: int, seed: int = 0):
    """Random images, keypoints inside the image, random grades (one missing)."""
    from kpn_jax import grades as grades_lib

    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(batch_size, image_size, image_size, 1)).astype(np.float32)
    keypoints = rng.uniform(0.2 * image_size, 0.8 * image_size, (batch_size, 16, 2))
    grades = np.stack([rng.integers(0, grades_lib.NUM_CLASSES[t], batch_size)
                       for t in grades_lib.TASKS], 1).astype(np.int32)
    grades[0, 1] = -1
    return (images, keypoints.astype(np.float32), grades,
            f"{batch_size} random {image_size} px images (no kneeKL224 data found)")


def random_grades(num: int, seed: int) -> np.ndarray:
    """Random but loosely coherent grades (OARSI around KL - 1), for the GMM and class weights."""
    from kpn_jax import grades as grades_lib

    rng = np.random.default_rng(seed)
    kl = rng.integers(0, 5, num)
    oarsi = [np.clip(kl - 1 + rng.integers(-1, 2, num), 0, 3) for _ in grades_lib.OARSI_TASKS]
    return np.stack([kl] + oarsi, 1).astype(np.int32)


# ----------------------------------------------------------------------------- comparison


def compare(depth: int = 50, width: int = 64, pooling: str = "keypoints",
            aggregation: str = "concat", densify_k: int | None = None,
            feature_layer: str = "layer3", aux_regression: bool = False,
            input_mode: str = "repeat", tasks: Sequence[str] | None = None,
            batch_size: int = 5, image_size: int = 224, data_dir: str | None = None,
            init_from: str | None = None, gmm_path: str | None = None,
            num_components: int = 10, sigma: float = 0.2, tau: float = 0.5,
            lambda_cls: float = 1.0, lambda_gmm: float = 1.0, aux_regression_weight: float = 1.0,
            dtypes: Sequence[str] = DTYPES, modes: Sequence[str] = MODES,
            float64_reference: bool = True, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Runs the comparison; returns (and with ``verbose`` prints) every difference.

    Returns:
      ``{'batch': str, 'weights': str, 'gmm': str, 'model': dict,
      'results': {'float32/eval': {name: {'max_abs', 'max_rel'}}, ...},
      'torch_float32_vs_float64': {name: {'max_abs', 'max_rel'}}`` (eval mode;
      only with ``float64_reference``), ``'torch_bfloat16_vs_float32'`` (torch
      autocast vs torch float32, eval; only when ``dtypes`` has bfloat16),
      ``'seconds': float}``.
    """
    import copy

    import torch

    from kpn_jax import gmm as gmm_lib
    from kpn_jax import grades as grades_lib
    from kpn_jax import losses
    from kpn_jax.interop import torch_reference as tr
    from kpn_jax.interop import torch_weights
    from kpn_jax.models import kpn

    start = time.time()
    torch.manual_seed(seed)
    tasks = tuple(tasks or grades_lib.TASKS)
    if set(tasks) != set(grades_lib.TASKS):
        raise ValueError(f"compare: the incoherence loss needs all 7 tasks, got {tasks}")
    found = find_kneekl224(data_dir)
    if found is not None:
        images, keypoints, grades, batch_text = kneekl224_batch(found, batch_size)
    else:
        images, keypoints, grades, batch_text = random_batch(batch_size, image_size, seed)
    labeled = np.ones(batch_size, bool)

    model_kwargs = dict(depth=depth, width=width, tasks=tasks, aux_regression=aux_regression,
                        input_mode=input_mode)
    if pooling == "keypoints":
        model_kwargs.update(densify_k=densify_k, aggregation=aggregation,
                            feature_layer=feature_layer)
    torch_model = tr.TorchKPN(pooling=pooling, **model_kwargs)
    if init_from:
        # Up to the stage the model pools (a layer3 KPN's backbone has no layer4).
        backbone = torch_weights.load_backbone(init_from, depth, input_mode=input_mode,
                                               last_stage=torch_model.last_stage)
        torch_model.backbone.load_state_dict(torch_weights.resnet_to_torch(backbone, depth),
                                             strict=True)
        weights_text = f"backbone from {init_from}, random heads"
    else:
        tr.randomize_batch_norm_(torch_model)
        tr.calibrate_batch_norm_(torch_model, torch.from_numpy(images).permute(0, 3, 1, 2),
                                 torch.from_numpy(keypoints))
        weights_text = ("random (torchvision init), BatchNorm scale/bias random, running "
                        "statistics of this batch")
    variables = tr.flax_variables_from_torch(torch_model)

    fit_grades = random_grades(2000, seed)
    class_weights = losses.class_weights(fit_grades)
    if gmm_path:
        gmm = gmm_lib.load(gmm_path)
        gmm_text = f"{gmm_path} (K={gmm.num_components})"
    else:
        gmm = gmm_lib.fit(fit_grades, num_components=num_components, sigma=sigma, seed=seed)
        gmm_text = f"K={num_components}, sigma={sigma}, fitted on 2000 random grades"
    loss_kwargs = dict(tau=tau, lambda_cls=lambda_cls, lambda_gmm=lambda_gmm,
                       aux_regression_weight=aux_regression_weight)
    batch = (gmm, images, keypoints, grades, labeled, class_weights)

    results: dict[str, dict[str, dict[str, float]]] = {}
    torch_values = {mode: tr.torch_outputs(torch_model, *batch, train=(mode == "train"),
                                           **loss_kwargs) for mode in modes}
    for dtype in dtypes:
        flax_model = kpn.create_model(pooling=pooling, dtype=dtype, **model_kwargs)
        for mode in modes:
            flax_values = tr.flax_outputs(flax_model, variables, *batch, train=(mode == "train"),
                                          **loss_kwargs)
            results[f"{dtype}/{mode}"] = _differences(flax_values, torch_values[mode])
    output: dict[str, Any] = dict(batch=batch_text, weights=weights_text, gmm=gmm_text,
                                  model=dict(pooling=pooling, **model_kwargs), results=results)
    eval_values = torch_values.get("eval") or tr.torch_outputs(torch_model, *batch, **loss_kwargs)
    if float64_reference:
        reference = tr.torch_outputs(copy.deepcopy(torch_model).double(), *batch, train=False,
                                     **loss_kwargs)
        output["torch_float32_vs_float64"] = _differences(eval_values, reference)
    if "bfloat16" in dtypes:
        # What bfloat16 costs in PyTorch itself: the yardstick for the bfloat16 columns.
        autocast = tr.torch_outputs(torch_model, *batch, train=False,
                                    autocast_dtype=torch.bfloat16, **loss_kwargs)
        output["torch_bfloat16_vs_float32"] = _differences(autocast, eval_values)
    output["seconds"] = time.time() - start
    if verbose:
        print(format_report(output))
    return output


def _differences(values: dict[str, np.ndarray], reference: dict[str, np.ndarray]):
    from kpn_jax.interop.torch_reference import max_differences

    missing = sorted(set(values) ^ set(reference))
    if missing:
        raise ValueError(f"compare: outputs only one side has: {missing}")
    out = {}
    for name in reference:
        max_abs, max_rel = max_differences(values[name], reference[name])
        out[name] = dict(max_abs=max_abs, max_rel=max_rel)
    return out


REFERENCE_COLUMNS = (("torch_float32_vs_float64", "torch f32 vs f64"),
                     ("torch_bfloat16_vs_float32", "torch bf16 vs f32"))


def format_report(output: dict[str, Any]) -> str:
    """The comparison as a fixed-width table (one row per output)."""
    model = output["model"]
    title = (f"Flax vs PyTorch: {'KPN' if model['pooling'] == 'keypoints' else 'GlobalPoolNet'} "
             f"ResNet-{model['depth']} (width {model['width']}"
             + (f", {model.get('aggregation')}, {model.get('feature_layer')}"
                if model["pooling"] == "keypoints" else "") + ")")
    lines = [title, f"batch:   {output['batch']}", f"weights: {output['weights']}",
             f"GMM:     {output['gmm']}",
             "max abs = max|flax - torch|, max rel = max abs / max|torch|; bfloat16 = Flax "
             "compute dtype vs torch float32.",
             "Last columns, eval mode, PyTorch against itself: float32 vs float64 (the float32 "
             "floor), bfloat16 autocast vs float32.", ""]
    columns = list(output["results"])
    references = [(key, label) for key, label in REFERENCE_COLUMNS if key in output]
    header = f"{'output':34s}" + "".join(f" | {c:>19s}" for c in columns)
    header += "".join(f" | {label:>17s}" for _, label in references)
    sub = f"{'':34s}" + "".join(" |  max abs   max rel" for _ in columns)
    sub += "".join(f" | {'max rel':>17s}" for _ in references)
    lines += [header, sub, "-" * len(header)]
    names = list(dict.fromkeys(n for c in columns for n in output["results"][c]))
    for name in names:
        row = f"{name:34s}"
        for c in columns:
            d = output["results"][c].get(name)
            row += f" | {d['max_abs']:8.2e}  {d['max_rel']:8.2e}" if d else f" | {'':18s}"
        for key, _ in references:
            d = output[key].get(name)
            row += f" | {d['max_rel']:17.2e}" if d else f" | {'':17s}"
        lines.append(row)
    lines.append("-" * len(header))
    worst = f"{'worst relative':34s}"
    for c in columns:
        worst += f" | {'':8s}  {max(d['max_rel'] for d in output['results'][c].values()):8.2e}"
    for key, _ in references:
        worst += f" | {max(d['max_rel'] for d in output[key].values()):17.2e}"
    lines.append(worst)
    lines.append(f"({output['seconds']:.0f} s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry points


def compare_from_config(config, **overrides) -> dict[str, Any]:
    """``compare`` with the model, loss and ``init_from`` settings of a run config."""
    m = config.model
    kwargs = dict(depth=m.depth, width=m.width, pooling=m.pooling, aggregation=m.aggregation,
                  densify_k=(m.densify_k or None), feature_layer=m.feature_layer,
                  aux_regression=m.aux_regression, input_mode=m.input_mode,
                  tasks=tuple(config.tasks), init_from=os.path.expanduser(config.init_from) or None,
                  num_components=config.coherence.num_components, sigma=config.coherence.sigma,
                  tau=config.coherence.tau, lambda_cls=config.lambda_cls,
                  lambda_gmm=config.coherence.lambda_gmm,
                  aux_regression_weight=config.aux_regression_weight, seed=config.seed)
    kwargs.update(overrides)
    return compare(**kwargs)


def main_with_config(config) -> None:
    """``python run.py --mode=compare_torch --config=...``: prints the table."""
    compare_from_config(config)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=50, choices=(18, 34, 50))
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--pooling", default="keypoints", choices=("keypoints", "global"))
    parser.add_argument("--aggregation", default="concat", choices=("concat", "mean"))
    parser.add_argument("--densify_k", type=int, default=0)
    parser.add_argument("--feature_layer", default="layer3")
    parser.add_argument("--aux_regression", action="store_true")
    parser.add_argument("--input_mode", default="repeat", choices=("repeat", "single"))
    parser.add_argument("--batch_size", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=224, help="random batch only")
    parser.add_argument("--data_dir", default=None, help="kneeKL224 folder (landmarks16.csv)")
    parser.add_argument("--init_from", default=None, help="torchvision ResNet .pth/.safetensors")
    parser.add_argument("--gmm", default=None, help="a GMM .npz (kpn_jax.gmm.save)")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no_float64", action="store_true", help="skip the float64 column")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    compare(depth=args.depth, width=args.width, pooling=args.pooling,
            aggregation=args.aggregation, densify_k=args.densify_k or None,
            feature_layer=args.feature_layer, aux_regression=args.aux_regression,
            input_mode=args.input_mode, batch_size=args.batch_size, image_size=args.image_size,
            data_dir=args.data_dir, init_from=args.init_from, gmm_path=args.gmm,
            dtypes=tuple(args.dtypes.split(",")), modes=tuple(args.modes.split(",")),
            float64_reference=not args.no_float64, seed=args.seed)


if __name__ == "__main__":
    main()
