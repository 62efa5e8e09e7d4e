"""Training, evaluation and inference of the kneel16 landmark detector.

``train_and_evaluate_landmarks(config, workdir)`` is the ``--mode=train`` program of a
config with ``config.task == 'landmarks'`` (``configs/landmarks.py``). It uses the
project's machinery: TFDS sources opened by :func:`kpn_jax.input_pipeline.open_dataset`,
grain batches whose content is a pure function of ``(seed, step)`` (so a resumed run
sees the batches it would have seen), one jitted step over the ``('data',)`` mesh with
on-device augmentation (:mod:`kpn_jax.augment` plus an intensity jitter), orbax
checkpoints (:class:`kpn_jax.checkpointing.Checkpointer`: ``latest`` and ``best``) and
``metrics.jsonl`` / TensorBoard logs (:class:`kpn_jax.trainer.MetricLog`).

Data: every training source (``config.sources``) contributes a fixed number of
examples to each global batch. Only examples whose keypoints are all valid, finite and
not themselves predicted by a detector are used. A ``dev_fraction`` of a source's
training subjects (hash of the subject id) is held out as ``dev``, which picks the best
checkpoint; each source's ``eval_split`` is only evaluated.

Inference (loading a trained detector, finding keypoints, writing files) lives in
:mod:`kpn_jax.landmarks_predict`.

Workdir: ``config.json``, ``data_info.json`` (``task``, ``image_size``,
``input_size``, ``keypoint_schema``), ``checkpoints/``, ``metrics.jsonl``,
``tensorboard/``, and ``report/landmarks_{set}_{source}.json``, ``report/landmarks.md``,
``report/landmarks_montage_{set}_{source}.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kpn_jax import augment as augment_lib
from kpn_jax import checkpointing, input_pipeline, parallel, storage
from kpn_jax import kernels as kernels_lib
from kpn_jax import keypoints as kp_lib
from kpn_jax.models import landmarks as lm
from kpn_jax import trainer, workdir_lock
from kpn_jax.train import DTYPES, config_to_dict
from kpn_jax.trainer import MetricLog, TrainState

TASK = "landmarks"
DATA_INFO = "data_info.json"
MODEL_KEYS = ("depth", "width", "stages", "head_channels", "input_mode", "input_size")


# ----------------------------------------------------------------------------- config


def validate_config(config) -> None:
    """Raises ValueError naming the config field that a typo or bad override got wrong."""
    if config.get("task") != TASK:
        raise ValueError(f"config.task must be {TASK!r} for the landmark detector, got "
                         f"{config.get('task')!r}")
    input_pipeline.check_loading_config(config)
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    m = config.model
    if m.depth not in (18, 34, 50):
        raise ValueError(f"config.model.depth must be 18, 34 or 50, got {m.depth}")
    if not 2 <= m.stages <= 4:
        raise ValueError(f"config.model.stages must be 2, 3 or 4, got {m.stages}")
    if m.input_size < 0 or (m.input_size and m.input_size < 32):
        raise ValueError(f"config.model.input_size must be 0 (as stored) or >= 32, got "
                         f"{m.input_size}")
    if config.loss.coord not in lm.COORD_LOSSES:
        raise ValueError(f"config.loss.coord must be one of {lm.COORD_LOSSES}, got "
                         f"{config.loss.coord!r}")
    active = [name for name, spec in config.sources.items() if spec.batch_size > 0]
    if not active:
        raise ValueError("config.sources: every source has batch_size 0; nothing to train on")
    for name, spec in config.sources.items():
        if spec.batch_size < 0:
            raise ValueError(f"config.sources.{name}.batch_size must be >= 0, got {spec.batch_size}")
        if not 0.0 <= spec.dev_fraction < 1.0:
            raise ValueError(f"config.sources.{name}.dev_fraction must be in [0, 1), got "
                             f"{spec.dev_fraction}")
    for name in ("num_steps", "eval_batch_size", "log_every_steps", "eval_every_steps",
                 "checkpoint_every_steps"):
        if int(config[name]) <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}")
    a = config.augment
    if not (len(a.contrast) == 2 and 0 < a.contrast[0] <= a.contrast[1]):
        raise ValueError(f"config.augment.contrast must be (low, high) with 0 < low <= high, got "
                         f"{a.contrast}")
    if not (len(a.gamma) == 2 and 0 < a.gamma[0] <= a.gamma[1]):
        raise ValueError(f"config.augment.gamma must be (low, high) with 0 < low <= high, got "
                         f"{a.gamma}")
    if a.brightness < 0 or a.noise_std < 0:
        raise ValueError("config.augment.brightness and noise_std must be >= 0")


def check_config_compatible(saved: dict, config) -> None:
    """Raises CheckpointMismatchError when ``workdir/config.json`` describes another detector."""
    if saved.get("task") != TASK:
        raise checkpointing.CheckpointMismatchError(
            f"the workdir holds a {saved.get('task', 'grading')!r} run, not a landmark detector; "
            "use a new --workdir")
    for key in MODEL_KEYS:
        if saved.get("model", {}).get(key) != config.model[key]:
            raise checkpointing.CheckpointMismatchError(
                f"the workdir was trained with model.{key}={saved['model'].get(key)!r} but the "
                f"config says {config.model[key]!r}; use a new --workdir or the same config")


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class Source:
    """One dataset of the mixture: its opened handle and the examples of each role.

    ``train``, ``dev`` and ``eval`` are indices into ``handle``'s ``train_split``
    and ``eval_split`` sources (``dev`` indexes the training split too).
    """

    name: str
    handle: input_pipeline.DatasetHandle
    train_split: str
    eval_split: str
    batch_size: int
    train: np.ndarray
    dev: np.ndarray
    eval: np.ndarray

    def pool(self, role: str) -> input_pipeline.Pool:
        split = self.eval_split if role == "eval" else self.train_split
        indices = getattr(self, role)
        return input_pipeline.Pool([(self.handle.split(split), indices)])


def usable_indices(source) -> np.ndarray:
    """Indices of the examples whose keypoints are all valid, finite and annotated.

    Examples a detector filled in (``keypoints_predicted``) are left out: a detector
    must not learn from its own (or another detector's) guesses.
    """
    if len(source) == 0:
        return np.zeros((0,), np.int64)
    valid = input_pipeline.read_field(source, "keypoints_valid").astype(bool)
    points = input_pipeline.read_field(source, "keypoints")
    keep = valid.all(axis=1) & np.isfinite(points).all(axis=(1, 2))
    try:
        predicted = input_pipeline.read_field(source, "keypoints_predicted").astype(bool)
        keep &= ~predicted.reshape(-1)
    except KeyError:  # datasets built before the field existed
        pass
    return np.flatnonzero(keep)


def dev_mask(subject_ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """bool ``[M]``: the examples of the ``fraction`` of subjects held out as ``dev``.

    Hash-based per subject, so both knees of a person fall on the same side and the
    choice never depends on which other subjects exist.
    """
    if fraction <= 0:
        return np.zeros(len(subject_ids), bool)

    def u(subject: str) -> float:
        digest = hashlib.sha256(f"dev:{seed}:{subject}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2.0 ** 64

    return np.asarray([u(str(s)) < fraction for s in subject_ids], bool)


def _dataset_view(config, spec) -> ml_collections.ConfigDict:
    """The fields :func:`input_pipeline.open_dataset` reads, for one source."""
    return ml_collections.ConfigDict(dict(dataset=spec.dataset, data_dir=config.data_dir,
                                          synthetic=config.synthetic.to_dict()))


def open_sources(config, names: Sequence[str] | None = None) -> dict[str, Source]:
    """Opens every source with ``batch_size > 0`` (or those in ``names``) and sorts its examples.

    Raises:
      ValueError: when a source has no usable training example, or its image size or
        keypoint schema differs from the others'.
    """
    sources = {}
    for name, spec in config.sources.items():
        if names is None and spec.batch_size <= 0:
            continue
        if names is not None and name not in names:
            continue
        handle = input_pipeline.open_dataset(_dataset_view(config, spec))
        if handle.keypoint_schema != config.keypoint_schema:
            raise ValueError(f"config.sources.{name}: dataset {handle.name} has keypoint schema "
                             f"{handle.keypoint_schema!r}, config.keypoint_schema is "
                             f"{config.keypoint_schema!r}")
        train_source = handle.split(spec.split)
        usable = usable_indices(train_source)
        subjects = input_pipeline.read_field(train_source, "subject_id")[usable] if len(usable) \
            else np.zeros((0,), str)
        held = dev_mask(subjects, spec.dev_fraction, config.dev_seed)
        eval_indices = (usable_indices(handle.split(spec.eval_split))
                        if spec.eval_split and spec.eval_split in handle.sources
                        else np.zeros((0,), np.int64))
        source = Source(name=name, handle=handle, train_split=spec.split,
                        eval_split=spec.eval_split, batch_size=int(spec.batch_size),
                        train=usable[~held], dev=usable[held], eval=eval_indices)
        if spec.batch_size > 0 and len(source.train) == 0:
            raise ValueError(f"config.sources.{name}: {handle.name} split {spec.split!r} has no "
                             "example with all keypoints valid (and not predicted)")
        sources[name] = source
    sizes = {s.handle.image_size for s in sources.values() if s.batch_size > 0}
    if len(sizes) > 1:
        raise ValueError(f"config.sources: the training datasets have different image sizes "
                         f"{ {n: s.handle.image_size for n, s in sources.items()} }; build them at "
                         "one size (e.g. config.synthetic.image_size)")
    return sources


class SourceMixStream(Sequence):
    """Element ``i`` of a process's stream of training examples from several sources.

    Global batch ``s`` holds ``batch_sizes[k]`` examples of source ``k``, each source
    walked in a fresh permutation per epoch of its own; example ``j`` of a batch is a
    pure function of ``(seed, s, j)`` (as :class:`input_pipeline.MixedStream`), so a
    resumed run sees the same batches and each process reads only its slice.
    """

    def __init__(self, pools: Sequence, batch_sizes: Sequence[int], num_steps: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        if len(pools) != len(batch_sizes) or not pools:
            raise ValueError("SourceMixStream: one batch size per pool, at least one pool")
        for k, (pool, size) in enumerate(zip(pools, batch_sizes)):
            if size % process_count:
                raise ValueError(f"source {k}: batch size {size} must divide by the "
                                 f"{process_count} processes")
            if size and len(pool) == 0:
                raise ValueError(f"source {k}: empty pool with batch size {size}")
        self.pools = list(pools)
        self.global_sizes = tuple(int(b) for b in batch_sizes)
        self.local_sizes = tuple(b // process_count for b in self.global_sizes)
        self.local_batch = sum(self.local_sizes)
        self.global_batch = sum(self.global_sizes)
        self.num_steps, self.seed, self.process_index = num_steps, seed, process_index

    def __len__(self) -> int:
        return self.num_steps * self.local_batch

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        step, j = divmod(i, self.local_batch)
        # Sources one after the other in the global batch, whatever the number of processes.
        k, row = input_pipeline.global_row(self.process_index * self.local_batch + j,
                                           self.global_sizes)
        position = step * self.global_sizes[k] + row
        pool = self.pools[k]
        epoch, r = divmod(position, len(pool))
        permutation = np.random.default_rng((self.seed, 1000 + k, epoch)).permutation(len(pool))
        return dict(pool[int(permutation[r])])


# ----------------------------------------------------------------------------- augmentation


def intensity_augment(rng: jax.Array, images: jax.Array, *, brightness: float,
                      contrast: Sequence[float], gamma: Sequence[float],
                      noise_std: float) -> jax.Array:
    """Per-image random gamma, contrast, brightness and Gaussian noise; ``[B, H, W, 1]`` in [0, 1].

    Real radiographs differ in exposure and processing far more than the synthetic
    knees do; this makes the detector indifferent to it.
    """
    batch = images.shape[0]
    k_gamma, k_contrast, k_bright, k_noise = jax.random.split(rng, 4)
    shape = (batch, 1, 1, 1)
    log_gamma = jax.random.uniform(k_gamma, shape, jnp.float32, math.log(gamma[0]),
                                   math.log(gamma[1]))
    x = jnp.clip(images, 0.0, 1.0) ** jnp.exp(log_gamma)
    factor = jax.random.uniform(k_contrast, shape, jnp.float32, contrast[0], contrast[1])
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    shift = jax.random.uniform(k_bright, shape, jnp.float32, -brightness, brightness)
    x = (x - mean) * factor + mean + shift
    if noise_std > 0:
        x = x + noise_std * jax.random.normal(k_noise, x.shape, jnp.float32)
    return jnp.clip(x, 0.0, 1.0)


def resize_for_model(images: jax.Array, keypoints: jax.Array | None,
                     size: int) -> tuple[jax.Array, jax.Array | None]:
    """Resizes ``[B, H, W, C]`` to ``[B, size, size, C]``; keypoints follow.

    Half-pixel centres (``jax.image.resize``): a point at pixel ``x`` of a ``W``-wide
    image goes to ``(x + 0.5) * size / W - 0.5``.
    """
    height, width = images.shape[1:3]
    if (height, width) == (size, size):
        return images, keypoints
    resized = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "linear",
                               antialias=True)
    if keypoints is None:
        return resized, None
    scale = jnp.asarray([size / width, size / height], jnp.float32)
    return resized, (keypoints + 0.5) * scale - 0.5


def to_image_pixels(keypoints: jax.Array, size: int, height: int, width: int) -> jax.Array:
    """Inverse of :func:`resize_for_model` for keypoints: model-input pixels -> image pixels."""
    scale = jnp.asarray([width / size, height / size], jnp.float32)
    return (keypoints + 0.5) * scale - 0.5


# ----------------------------------------------------------------------------- model + state


def create_model(config, num_points: int,
                 kernels: kernels_lib.Kernels | None = None) -> lm.LandmarkNet:
    """The detector of ``config.model`` with the backend's kernels (``kernels``, default
    :func:`kpn_jax.kernels.for_config`)."""
    m = config.model
    kernels = kernels or kernels_lib.for_config(config)
    return lm.LandmarkNet(num_points=num_points, depth=m.depth, width=m.width, stages=m.stages,
                          head_channels=m.head_channels, input_mode=m.input_mode,
                          dtype=DTYPES[config.dtype], conv=kernels.conv, max_pool=kernels.max_pool)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay to zero over ``num_steps``, gradient clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, min(config.warmup_steps, config.num_steps - 1),
        config.num_steps, end_value=0.0)
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    return optax.chain(*parts, optax.adamw(schedule, weight_decay=config.weight_decay))


def create_state(config, model, tx, input_size: int, mesh) -> TrainState:
    """A replicated TrainState initialised from ``config.seed``."""

    def make():
        images = jnp.zeros((1, input_size, input_size, 1), jnp.float32)
        variables = model.init(jax.random.PRNGKey(config.seed), images, train=False)
        return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                 batch_stats=variables.get("batch_stats", {}))

    return jax.jit(make, out_shardings=parallel.replicated_sharding(mesh))()


def model_input_size(config, image_size: int) -> int:
    return int(config.model.input_size) or int(image_size)


# ----------------------------------------------------------------------------- steps


def make_train_step(config, model, input_size: int, compiler_options=None):
    """``(state, batch, health, step) -> (state, metrics, health)``, jitted with the state
    donated (and ``compiler_options``, the backend kernels', :mod:`kpn_jax.kernels`); the
    update is guarded (:func:`kpn_jax.trainer.guarded_update`).

    ``batch``: ``image`` uint8 ``[B, S, S, 1]``, ``keypoints`` ``[B, N, 2]`` (pixels of
    the stored image), ``keypoints_valid`` bool ``[B, N]``. Errors in the metrics are
    in stored-image pixels.
    """
    aug = config.augment
    dtype = DTYPES[config.dtype]
    loss_cfg = config.loss

    def step(state: TrainState, batch: dict, health: dict, step_index: jax.Array):
        del step_index  # the schedule lives in the optimizer
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), state.step)
        rng_geometry, rng_intensity = jax.random.split(rng)
        images = batch["image"].astype(jnp.float32) / 255.0
        stored_size = images.shape[2]
        images, keypoints = augment_lib.augment(
            rng_geometry, images, batch["keypoints"].astype(jnp.float32),
            max_translation_px=aug.max_translation_px, max_rotation_deg=aug.max_rotation_deg,
            scale_range=tuple(aug.scale_range))
        images = intensity_augment(rng_intensity, images, brightness=aug.brightness,
                                   contrast=tuple(aug.contrast), gamma=tuple(aug.gamma),
                                   noise_std=aug.noise_std)
        images, keypoints = resize_for_model(images, keypoints, input_size)
        images = images.astype(dtype)
        valid = batch["keypoints_valid"]

        def loss_fn(params):
            outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats},
                                           images, train=True, mutable=["batch_stats"])
            loss, aux = lm.landmark_loss(outputs, keypoints, valid, coord_loss=loss_cfg.coord,
                                         heatmap_weight=loss_cfg.heatmap_weight,
                                         sigma_cells=loss_cfg.sigma_cells)
            return loss, (aux, updates["batch_stats"])

        (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        new_state, health = trainer.guarded_update(state, new_state, loss, grads, health,
                                                   config.get("divergence_factor", 100.0))
        aux = dict(aux)
        # Back to stored-image pixels, the unit every report uses.
        aux["radial_error_px"] = aux["radial_error_px"] * (stored_size / input_size)
        return new_state, aux, health

    return jax.jit(step, donate_argnums=(0,),
                   compiler_options=compiler_options or None)


def make_predict_fn(model, input_size: int, dtype=jnp.float32):
    """Jitted ``(variables, images uint8 [B, H, W, 1]) -> keypoints [B, N, 2]`` in image pixels."""

    def predict(variables, images):
        height, width = images.shape[1:3]
        x = images.astype(jnp.float32) / 255.0
        x, _ = resize_for_model(x, None, input_size)
        outputs = model.apply(variables, x.astype(dtype), train=False)
        return to_image_pixels(outputs["keypoints"], input_size, height, width)

    return jax.jit(predict)


def predict_pool(predict_fn, variables, pool, checker, mesh, batch_size: int,
                 loading: input_pipeline.Loading = input_pipeline.Loading()) -> dict:
    """Predicts every example of ``pool`` once.

    Returns numpy ``{'pred': [M, N, 2], 'true': [M, N, 2], 'valid': [M, N],
    'image': uint8 [M, S, S, 1] (the first 64 only)}`` in the pool's order.
    """
    result = trainer.predict_dataset(
        lambda variables, batch: {"pred": predict_fn(variables, batch["image"])}, variables,
        pool, checker, mesh, batch_size, fields=("image", "keypoints", "keypoints_valid"),
        loading=loading, outputs=("keypoints", "keypoints_valid", "image"), first={"image": 64})
    return {"pred": result["pred"], "true": result["keypoints"],
            "valid": result["keypoints_valid"], "image": result["image"]}


# ----------------------------------------------------------------------------- evaluation


def evaluation_sets(sources: dict[str, Source], which: Sequence[str]) -> dict[str, tuple]:
    """``{'{set}/{source}': (Source, role)}`` for the roles in ``which`` that have examples."""
    sets = {}
    for name, source in sources.items():
        if "dev" in which and len(source.dev):
            sets[f"dev/{name}"] = (source, "dev")
        if "eval" in which and len(source.eval):
            sets[f"{source.eval_split}/{name}"] = (source, "eval")
    return sets


def evaluate_sets(predict_fn, variables, sets: dict, mesh, config, point_names) -> dict:
    """``{'{set}/{source}': (summary dict, predictions dict)}`` for every evaluation set."""
    results = {}
    for key, (source, role) in sets.items():
        checker = input_pipeline.make_example_checker(source.handle.image_size, len(point_names),
                                                      need_keypoints=True)
        predictions = predict_pool(predict_fn, variables, source.pool(role), checker, mesh,
                                   config.eval_batch_size,
                                   input_pipeline.loading_for_config(config))
        errors = lm.radial_errors(predictions["pred"], predictions["true"])
        summary = lm.summarize_errors(errors, predictions["valid"], point_names=point_names)
        summary["image_size"] = source.handle.image_size
        summary["dataset"] = source.handle.name
        results[key] = (summary, predictions)
    return results


def flat_metrics(results: dict) -> dict:
    """``{'{set}/{source}/{stat}': float}`` of the overall statistics (no per-point ones)."""
    flat = {}
    for key, (summary, _) in results.items():
        for stat, value in summary.items():
            if isinstance(value, (int, float)) and stat != "image_size":
                flat[f"{key}/{stat}"] = float(value)
    return flat


def write_montage(path: Path, images: np.ndarray, predicted: np.ndarray, true: np.ndarray,
                  schema: kp_lib.KeypointSchema, title: str, max_images: int = 16) -> Path:
    """A grid of images with true (green) and predicted (red) keypoints, bones joined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = min(len(images), max_images)
    if count == 0:
        raise ValueError("write_montage: no image to draw")
    columns = min(4, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(3 * columns, 3 * rows + 0.4), dpi=100)
    FigureCanvasAgg(figure)
    errors = lm.radial_errors(predicted[:count], true[:count])
    for i in range(count):
        axis = figure.add_subplot(rows, columns, i + 1)
        axis.imshow(images[i, ..., 0], cmap="gray", vmin=0, vmax=255)
        for color, points in (("lime", true[i]), ("red", predicted[i])):
            for bone in schema.bones.values():
                axis.plot(points[list(bone), 0], points[list(bone), 1], "-", color=color,
                          linewidth=0.8)
            axis.plot(points[:, 0], points[:, 1], ".", color=color, markersize=3)
        axis.set_title(f"mean {errors[i].mean():.2f} px", fontsize=8)
        axis.set_axis_off()
    figure.suptitle(f"{title}  (green: reference, red: detector)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def format_report(results: dict, point_names: Sequence[str], checkpoint: dict) -> str:
    """Markdown: an overall table per evaluation set and a per-point table."""
    lines = [f"# Landmark detector ({checkpoint['which']} checkpoint, step {checkpoint['step']})",
             "", "Radial error in pixels of each dataset's stored image.", "",
             "| set | images | points | image px | mean | median | <=2 px % | <=3 px % | <=5 px % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, (s, _) in results.items():
        lines.append(f"| {key} | {s['num_images']} | {s['num_points']} | {s['image_size']} | "
                     f"{s['mean']:.2f} | {s['median']:.2f} | {s['within_2px']:.1f} | "
                     f"{s['within_3px']:.1f} | {s['within_5px']:.1f} |")
    for key, (s, _) in results.items():
        lines += ["", f"## Per point: {key}", "", "| point | mean | median | <=2 px % | <=3 px % "
                  "| <=5 px % |", "| --- | --- | --- | --- | --- | --- |"]
        for name in point_names:
            p = s["per_point"][name]
            lines.append(f"| {name} | {p['mean']:.2f} | {p['median']:.2f} | {p['within_2px']:.1f} "
                         f"| {p['within_3px']:.1f} | {p['within_5px']:.1f} |")
    return "\n".join(lines) + "\n"


def write_report(workdir: Path, results: dict, schema, checkpoint: dict,
                 montage_images: int = 16) -> Path:
    """``report/landmarks.md``, ``report/landmarks_{set}_{source}.json`` and montages."""
    report = workdir / "report"
    report.mkdir(parents=True, exist_ok=True)
    for key, (summary, predictions) in results.items():
        stem = "landmarks_" + key.replace("/", "_")
        (report / f"{stem}.json").write_text(json.dumps(
            {**summary, "checkpoint": checkpoint}, indent=1))
        if montage_images and len(predictions["image"]):
            write_montage(report / f"{stem.replace('landmarks_', 'landmarks_montage_')}.png",
                          predictions["image"], predictions["pred"], predictions["true"], schema,
                          f"{key}: mean {summary['mean']:.2f} px", montage_images)
    path = report / "landmarks.md"
    path.write_text(format_report(results, schema.point_names, checkpoint))
    return path


# ----------------------------------------------------------------------------- main loop


_print = trainer.print_once


def train_and_evaluate_landmarks(config: ml_collections.ConfigDict, workdir: str,
                                 allow_config_change: bool = False,
                                 stop_requested=None) -> dict:
    """Trains the detector, keeps the best checkpoint on ``dev``, reports every evaluation set.

    Resumes from ``workdir/checkpoints/latest`` when present (see :mod:`kpn_jax.trainer`).
    Returns ``{'{set}/{source}': summary}`` (see :func:`kpn_jax.models.landmarks.summarize_errors`)
    of the final checkpoint (best on dev, else latest).
    """
    validate_config(config)
    mesh = parallel.make_mesh()
    schema = kp_lib.get_schema(config.keypoint_schema)
    sources = open_sources(config)
    training = [s for s in sources.values() if s.batch_size > 0]
    image_size = training[0].handle.image_size
    input_size = model_input_size(config, image_size)
    stream = SourceMixStream([s.pool("train") for s in training], [s.batch_size for s in training],
                             config.num_steps, config.seed, jax.process_index(),
                             jax.process_count())
    parallel.check_batch_size(stream.global_batch, mesh, "the sources' batch sizes")
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock.held(workdir, jax.process_index() == 0):
        checkpoints = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
        trainer.write_config(workdir, config_to_dict(config),
                             lambda saved: check_config_compatible(saved, config),
                             allow_config_change, checkpoints.latest_step(),
                             absent_means={"matmul_precision": "default"})
        if jax.process_index() == 0:
            storage.write_atomic(workdir / DATA_INFO, json.dumps(
                {"task": TASK, "image_size": image_size, "input_size": input_size,
                 "keypoint_schema": schema.name,
                 "sources": {s.name: {"dataset": s.handle.name, "train": len(s.train),
                                      "dev": len(s.dev), "eval": len(s.eval)}
                             for s in sources.values()}}, indent=1))

        kernels = kernels_lib.for_config(config)
        model = create_model(config, schema.num_points, kernels)
        tx = make_optimizer(config)
        state = create_state(config, model, tx, input_size, mesh)
        start_step = 0
        if checkpoints.latest_step() is not None:
            state = checkpoints.restore(state)
            start_step = int(jax.device_get(state.step))
            _print(f"Resuming from {workdir}/checkpoints/latest at step {start_step}")
        log = MetricLog(workdir, start_step)

        checker = input_pipeline.make_example_checker(image_size, schema.num_points, True)
        train_step = make_train_step(config, model, input_size, kernels.compiler_options)
        predict_fn = make_predict_fn(model, input_size, DTYPES[config.dtype])
        dev_sets = evaluation_sets(sources, ("dev",))
        _print(f"kpn-jax landmarks: ResNet-{config.model.depth} trunk (width {config.model.width}, "
               f"{config.model.stages} stages) at {input_size} px; "
               + ", ".join(f"{s.name} {s.handle.name}: {len(s.train)} train / {len(s.dev)} dev / "
                           f"{len(s.eval)} {s.eval_split}, {s.batch_size} per batch"
                           for s in sources.values())
               + f"; {config.num_steps} steps, {jax.device_count()} device(s)")

        def run_dev_evaluation(step: int, state) -> None:
            if not dev_sets:
                return
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            results = evaluate_sets(predict_fn, variables, dev_sets, mesh, config, schema.point_names)
            flat = flat_metrics(results)
            log.write(step, flat)
            _print(f"  dev @ step {step}: " + " | ".join(
                f"{k} mean {s['mean']:.2f} px, median {s['median']:.2f}, <=3px {s['within_3px']:.1f}%"
                for k, (s, _) in results.items()))
            if not config.best_metric:
                return
            if config.best_metric not in flat:
                raise ValueError(f"config.best_metric {config.best_metric!r} is not among the dev "
                                 f"metrics {sorted(flat)}")
            value = flat[config.best_metric]
            if not math.isfinite(value):
                raise ValueError(f"config.best_metric {config.best_metric!r} is {value} at step {step}")
            best = checkpoints.best_record()
            # Process 0 decides (best.json is its file): every process then calls the
            # collective save, or none does.
            if parallel.agree(best is None or value < best["value"]):
                checkpoints.save_best(step, state, config.best_metric, value)

        def window_record(done: int, values: list[dict], elapsed: float) -> tuple[dict, str]:
            record = {f"train/{k}": float(np.mean([v[k] for v in values])) for k in values[0]}
            record["train/images_per_sec"] = len(values) * stream.global_batch / max(elapsed, 1e-9)
            record["train/lr"] = float(tx_learning_rate(config, done - 1))
            eta = (config.num_steps - done) * elapsed / max(1, len(values))
            return record, (
                f"step {done}/{config.num_steps} | {record['train/images_per_sec']:.1f} img/s"
                f" | ETA {trainer.format_duration(eta)} | loss {record['train/loss']:.3f} "
                f"coord {record['train/coord']:.3f} heatmap {record['train/heatmap']:.3f} | "
                f"train radial error {record['train/radial_error_px']:.2f} px")

        def refusal_message(step: int, loss: float) -> str:
            latest = checkpoints.latest_step()
            where = (f"resume from {workdir}/checkpoints/latest (step {latest})" if latest is not None
                     else "no checkpoint was written")
            return (f"training stopped at step {step}: loss {loss:.4g} (non-finite or diverging); "
                    f"the update was not applied. Lower config.learning_rate or check the data; "
                    f"{where}")

        state = trainer.fit(
            state=state, health=parallel.replicate(trainer.initial_health(), mesh),
            train_step=lambda st, batch, health, step: train_step(st, batch, health,
                                                                   jnp.asarray(step, jnp.int32)),
            batches=input_pipeline.train_iterator(stream, checker, start_step,
                                                  input_pipeline.loading_for_config(config)),
            to_device=lambda local: parallel.global_batch(
                {k: local[k] for k in ("image", "keypoints", "keypoints_valid")}, mesh),
            start_step=start_step, total_steps=config.num_steps,
            checkpoints=checkpoints, log=log, log_every=config.log_every_steps,
            checkpoint_every=config.checkpoint_every_steps, evaluate_every=config.eval_every_steps,
            evaluate=run_dev_evaluation, window_record=window_record,
            refusal_message=refusal_message, stop_requested=stop_requested)
        if dev_sets and config.best_metric and checkpoints.best_step() is None:
            run_dev_evaluation(int(jax.device_get(state.step)), state)
            checkpoints.wait()

        results = final_evaluation(config, workdir, sources, model, state, checkpoints, input_size,
                                   schema, mesh)
        log.close()
        checkpoints.close()
        return results


def tx_learning_rate(config, step: int) -> float:
    """The learning rate of :func:`make_optimizer` at ``step`` (for the logs)."""
    warmup = min(config.warmup_steps, config.num_steps - 1)
    return float(optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup,
                                                    config.num_steps, end_value=0.0)(step))


def final_evaluation(config, workdir: Path, sources, model, state, checkpoints, input_size: int,
                     schema, mesh) -> dict:
    """Evaluates the best (else latest) checkpoint on every dev and eval set; writes ``report/``."""
    which = "best" if config.best_metric and checkpoints.best_step() is not None else "latest"
    state = checkpoints.restore(state, which=which)
    checkpoint = {"which": which, "step": int(jax.device_get(state.step))}
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    predict_fn = make_predict_fn(model, input_size, DTYPES[config.dtype])
    sets = evaluation_sets(sources, tuple(config.eval_sets))
    results = evaluate_sets(predict_fn, variables, sets, mesh, config, schema.point_names)
    if jax.process_index() == 0 and results:
        path = write_report(workdir, results, schema, checkpoint, config.montage_images)
        _print(path.read_text().split("\n## ")[0])
        _print(f"Report written to {path.parent}")
    return {key: summary for key, (summary, _) in results.items()}


def evaluate_landmarks(config, workdir: str) -> dict:
    """``--mode=evaluate`` for a landmark config: the best (else latest) checkpoint, every set."""
    validate_config(config)
    workdir = Path(workdir).expanduser().resolve()
    if not (workdir / "checkpoints").exists():
        raise FileNotFoundError(f"no checkpoints in workdir {workdir}")
    config_path = workdir / "config.json"
    if config_path.exists():
        check_config_compatible(json.loads(config_path.read_text()), config)
    mesh = parallel.make_mesh()
    schema = kp_lib.get_schema(config.keypoint_schema)
    sources = open_sources(config)  # the sources switched on, as in training
    info = json.loads((workdir / DATA_INFO).read_text())
    model = create_model(config, schema.num_points)
    state = create_state(config, model, make_optimizer(config), info["input_size"], mesh)
    checkpoints = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        return final_evaluation(config, workdir, sources, model, state, checkpoints,
                                info["input_size"], schema, mesh)
    finally:
        checkpoints.close()
