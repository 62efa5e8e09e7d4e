"""The keypoint-based pooling network (KPN) and the global-pooling baseline.

Both are called the same way, ``model.apply(variables, images, keypoints, train=...)``,
and return ``{task: logits [B, C_task]}`` (float32; float64 for a float64 ``dtype``), plus
``'regression': {task: [B]}`` when ``aux_regression`` is set, so the training loop can
swap them.

Parameter tree: ``backbone`` (a :class:`~kpn_jax.models.resnet.ResNet` without ``fc``;
the KPN's ends at its ``feature_layer``, so the default has no ``layer4_*``),
``head_{task}`` (Dense, kernel ``[F, C_task]``; or a :class:`CumulativeLinkHead` with
``head='cumulative'``), and with ``aux_regression``
``regression_{task}`` (Dense, kernel ``[F, 1]``). For the KPN with
``aggregation='concat'`` the head input ``F = n_points * C`` is point-major: feature
``n * C + c`` is channel ``c`` sampled at the task's ``n``-th keypoint (the order of
``schema.indices_for_task(task)``), i.e. ``[B, n_points, C].reshape(B, -1)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kpn_jax import grades
from kpn_jax.keypoints import bilinear_gather, densified_schema, densify, get_schema
from kpn_jax.models.layers import torch_linear
from kpn_jax.models.resnet import ModuleDef, ResNet, feature_stride

Dtype = Any

INPUT_MODES: tuple[str, ...] = ("repeat", "single")
AGGREGATIONS: tuple[str, ...] = ("concat", "mean")
POOLINGS: tuple[str, ...] = ("keypoints", "global")
KEYPOINT_FEATURE_LAYERS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")

# torchvision's ImageNet statistics: a grayscale radiograph repeated to RGB meets
# the pretrained stem with the input distribution it was trained on.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The same statistics averaged over the channels, for a 1-channel stem.
GRAY_MEAN: float = 0.449
GRAY_STD: float = 0.226


def _real_dtype(dtype: Dtype) -> jnp.dtype:
    """``dtype`` promoted to at least float32 (bfloat16 -> float32, float64 stays)."""
    return jnp.promote_types(dtype, jnp.float32)


def normalize_images(images: jax.Array, input_mode: str = "repeat",
                     dtype: Dtype = jnp.float32) -> jax.Array:
    """Grayscale ``[B, H, W, 1]`` in [0, 1] -> normalised backbone input in ``dtype``.

    ``'repeat'``: ``[B, H, W, 3]``, each channel normalised with ImageNet's mean/std.
    ``'single'``: ``[B, H, W, 1]``, normalised with mean 0.449, std 0.226.
    """
    if images.ndim != 4 or images.shape[-1] != 1:
        raise ValueError(f"images: expected grayscale [B, H, W, 1], got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images: expected floats in [0, 1], got dtype {images.dtype}")
    images = images.astype(_real_dtype(dtype))
    if input_mode == "repeat":
        mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
        std = jnp.asarray(IMAGENET_STD, images.dtype)
        normalized = (jnp.repeat(images, 3, axis=-1) - mean) / std
    elif input_mode == "single":
        normalized = (images - GRAY_MEAN) / GRAY_STD
    else:
        raise ValueError(f"input_mode: expected one of {INPUT_MODES}, got {input_mode!r}")
    return normalized.astype(dtype)


def _validate_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in grades.NUM_CLASSES]
    if unknown or not tasks:
        raise ValueError(f"tasks: expected a non-empty subset of {grades.TASKS}, got {tasks}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: duplicate task names in {tasks}")
    return tasks


HEADS = ("softmax", "cumulative")


class CumulativeLinkHead(nn.Module):
    """An ordinal head (the cumulative link, or proportional-odds, model): one score ``s``
    per knee and increasing thresholds ``t_0 < ... < t_{C-2}`` with
    ``P(grade <= k) = sigmoid(t_k - s)``. Returns ``log P(grade = k)`` ``[B, C]``, whose
    softmax is those probabilities, so the losses, metrics and GMM use it as logits.

    Params: ``score`` (Dense ``[F, 1]``, torch's init), ``first_threshold`` ``[]`` and
    ``threshold_gaps`` ``[C-2]`` (``t_k - t_{k-1} = softplus(gap)``, so the thresholds
    stay ordered and every probability positive).
    """

    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        score = torch_linear(1, x.shape[-1], "score", self.dtype, self.param_dtype)(x)[:, 0]
        # Thresholds start one apart around zero: every grade possible at initialisation.
        first = self.param("first_threshold", nn.initializers.constant(
            -(self.num_classes - 2) / 2.0), (), self.param_dtype).astype(self.dtype)
        gaps = self.param("threshold_gaps", nn.initializers.constant(0.5413249),  # softplus^-1(1)
                          (self.num_classes - 2,), self.param_dtype).astype(self.dtype)
        steps = jax.nn.softplus(gaps)
        thresholds = first + jnp.concatenate([jnp.zeros((1,), self.dtype), jnp.cumsum(steps)])
        upper = thresholds[None, :] - score[:, None]                     # [B, C-1]
        # log(sigmoid(a) - sigmoid(b)) for a - b = step > 0, without cancellation:
        # a + log(1 - exp(-step)) - softplus(a) - softplus(b).
        middle = (upper[:, 1:] + jnp.log(-jnp.expm1(-steps))[None, :]
                  - jax.nn.softplus(upper[:, 1:]) - jax.nn.softplus(upper[:, :-1]))
        return jnp.concatenate([-jax.nn.softplus(-upper[:, :1]), middle,
                                -jax.nn.softplus(upper[:, -1:])], axis=1)


def _heads(features: dict[str, jax.Array], tasks: tuple[str, ...], aux_regression: bool,
           dtype: Dtype, param_dtype: Dtype, head: str = "softmax") -> dict[str, Any]:
    """One head per task on ``features[task] [B, F]``; logits in at least float32:
    a Dense (``head='softmax'``) or a :class:`CumulativeLinkHead` (``'cumulative'``).

    Called inside a compact ``__call__``, so the heads become submodules
    of the calling module. The heads run in float32 even for a bfloat16
    backbone: they are small, and their outputs feed softmax, cross entropy and
    the GMM log-density, where bfloat16's 8-bit mantissa would show.
    """
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
    head_dtype = _real_dtype(dtype)
    outputs: dict[str, Any] = {}
    for task in tasks:
        x = features[task].astype(head_dtype)
        if head == "cumulative":
            outputs[task] = CumulativeLinkHead(grades.NUM_CLASSES[task], head_dtype, param_dtype,
                                               name=f"head_{task}")(x)
        else:
            outputs[task] = torch_linear(grades.NUM_CLASSES[task], x.shape[-1], f"head_{task}",
                                         head_dtype, param_dtype)(x)
    if aux_regression:
        regression = {}
        for task in tasks:
            x = features[task].astype(head_dtype)
            regression[task] = torch_linear(1, x.shape[-1], f"regression_{task}", head_dtype,
                                            param_dtype)(x)[:, 0]
        outputs["regression"] = regression
    return outputs


class KPN(nn.Module):
    """Keypoint-based pooling network (Zheng et al. 2021, Sec. 2.1).

    A ResNet's ``feature_layer`` map is sampled bilinearly at the keypoints; KL and
    JSN heads read every point, each osteophyte head only its compartment's.

    Attributes:
      depth, width, dtype, param_dtype, conv, max_pool, stem_max_pool: the backbone's
        (see ``ResNet``).
      tasks: grade tasks to predict, a subset of ``grades.TASKS``.
      schema_name: keypoint schema of the ``keypoints`` argument (``kneel16``).
      densify_k: when set, each compartment's polyline is resampled to this many
        points (``kpn_jax.keypoints.densify``) before pooling.
      aggregation: ``'concat'`` (the paper: ``[n_points * C]``) or ``'mean'`` (``[C]``).
      feature_layer: ``layer3`` (the paper; stride 16, or 8 without ``stem_max_pool``), or
        ``layer1``/``layer2``/``layer4``.
        The backbone is built only up to this stage (``ResNet(last_stage=...)``).
      aux_regression: add a Dense(1) regression of each grade (Antony et al.).
      head: ``'softmax'`` (a Dense per grade: the paper) or ``'cumulative'`` (an ordinal
        :class:`CumulativeLinkHead`).
      input_mode: ``'repeat'`` (3-channel ImageNet-normalised input, for
        torchvision-pretrained weights) or ``'single'`` (1-channel stem).
    """

    depth: int = 50
    width: int = 64
    tasks: Sequence[str] = grades.TASKS
    schema_name: str = "kneel16"
    densify_k: int | None = None
    aggregation: str = "concat"
    feature_layer: str = "layer3"
    aux_regression: bool = False
    head: str = "softmax"
    input_mode: str = "repeat"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    max_pool: Callable[..., jax.Array] = nn.max_pool
    stem_max_pool: bool = True

    @nn.compact
    def __call__(self, images: jax.Array, keypoints: jax.Array,
                 train: bool = False) -> dict[str, Any]:
        """Predicts grade logits.

        Args:
          images: float ``[B, H, W, 1]`` in [0, 1], right-knee orientation.
          keypoints: ``[B, N, 2]`` ``(x, y)`` in input pixels, in the schema's order.
          train: batch-statistics BatchNorm (``mutable=['batch_stats']``).

        Returns:
          ``{task: [B, C_task] float32}`` and, with ``aux_regression``,
          ``'regression': {task: [B] float32}``.
        """
        schema = get_schema(self.schema_name)
        _check_keypoints(keypoints, images, schema)
        x = normalize_images(images, self.input_mode, self.dtype)
        # The backbone stops at the pooled stage: later stages would only cost compute
        # (and, through weight decay, shrink weights nothing reads).
        feature_maps = ResNet(self.depth, None, self.dtype, self.param_dtype, self.width,
                              last_stage=self.feature_layer, conv=self.conv,
                              max_pool=self.max_pool, stem_max_pool=self.stem_max_pool,
                              name="backbone")(x, train)
        feature_map = feature_maps[self.feature_layer]

        # Coordinates and pooled averages stay in >= float32 for a bfloat16 backbone.
        real_dtype = _real_dtype(self.dtype)
        keypoints = keypoints.astype(real_dtype)
        if self.densify_k is not None:
            keypoints = densify(keypoints, schema, self.densify_k)
            schema = densified_schema(schema, self.densify_k)
        # [B, N, C] in the backbone's dtype.
        pooled = bilinear_gather(feature_map, keypoints,
                                 feature_stride(self.feature_layer, self.stem_max_pool))

        head_inputs = {}
        for task in self.tasks:
            points = pooled[:, jnp.asarray(schema.indices_for_task(task)), :]
            if self.aggregation == "concat":
                head_inputs[task] = points.reshape(points.shape[0], -1)
            else:
                head_inputs[task] = jnp.mean(points.astype(real_dtype), axis=1)
        return _heads(head_inputs, tuple(self.tasks), self.aux_regression, self.dtype,
                      self.param_dtype, self.head)

    def __post_init__(self):
        # The attributes are checked once, when the module is built, not in every call.
        _validate_tasks(self.tasks)
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, "
                             f"got {self.aggregation!r}")
        if self.feature_layer not in KEYPOINT_FEATURE_LAYERS:
            raise ValueError(f"feature_layer: expected one of {KEYPOINT_FEATURE_LAYERS}, "
                             f"got {self.feature_layer!r}")
        if self.densify_k is not None and (not isinstance(self.densify_k, int)
                                           or self.densify_k < 2):
            raise ValueError(f"densify_k: expected None or an int >= 2, got {self.densify_k!r}")
        super().__post_init__()


def _check_keypoints(keypoints: jax.Array | None, images: jax.Array, schema) -> None:
    """``keypoints`` must be ``[B, N, 2]`` for ``schema``, with the images' ``B``."""
    shape = None if keypoints is None else keypoints.shape
    if shape is None or len(shape) != 3 or shape[1:] != (schema.num_points, 2):
        raise ValueError(f"keypoints: expected [B, {schema.num_points}, 2] for schema "
                         f"{schema.name}, got {shape}")
    if keypoints.shape[0] != images.shape[0]:
        raise ValueError(f"keypoints: batch size {keypoints.shape[0]} differs from images' "
                         f"{images.shape[0]}")


class GlobalPoolNet(nn.Module):
    """The paper's baseline: ResNet, global average pool of ``layer4``, one head per task.

    Same call signature as :class:`KPN`; ``keypoints`` is accepted and ignored.
    """

    depth: int = 50
    width: int = 64
    tasks: Sequence[str] = grades.TASKS
    aux_regression: bool = False
    head: str = "softmax"
    input_mode: str = "repeat"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    max_pool: Callable[..., jax.Array] = nn.max_pool
    stem_max_pool: bool = True

    @nn.compact
    def __call__(self, images: jax.Array, keypoints: jax.Array | None = None,
                 train: bool = False) -> dict[str, Any]:
        """``images [B, H, W, 1]`` in [0, 1] -> ``{task: [B, C_task]}`` (see :class:`KPN`)."""
        del keypoints  # The baseline sees the whole image.
        x = normalize_images(images, self.input_mode, self.dtype)
        feature_maps = ResNet(self.depth, None, self.dtype, self.param_dtype, self.width,
                              conv=self.conv, max_pool=self.max_pool,
                              stem_max_pool=self.stem_max_pool, name="backbone")(x, train)
        pooled = jnp.mean(feature_maps["layer4"].astype(_real_dtype(self.dtype)), axis=(1, 2))
        return _heads({task: pooled for task in self.tasks}, tuple(self.tasks),
                      self.aux_regression, self.dtype, self.param_dtype, self.head)

    def __post_init__(self):
        _validate_tasks(self.tasks)
        super().__post_init__()


# Arguments only the keypoint model has; create_model drops them for 'global'
# so one model config can switch pooling without editing other fields.
_KEYPOINT_ONLY_ARGS: tuple[str, ...] = ("schema_name", "densify_k", "aggregation",
                                        "feature_layer")


def create_model(pooling: str = "keypoints", **kwargs) -> nn.Module:
    """Builds :class:`KPN` (``pooling='keypoints'``) or :class:`GlobalPoolNet` (``'global'``).

    ``kwargs`` are the modules' attributes (plain Python values; dtypes may be
    given as names such as ``'bfloat16'``). For ``'global'`` the keypoint-only
    arguments (``schema_name``, ``densify_k``, ``aggregation``, ``feature_layer``)
    are ignored; any other unknown argument raises ``ValueError``.
    """
    for key in ("dtype", "param_dtype"):
        if isinstance(kwargs.get(key), str):
            try:
                kwargs[key] = jnp.dtype(kwargs[key])
            except TypeError as e:
                raise ValueError(f"{key}: unknown dtype {kwargs[key]!r}") from e
    if "tasks" in kwargs:
        kwargs["tasks"] = tuple(kwargs["tasks"])
    if pooling == "keypoints":
        cls = KPN
    elif pooling == "global":
        cls = GlobalPoolNet
        kwargs = {k: v for k, v in kwargs.items() if k not in _KEYPOINT_ONLY_ARGS}
    else:
        raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
    known = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"create_model: unknown argument(s) {unknown} for {cls.__name__}; "
                         f"known: {sorted(known)}")
    return cls(**kwargs)
