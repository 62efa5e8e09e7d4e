"""``train_and_evaluate(config, workdir)``: the training program.

One jitted step over a 1-D ``('data',)`` mesh: on-device augmentation, model,
classification + incoherence losses, Adam update. The input pipeline, the
augmentation and the dropout-free model are pure functions of
``(config.seed, step)``, so a run killed at any point resumes from its last
checkpoint to the same parameters it would have reached uninterrupted.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kpn_jax import augment as augment_lib
from kpn_jax import checkpointing, datasets, evaluate as eval_lib
from kpn_jax import gmm as gmm_lib
from kpn_jax import grades as grades_lib
from kpn_jax import input_pipeline, kernels as kernels_lib, keypoints as kp_lib, losses
from kpn_jax import model_folder, parallel, storage
from kpn_jax import trainer, workdir_config, workdir_lock
from kpn_jax.trainer import MetricLog, TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DATA_INFO = "data_info.json"  # image size and keypoint schema of the training data
MATMUL_PRECISIONS = ("default", "high", "highest")
OPTIMIZERS = ("adam", "sgd")
# Config fields added after workdirs were trained, with the value that is the behaviour
# before them: resuming an older workdir with these values is no config change.
ADDED_FIELDS = {"lr_schedule": "step", "lr_warmup_epochs": 0.0, "label_smoothing": 0.0,
                "ema_decay": 0.0, "augment.hflip": False, "eval_hflip": False,
                "matmul_precision": "default", "coherence.use_unlabeled_split": True,
                "optimizer": "adam", "momentum": 0.9, "augment.contrast": 0.0,
                "augment.brightness": 0.0, "augment.gamma": 0.0, "mixup_alpha": 0.0,
                "model.stem_max_pool": True, "ordinal_label_sigma": 0.0}


# ----------------------------------------------------------------------------- config


def _check_off_or_positive(config, name: str) -> float:
    """The value of ``config.<name>``, a number >= 0 where 0 means off; else ValueError."""
    value = config.get(name, 0.0)
    if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
        raise ValueError(f"config.{name} must be a number >= 0 (0 = off), got {value!r}")
    return value


def validate_config(config) -> None:
    """Checks values a typo or a bad override would get wrong; raises ValueError naming the field."""
    unknown = [t for t in config.tasks if t not in grades_lib.TASKS]
    if unknown or not config.tasks:
        raise ValueError(f"config.tasks: unknown task(s) {unknown}; choose from {grades_lib.TASKS}")
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    if config.model.pooling not in ("keypoints", "global"):
        raise ValueError(f"config.model.pooling must be 'keypoints' or 'global', got "
                         f"{config.model.pooling!r}")
    if config.model.get("head", "softmax") not in ("softmax", "cumulative"):
        raise ValueError(f"config.model.head must be 'softmax' or 'cumulative', got "
                         f"{config.model.head!r}")
    if config.model.depth not in (18, 34, 50):
        raise ValueError(f"config.model.depth must be 18, 34 or 50, got {config.model.depth}")
    if config.coherence.enabled and tuple(config.tasks) != grades_lib.TASKS:
        raise ValueError("config.coherence.enabled needs all 7 tasks (the GMM models the joint "
                         f"29-dim grade vector), but config.tasks={tuple(config.tasks)}")
    if config.epoch_basis not in ("labeled", "train"):
        raise ValueError(f"config.epoch_basis must be 'labeled' or 'train', got {config.epoch_basis!r}")
    if config.class_weighting not in ("prevalence", "none"):
        raise ValueError(f"config.class_weighting must be 'prevalence' or 'none', got "
                         f"{config.class_weighting!r}")
    if config.weight_decay_style not in ("l2", "decoupled"):
        raise ValueError(f"config.weight_decay_style must be 'l2' or 'decoupled', got "
                         f"{config.weight_decay_style!r}")
    optimizer = config.get("optimizer", "adam")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"config.optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "sgd":
        if not 0 <= config.momentum < 1:
            raise ValueError(f"config.momentum must be in [0, 1), got {config.momentum!r}")
        if config.weight_decay_style != "l2":
            raise ValueError("config.optimizer='sgd' takes config.weight_decay_style='l2' "
                             "(torch SGD's weight_decay); 'decoupled' is AdamW's")
    for name in ("batch_size", "eval_batch_size", "num_epochs"):
        if int(config[name]) <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}")
    if not config.learning_rate > 0 or not math.isfinite(config.learning_rate):
        raise ValueError(f"config.learning_rate must be a positive number, got "
                         f"{config.learning_rate!r}")
    if config.get("matmul_precision", "default") not in MATMUL_PRECISIONS:
        raise ValueError(f"config.matmul_precision must be one of {MATMUL_PRECISIONS}, got "
                         f"{config.matmul_precision!r}")
    if config.lr_schedule not in ("step", "cosine"):
        raise ValueError(f"config.lr_schedule must be 'step' or 'cosine', got {config.lr_schedule!r}")
    if not 0 <= config.lr_warmup_epochs < config.num_epochs:
        raise ValueError(f"config.lr_warmup_epochs must be in [0, num_epochs), got "
                         f"{config.lr_warmup_epochs!r}")
    if config.lr_warmup_epochs and config.lr_schedule != "cosine":
        raise ValueError("config.lr_warmup_epochs needs config.lr_schedule='cosine'")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"config.label_smoothing must be in [0, 1), got {config.label_smoothing!r}")
    _check_off_or_positive(config, "ordinal_label_sigma")
    if not 0 <= config.ema_decay < 1:
        raise ValueError(f"config.ema_decay must be in [0, 1) (0 = off), got {config.ema_decay!r}")
    mixup_alpha = _check_off_or_positive(config, "mixup_alpha")
    if mixup_alpha and (config.coherence.enabled or config.model.pooling != "global"):
        # A blend of two knees has no one set of keypoints, nor one 29-dim grade vector for
        # the GMM to judge.
        raise ValueError("config.mixup_alpha needs config.model.pooling='global' and "
                         "config.coherence.enabled=False")
    for name, on in (("augment.hflip", config.augment.hflip), ("eval_hflip", config.eval_hflip)):
        if on and any(task != "kl" for task in config.tasks):
            raise ValueError(f"config.{name} mirrors knees, which swaps lateral and medial: only "
                             f"for tasks=('kl',), not {tuple(config.tasks)}")
    try:
        augment_lib.check_intensity_ranges(config.augment.get("contrast", 0.0),
                                           config.augment.get("brightness", 0.0),
                                           config.augment.get("gamma", 0.0))
    except ValueError as error:
        raise ValueError(f"config.{error}") from None
    if not 0 < config.lr_decay_factor <= 1:
        raise ValueError(f"config.lr_decay_factor must be in (0, 1], got {config.lr_decay_factor!r}")
    if not config.weight_decay >= 0:
        raise ValueError(f"config.weight_decay must be >= 0, got {config.weight_decay!r}")
    for name in ("log_every_steps", "checkpoint_every_steps"):
        if int(config[name]) <= 0:
            raise ValueError(f"config.{name} must be positive, got {config[name]}")
    input_pipeline.check_loading_config(config)
    if not config.eval_every_epochs > 0:
        raise ValueError(f"config.eval_every_epochs must be positive, got "
                         f"{config.eval_every_epochs!r}")
    best_metric(config)  # a best metric that no evaluation reports is an error now
    coherence = config.coherence
    if int(coherence.gmm_repeats) < 0 or int(coherence.gmm_repeats) != coherence.gmm_repeats:
        raise ValueError(f"config.coherence.gmm_repeats must be an integer >= 0 (0 = automatic), "
                         f"got {coherence.gmm_repeats!r}")
    if not coherence.warmup_epochs >= 0:
        raise ValueError(f"config.coherence.warmup_epochs must be >= 0, got "
                         f"{coherence.warmup_epochs!r}")
    if not coherence.lambda_gmm >= 0:
        raise ValueError(f"config.coherence.lambda_gmm must be >= 0, got {coherence.lambda_gmm!r}")


def config_to_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def best_metric(config, validation_grades: np.ndarray | None = None) -> str:
    """The validation metric that picks the best checkpoint (higher is better).

    ``config.best_metric='auto'`` follows the trained tasks and, given the validation
    split's ``grades [M, 7]``, the grades it holds: the OARSI average accuracy when all six
    OARSI tasks are trained and graded there, else the accuracy of the first trained task
    that is (``validation/kl/accuracy`` for KL-only training or KL-only data).

    Raises:
      ValueError: a metric of an untrained task, or of one the validation split never grades.
    """
    def graded(task: str) -> bool:
        return (validation_grades is None
                or bool((validation_grades[:, grades_lib.TASKS.index(task)] >= 0).any()))

    tasks = tuple(config.tasks)
    if config.best_metric != "auto":
        split, _, rest = config.best_metric.partition("/")
        task = rest.partition("/")[0]
        needed = grades_lib.OARSI_TASKS if task == "oarsi_average" else (task,)
        if split != "validation" or not set(needed) <= set(tasks):
            raise ValueError(f"config.best_metric {config.best_metric!r} is not a validation "
                             f"metric of the trained tasks {tasks} (e.g. "
                             f"'validation/{tasks[0]}/accuracy', or 'auto')")
        if not all(graded(t) for t in needed):
            raise ValueError(f"config.best_metric {config.best_metric!r}: the validation split "
                             f"has no {task} grades; use 'auto' or another task's metric")
        return config.best_metric
    if set(grades_lib.OARSI_TASKS) <= set(tasks) and all(graded(t) for t in grades_lib.OARSI_TASKS):
        return "validation/oarsi_average/accuracy"
    for task in tasks:
        if graded(task):
            return f"validation/{task}/accuracy"
    raise ValueError(f"the validation split grades none of the trained tasks {tasks}: there is "
                     f"nothing to pick the best checkpoint by")


# ----------------------------------------------------------------------------- model + state


def create_model(config, keypoint_schema: str = "kneel16",
                 kernels: kernels_lib.Kernels | None = None):
    """The flax module of ``config.model`` (KPN or the global-pooling baseline), with the
    backend's kernels (``kernels``, default :func:`kpn_jax.kernels.for_config`)."""
    from kpn_jax.models import kpn

    m = config.model
    kernels = kernels or kernels_lib.for_config(config)
    kwargs = dict(depth=m.depth, width=m.width, tasks=tuple(config.tasks),
                  aux_regression=m.aux_regression, head=m.get("head", "softmax"),
                  input_mode=m.input_mode, stem_max_pool=m.get("stem_max_pool", True),
                  dtype=DTYPES[config.dtype], conv=kernels.conv, max_pool=kernels.max_pool)
    if m.pooling == "keypoints":
        kwargs.update(schema_name=keypoint_schema, densify_k=(m.densify_k or None),
                      aggregation=m.aggregation, feature_layer=m.feature_layer)
    return kpn.create_model(pooling=m.pooling, **kwargs)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """``config.lr_schedule``: the paper's steps (``lr_decay_epochs``), or a cosine decay to
    0 at epoch ``num_epochs`` after a linear warm-up of ``lr_warmup_epochs``."""
    if config.lr_schedule == "cosine":
        total = max(1, int(config.num_epochs * steps_per_epoch))
        warmup = int(config.lr_warmup_epochs * steps_per_epoch)
        if warmup:
            return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, total)
        return optax.cosine_decay_schedule(config.learning_rate, total)
    boundaries = {int(e * steps_per_epoch): config.lr_decay_factor for e in config.lr_decay_epochs}
    return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def make_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (the paper's) or SGD, with weight decay and the schedule of ``config.lr_schedule``.

    ``weight_decay_style='l2'`` adds ``wd * w`` to the gradient before Adam, as
    torch's ``Adam(weight_decay=...)`` (the paper's PyTorch setting) does.
    ``optimizer='sgd'`` is torch's ``SGD(momentum=config.momentum, nesterov=True,
    weight_decay=wd)``.
    """
    schedule = learning_rate_schedule(config, steps_per_epoch)
    if config.get("optimizer", "adam") == "sgd":
        return optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.sgd(schedule, momentum=config.momentum or None, nesterov=True))
    if config.weight_decay_style == "decoupled":
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(schedule))


def learning_rate_at(config, steps_per_epoch: int, step: int) -> float:
    return float(learning_rate_schedule(config, steps_per_epoch)(step))


def init_variables(model, image_size: int, num_points: int, seed: int) -> dict:
    images = jnp.zeros((1, image_size, image_size, 1), jnp.float32)
    keypoints = jnp.full((1, num_points, 2), image_size / 2.0, jnp.float32)
    return model.init(jax.random.PRNGKey(seed), images, keypoints, train=False)


def create_state(config, model, tx, image_size: int, num_points: int, mesh) -> TrainState:
    """A replicated TrainState; the backbone comes from ``config.init_from`` when set."""

    def make():
        variables = init_variables(model, image_size, num_points, config.seed)
        state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                  batch_stats=variables.get("batch_stats", {}))
        return state.replace(ema=trainer.variables_of(state)) if config.ema_decay else state

    state = jax.jit(make, out_shardings=parallel.replicated_sharding(mesh))()
    if config.init_from:
        from kpn_jax.interop import torch_weights

        backbone = torch_weights.load_backbone(os.path.expanduser(config.init_from), config.model.depth,
                                               input_mode=config.model.input_mode)
        merged = torch_weights.merge_backbone(
            {"params": state.params, "batch_stats": state.batch_stats}, backbone)
        state = state.replace(params=merged["params"], batch_stats=merged["batch_stats"],
                              opt_state=tx.init(merged["params"]))
        if config.ema_decay:
            state = state.replace(ema=trainer.variables_of(state))
        state = parallel.replicate(state, mesh)
    return state


# ----------------------------------------------------------------------------- steps


def make_train_step(config, model, class_weights: dict, gmm, warmup_steps: int = 0,
                    compiler_options=None):
    """Jitted ``(state, batch, health, step) -> (state, metrics, health)``, state donated.

    The incoherence loss is on from step ``warmup_steps``; the update is guarded
    (:func:`kpn_jax.trainer.guarded_update`); ``compiler_options`` are the backend
    kernels' (:mod:`kpn_jax.kernels`).
    """
    dtype = DTYPES[config.dtype]
    aug = config.augment
    coherence = config.coherence
    tasks = tuple(config.tasks)
    mixup_alpha = float(config.get("mixup_alpha", 0.0))
    ordinal_label_sigma = float(config.get("ordinal_label_sigma", 0.0))

    def step(state: TrainState, batch: dict, health: dict, step_index: jax.Array):
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), state.step)
        images = batch["image"].astype(jnp.float32) / 255.0
        images, keypoints = augment_lib.augment(
            rng, images, batch["keypoints"].astype(jnp.float32),
            max_translation_px=aug.max_translation_px, max_rotation_deg=aug.max_rotation_deg,
            scale_range=tuple(aug.scale_range), hflip=bool(aug.hflip))
        # A key of its own, so that runs without grey-level changes draw what they drew before.
        images = augment_lib.augment_intensity(
            jax.random.fold_in(rng, 1), images, contrast=aug.get("contrast", 0.0),
            brightness=aug.get("brightness", 0.0), gamma=aug.get("gamma", 0.0))
        if mixup_alpha:
            lam, partner = augment_lib.mixup_params(jax.random.fold_in(rng, 2), images.shape[0],
                                                    mixup_alpha)
            images = augment_lib.mix_images(images, lam, partner)
        images = images.astype(dtype)

        def loss_fn(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, keypoints,
                train=True, mutable=["batch_stats"])

            def loss_of_targets(grades, labeled_mask):
                return losses.total_loss(
                    outputs, grades, class_weights, gmm=gmm, tau=coherence.tau,
                    lambda_cls=config.lambda_cls, lambda_gmm=coherence.lambda_gmm,
                    use_gmm=step_index >= warmup_steps, labeled_mask=labeled_mask, tasks=tasks,
                    aux_regression_weight=config.aux_regression_weight,
                    label_smoothing=config.label_smoothing,
                    ordinal_label_sigma=ordinal_label_sigma)

            if mixup_alpha:
                loss, aux = losses.mixup_loss(loss_of_targets, batch["grades"], batch["labeled"],
                                              lam, partner)
            else:
                loss, aux = loss_of_targets(batch["grades"], batch["labeled"])
            return loss, (aux, updates["batch_stats"])

        (loss, (aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        new_state, health = trainer.guarded_update(state, new_state, loss, grads, health,
                                                   config.divergence_factor)
        if config.ema_decay:
            new_state = trainer.update_ema(new_state, config.ema_decay)
        return new_state, dict(aux), health

    return jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options or None)


# ----------------------------------------------------------------------------- data prep


def load_training_data(config, mesh, handle=None):
    """Opens the dataset and prepares the labelled/unlabelled streams, class weights and GMM inputs."""
    handle = handle or input_pipeline.open_dataset(config)
    train_source = handle.split("train")
    train_grades = grades_lib.validate(input_pipeline.read_field(train_source, "grades"),
                                       name=f"{handle.name} train grades")
    subject_ids = input_pipeline.read_field(train_source, "subject_id")
    labeled = input_pipeline.labeled_indices(train_grades, subject_ids, config.labeled_fraction,
                                             config.labeled_fraction_seed, config.tasks)
    labeled_grades = train_grades[labeled]
    unlabeled_pool = None
    if config.coherence.enabled:
        parts = [(train_source, np.arange(len(train_source)))]
        if "unlabeled" in handle.sources and config.coherence.get("use_unlabeled_split", True):
            parts.insert(0, (handle.sources["unlabeled"], np.arange(len(handle.sources["unlabeled"]))))
        unlabeled_pool = input_pipeline.Pool(parts)
    return handle, labeled, labeled_grades, unlabeled_pool


def check_coherence_data(config, labeled_grades: np.ndarray) -> int:
    """The number of fully graded labelled knees; an error when too few to fit the GMM."""
    num_complete = int(grades_lib.fully_graded(labeled_grades).sum())
    needed = 2 * config.coherence.num_components
    if num_complete < needed:
        raise ValueError(f"coherence learning needs fully graded examples (all 7 grades) to fit "
                         f"the GMM: found {num_complete} among the labelled training knees, need "
                         f"at least {needed}; train without it with "
                         f"--config.coherence.enabled=False")
    return num_complete


def fit_or_load_gmm(config, workdir: Path, labeled_grades: np.ndarray):
    """The coherence GMM: cached as ``workdir/gmm.npz``, fitted on the labelled training grades.

    Decided and done once: process 0 says whether the file exists, fits and writes it
    (atomically); every process then reads the same file."""
    path = workdir / "gmm.npz"
    if not parallel.agree(path.exists()):
        check_coherence_data(config, labeled_grades)  # a refusal on every process, not one
        if jax.process_index() == 0:
            gmm_lib.save(_fit_gmm(config, labeled_grades), path)  # atomic
        parallel.barrier("kpn_jax: gmm.npz written")
    return gmm_lib.load(path)


def _fit_gmm(config, labeled_grades: np.ndarray):
    c = config.coherence
    num_complete = check_coherence_data(config, labeled_grades)
    repeats = c.gmm_repeats or gmm_lib.auto_repeats(max(num_complete, 1), c.num_components)
    fitted = gmm_lib.fit(labeled_grades, num_components=c.num_components, sigma=c.sigma,
                         repeats=repeats, seed=c.gmm_seed)
    floor = gmm_lib.covariance_floor(fitted)
    _print(f"coherence GMM: K={c.num_components}, sigma={c.sigma:g}, fitted on {num_complete} "
           f"fully graded knees x {repeats} noisy copies; smallest covariance eigenvalue "
           f"{floor:.2g} (sigma^2 = {c.sigma ** 2:.2g})")
    if c.sigma > 0 and floor < 0.1 * c.sigma ** 2:
        _print(f"WARNING: the coherence GMM is degenerate: a component's covariance has an "
               f"eigenvalue of {floor:.2g}, far below the noise floor sigma^2 = "
               f"{c.sigma ** 2:.2g}, so coherent predictions off its subspace get log-densities "
               f"of -1e3 and lower and the incoherence loss will swamp the classification loss. "
               f"Raise config.coherence.gmm_repeats (now {repeats}; 0 = automatic) or lower "
               f"config.coherence.num_components.")
    return fitted


# ----------------------------------------------------------------------------- logging


_print = trainer.print_once


# ----------------------------------------------------------------------------- main loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False, stop_requested=None) -> dict:
    """Trains, evaluates on validation, keeps the best checkpoint, tests it, writes the report.

    Resumes from ``workdir/checkpoints/latest``; a run killed at any moment and started
    again ends as an uninterrupted one would (see :mod:`kpn_jax.trainer`). A resume with a
    config that differs from the workdir's is refused unless ``allow_config_change``.
    ``stop_requested`` (``() -> bool``, asked before each step; run.py's SIGTERM flag) stops
    the run there with a checkpoint saved, raising :class:`kpn_jax.trainer.StopRequested`.

    Returns the final ``{split: evaluate()-dict}`` of the best checkpoint.
    """
    validate_config(config)
    mesh = parallel.make_mesh()
    batch_unlabeled = config.unlabeled_batch_size if config.coherence.enabled else 0
    parallel.check_batch_size(config.batch_size, mesh, "config.batch_size")
    if batch_unlabeled:
        parallel.check_batch_size(batch_unlabeled, mesh, "config.unlabeled_batch_size")
    handle, labeled, labeled_grades, unlabeled_pool = load_training_data(config, mesh)
    validation = handle.sources.get("validation")
    metric = best_metric(config, None if validation is None or len(validation) == 0 else
                         input_pipeline.read_field(validation, "grades"))
    if config.coherence.enabled:
        check_coherence_data(config, labeled_grades)
    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock.held(workdir, jax.process_index() == 0):
        checkpoints = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
        trainer.write_config(workdir, config_to_dict(config),
                             lambda saved: checkpointing.check_config_compatible(saved, config),
                             allow_config_change, checkpoints.latest_step(), ADDED_FIELDS)
        schema = kp_lib.get_schema(handle.keypoint_schema)
        epoch_examples = len(labeled) if config.epoch_basis == "labeled" else len(handle.split("train"))
        steps_per_epoch = max(1, math.ceil(epoch_examples / config.batch_size))
        total_steps = steps_per_epoch * config.num_epochs
        if config.max_steps:
            total_steps = min(total_steps, config.max_steps)
        warmup_steps = int(config.coherence.warmup_epochs * steps_per_epoch)

        class_weights = None
        if config.class_weighting == "prevalence":
            class_weights = {k: jnp.asarray(v) for k, v in
                             losses.class_weights(labeled_grades, tuple(config.tasks)).items()}
        gmm = fit_or_load_gmm(config, workdir, labeled_grades) if config.coherence.enabled else None

        if jax.process_index() == 0:
            storage.write_atomic(workdir / DATA_INFO, json.dumps(
                {"dataset": handle.name, "image_size": handle.image_size,
                 "keypoint_schema": handle.keypoint_schema,
                 "data_dir": workdir_config.absolute_data_dir(config.data_dir),
                 "preprocessing": datasets.preprocessing(handle.data_dir, handle.name)}))
        kernels = kernels_lib.for_config(config)
        loading = input_pipeline.loading_for_config(config)
        model = create_model(config, handle.keypoint_schema, kernels)
        tx = make_optimizer(config, steps_per_epoch)
        state = create_state(config, model, tx, handle.image_size, schema.num_points, mesh)
        start_step = 0
        if checkpoints.latest_step() is not None:
            state = checkpoints.restore(state)
            start_step = int(jax.device_get(state.step))
            _print(f"Resuming from {workdir}/checkpoints/latest at step {start_step}")
        log = MetricLog(workdir, start_step)

        need_keypoints = config.model.pooling == "keypoints"
        checker = input_pipeline.make_example_checker(handle.image_size, schema.num_points,
                                                      need_keypoints)
        stream = input_pipeline.MixedStream(
            input_pipeline.Pool([(handle.split("train"), labeled)]), unlabeled_pool,
            config.batch_size, batch_unlabeled, total_steps, config.seed,
            jax.process_index(), jax.process_count())
        images_per_step = stream.global_sizes[0] + stream.global_sizes[1]
        train_step = make_train_step(config, model, class_weights, gmm, warmup_steps,
                                     kernels.compiler_options)
        eval_step = eval_lib.make_eval_step(model, tuple(config.tasks), DTYPES[config.dtype],
                                            kernels.compiler_options, hflip=config.eval_hflip)

        _print(f"kpn-jax: {config.model.pooling} pooling, ResNet-{config.model.depth} "
               f"(width {config.model.width}"
               + ("" if model.stem_max_pool else ", no stem max-pool")
               + f"), {handle.name} at {handle.image_size} px, "
               f"{len(labeled)} labelled train examples"
               + (f" + {len(unlabeled_pool)} in the unlabelled pool, GMM K={gmm.num_components}"
                  if gmm is not None else "")
               + f"; {steps_per_epoch} steps/epoch, {total_steps} steps, {jax.device_count()} device(s)"
               + (f"; data read by {loading.num_workers} worker process(es)" if loading.num_workers
                  else "; data read in this process"))

        def run_validation(step: int, state) -> None:
            if validation is None or len(validation) == 0:
                return
            variables = trainer.eval_variables(state)
            predictions = eval_lib.predict_split(eval_step, variables, validation, checker, mesh,
                                                 config.eval_batch_size, loading)
            result = eval_lib.split_metrics(predictions, tuple(config.tasks), gmm)
            flat = eval_lib.flatten_metrics(result, "validation")
            flat["epoch"] = step / steps_per_epoch
            log.write(step, flat)
            summary = " ".join(f"{grades_lib.PAPER_NAMES[t]} {result[t]['accuracy']:.3f}"
                               for t in config.tasks)
            oarsi = ("" if metric != "validation/oarsi_average/accuracy" else
                     f" | OARSI avg {result['oarsi_average']['accuracy']:.3f}")
            _print(f"  validation @ step {step}: acc {summary}{oarsi}")
            value = flat.get(metric)
            if value is None or not math.isfinite(value):
                raise ValueError(f"the best-checkpoint metric {metric} is {value} at step {step} "
                                 f"(no validation example graded for it?); set config.best_metric "
                                 f"to a metric the validation split has")
            best = checkpoints.best_record()
            # Process 0 decides (best.json is its file): every process then calls the
            # collective save, or none does.
            if parallel.agree(best is None or value > best["value"]):
                checkpoints.save_best(step, state, metric, value)

        def window_record(done: int, values: list[dict], elapsed: float) -> tuple[dict, str]:
            steps = len(values)
            images_per_sec = steps * images_per_step / max(elapsed, 1e-9)
            record = {f"train/{k}": float(np.mean([v[k] for v in values])) for k in values[0]}
            record.update({"epoch": done / steps_per_epoch, "train/images_per_sec": images_per_sec,
                           "train/lr": learning_rate_at(config, steps_per_epoch, done - 1),
                           "train/gmm_on": float(done - 1 >= warmup_steps) if gmm is not None else 0.0})
            eta = (total_steps - done) * elapsed / max(1, steps)
            loss_text = " ".join(f"{k.split('/')[1]} {record[k]:.3f}" for k in
                                 ("train/loss", "train/cls", "train/gmm") if k in record)
            return record, (f"step {done}/{total_steps} | epoch {done / steps_per_epoch:.2f} | "
                            f"{images_per_sec:.1f} img/s | ETA {trainer.format_duration(eta)} | "
                            f"{loss_text}")

        def refusal_message(step: int, loss: float) -> str:
            latest = checkpoints.latest_step()
            where = (f"resume from {workdir}/checkpoints/latest (step {latest}) after the change"
                     if latest is not None else "no checkpoint was written; start again after the "
                     "change")
            why = ("a non-finite loss or gradient" if not math.isfinite(loss) else
                   f"a loss of {loss:.4g}, over {config.divergence_factor:g} times the lowest so far")
            return (f"training stopped at step {step}: {why}; the update was not applied. Lower "
                    f"config.learning_rate, use dtype float32, or check the data; {where}")

        state = trainer.fit(
            state=state, health=parallel.replicate(trainer.initial_health(), mesh),
            train_step=lambda st, batch, health, step: train_step(st, batch, health,
                                                                   jnp.asarray(step, jnp.int32)),
            batches=input_pipeline.train_iterator(stream, checker, start_step, loading),
            to_device=lambda local: parallel.global_batch(
                {k: local[k] for k in ("image", "keypoints", "grades", "labeled")}, mesh),
            start_step=start_step, total_steps=total_steps,
            checkpoints=checkpoints, log=log, log_every=config.log_every_steps,
            checkpoint_every=config.checkpoint_every_steps,
            evaluate_every=max(1, int(config.eval_every_epochs * steps_per_epoch)),
            evaluate=run_validation, window_record=window_record, refusal_message=refusal_message,
            stop_requested=stop_requested)

        which = "best" if checkpoints.best_step() is not None else "latest"
        splits = {split: handle.sources[split] for split in ("validation", "test")
                  if split in handle.sources and len(handle.sources[split])}
        state = checkpoints.restore(state, which=which)
        results = evaluate_splits(config, workdir / "report", splits, eval_step,
                                  trainer.eval_variables(state),
                                  {"which": which, "step": int(jax.device_get(state.step))},
                                  checker, mesh, gmm, log.records(), loading)
        log.close()
        checkpoints.close()
        return results


def evaluate_splits(config, report_dir: Path, splits: dict, eval_step, variables,
                    checkpoint: dict, checker, mesh, gmm, records, loading: input_pipeline.Loading,
                    other_dataset: str | None = None) -> dict:
    """Evaluates ``variables`` (from ``checkpoint``: ``{'which', 'step'}``) on each
    ``{split: source}``, writes ``report_dir`` and prints the results; returns
    ``{split: metrics}``."""
    which, step = checkpoint["which"], checkpoint["step"]
    results = {}
    for index, (split, source) in enumerate(splits.items()):
        predictions = eval_lib.predict_split(eval_step, variables, source, checker, mesh,
                                             config.eval_batch_size, loading)
        log_probs = eval_lib.coherence_log_probs(predictions, gmm)
        result = eval_lib.split_metrics(predictions, tuple(config.tasks), gmm, log_probs)
        result["majority_accuracy"] = eval_lib.majority_baseline(predictions["true"])
        result["checkpoint"] = dict(checkpoint)
        results[split] = result
        if jax.process_index() == 0:
            # The learning curves are the same for every split: drawn once.
            eval_lib.write_split_report(report_dir, split, result, records if index == 0 else None,
                                        config.method_name)
            _write_split_predictions(report_dir, split, source, predictions, config.tasks,
                                     log_probs)
        oarsi = result.get("oarsi_average", {}).get("accuracy")
        _print(f"{split}{f' of {other_dataset}' if other_dataset else ''} ({which} checkpoint, "
               f"step {step}): "
               + " ".join(f"{grades_lib.PAPER_NAMES[t]} {result[t]['accuracy']:.3f}"
                          for t in config.tasks)
               # The OARSI average only where every OARSI grade was trained and graded.
               + (f" | OARSI avg {oarsi:.3f}" if oarsi is not None and math.isfinite(oarsi)
                  else ""))
        _print(f"{split} majority-class accuracy (always the most frequent grade): "
               + " ".join(f"{grades_lib.PAPER_NAMES[t]} {result['majority_accuracy'][t]:.3f}"
                          for t in config.tasks if t in result["majority_accuracy"]))
    if jax.process_index() == 0 and results:
        _print(f"Report written to {report_dir}")
        table = report_dir / "results.md"
        if table.exists():
            _print(table.read_text())
    return results


def _write_split_predictions(report_dir: Path, split: str, source, predictions: dict, tasks,
                              log_probs) -> Path:
    """``report_dir/predictions_<split>.csv``: every knee's grades, probabilities and
    coherence ``log_probs`` (what the page of :mod:`kpn_jax.serve` browses)."""
    try:
        image_ids = input_pipeline.read_field(source, "image_id")
    except KeyError:  # a dataset without image ids: rows are named by their index
        image_ids = None
    return eval_lib.write_predictions_csv(
        report_dir / eval_lib.PREDICTIONS_CSV.format(split=split), predictions, tasks,
        image_ids, log_probs)


def evaluate_checkpoint(config, workdir: str, split: str | None = None,
                        allow_other_data: bool = False, report_dir: str | None = None) -> dict:
    """``--mode=evaluate``: the best (else latest) checkpoint of ``workdir``, or the weights
    of a model folder (:mod:`kpn_jax.model_folder`), on ``split``.

    The dataset must be the one the model was trained on (``data_info.json``) unless
    ``allow_other_data``; then the results go to ``report/<dataset>/`` and the training
    data's report is left as it is. ``report_dir`` (default ``WORKDIR/report``; for a
    model folder, which may be read-only, ``./report``) is where the report goes.

    Raises:
      workdir_config.OtherDataError: another dataset, not allowed.
      model_folder.ModelFolderError: a damaged model folder.
    """
    validate_config(config)
    workdir = storage.path(workdir)
    exported = model_folder.is_model_folder(workdir)
    if not exported and not (workdir / "checkpoints").exists():
        raise FileNotFoundError(f"no checkpoints in workdir {workdir}")
    config_path = workdir / "config.json"
    if config_path.exists():
        checkpointing.check_config_compatible(json.loads(config_path.read_text()), config)
    split = split or config.eval_split
    mesh = parallel.make_mesh()
    handle = input_pipeline.open_dataset(config)
    other_dataset = workdir_config.check_dataset(workdir, handle.name, handle.image_size,
                                                 handle.keypoint_schema, config.model.pooling,
                                                 allow_other_data)
    schema = kp_lib.get_schema(handle.keypoint_schema)
    kernels = kernels_lib.for_config(config)
    model = create_model(config, handle.keypoint_schema, kernels)
    if exported:
        variables, checkpoint = exported_variables(config, model, workdir, handle.image_size,
                                                   schema.num_points)
        report_root = storage.path(report_dir or "report")
    else:
        tx = make_optimizer(config, 1)
        state = abstract_state(config, model, tx, handle.image_size, schema.num_points, mesh)
        checkpoints = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
        which = "best" if checkpoints.best_step() is not None else "latest"
        state = checkpoints.restore(state, which=which)
        checkpoints.close()
        variables = trainer.eval_variables(state)
        checkpoint = {"which": which, "step": int(jax.device_get(state.step))}
        report_root = storage.path(report_dir) if report_dir else workdir / "report"
    checker = input_pipeline.make_example_checker(handle.image_size, schema.num_points,
                                                  config.model.pooling == "keypoints")
    gmm = gmm_lib.load(workdir / "gmm.npz") if (workdir / "gmm.npz").exists() else None
    eval_step = eval_lib.make_eval_step(model, tuple(config.tasks), DTYPES[config.dtype],
                                        kernels.compiler_options, hflip=config.eval_hflip)
    records = (trainer.read_records(workdir / "metrics.jsonl")
               if jax.process_index() == 0 and (workdir / "metrics.jsonl").exists() else None)
    results = evaluate_splits(config, report_root / (other_dataset or ""),
                              {split: handle.split(split)}, eval_step,
                              parallel.replicate(variables, mesh), checkpoint, checker, mesh, gmm,
                              records, input_pipeline.loading_for_config(config), other_dataset)
    return results[split]


def exported_variables(config, model, folder: Path, image_size: int, num_points: int):
    """``(variables, checkpoint)`` of a model folder, checked against ``model``'s shapes."""
    template = jax.eval_shape(lambda: init_variables(model, image_size, num_points, config.seed))
    variables = model_folder.read_variables(folder, template)
    manifest = model_folder.read_manifest(folder, kind="grader")
    return variables, {"which": "best", **manifest.get("checkpoint", {}),
                       "model_folder": str(folder)}


def abstract_state(config, model, tx, image_size, num_points, mesh):
    """A state template without reading ``config.init_from`` (restoring overwrites it anyway)."""
    stripped = ml_collections.ConfigDict(config.to_dict())
    stripped.init_from = ""
    return create_state(stripped, model, tx, image_size, num_points, mesh)


def held_out_log_density(gmm, handle) -> np.ndarray | None:
    """GMM log-density of the fully graded validation grade vectors, ``[M]``; ``None``
    when the dataset has no validation split or no fully graded knee in it."""
    if "validation" not in handle.sources:
        return None
    grades = grades_lib.validate(input_pipeline.read_field(handle.sources["validation"], "grades"))
    grades = grades[grades_lib.fully_graded(grades)]
    if not len(grades):
        return None
    return np.asarray(gmm_lib.log_prob(gmm, jnp.asarray(grades_lib.one_hot(grades))))


def fit_gmm_to_workdir(config, workdir: str):
    """``--mode=fit_gmm``: (re)fits the coherence GMM on the labelled training grades.

    Writes ``workdir/gmm.npz`` and prints how coherent held-out expert grades are
    under it (mean log-density of validation one-hot grades).
    """
    validate_config(config)
    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    handle, _, labeled_grades, _ = load_training_data(config, parallel.make_mesh())
    path = workdir / "gmm.npz"
    if jax.process_index() == 0 and path.exists():
        path.unlink()
    parallel.barrier("kpn_jax: old gmm.npz removed")
    fitted = fit_or_load_gmm(config, workdir, labeled_grades)
    message = (f"GMM with {fitted.num_components} components fitted on {len(labeled_grades)} "
               f"labelled grade vectors -> {path}")
    values = held_out_log_density(fitted, handle)
    if values is not None:
        message += (f"; log-density of {len(values)} validation grade vectors: mean "
                    f"{values.mean():.2f}, median {np.median(values):.2f}, lowest "
                    f"{values.min():.2f}")
    _print(message)
    return fitted
