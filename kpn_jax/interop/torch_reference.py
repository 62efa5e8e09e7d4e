"""The KPN method in PyTorch, built from independent parts, to check the Flax code against.

Nothing here calls the Flax implementation's numerics. The parts are:

- the backbone: torchvision's ResNet (``torchvision.models.resnet{18,34,50}``; a
  width other than 64 is assembled with torchvision's own ``_make_layer`` and blocks);
- keypoint pooling: ``torch.nn.functional.grid_sample(align_corners=False,
  padding_mode='zeros')``;
- arc-length densification of the keypoints: a torch loop over segments;
- the coherence prior ``g(P)``: ``torch.distributions.MixtureSameFamily`` of
  ``MultivariateNormal`` (scale_tril from the precision in float64);
- the losses: ``F.cross_entropy(weight=..., ignore_index=-1)`` and
  ``F.softplus(-g, beta=tau)`` (= ``log(1 + exp(-tau g)) / tau``).

It loads the same weights (:func:`load_flax_variables`, :func:`flax_variables_from_torch`)
and the same :class:`kpn_jax.gmm.GMM`, so both frameworks run side by side
(``kpn_jax.interop.compare_torch``), and :func:`make_torch_train_step` gives the
PyTorch training step (forward, both losses, backward, Adam with weight decay,
train-mode BatchNorm) for speed comparisons.

Layouts: images are NCHW ``[B, 1, H, W]`` floats in [0, 1]; keypoints ``[B, N, 2]``
``(x, y)`` input pixels, pixel centres at integer coordinates.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from kpn_jax import grades as grades_lib
from kpn_jax.interop import torch_weights
from kpn_jax.keypoints import COMPARTMENTS, densified_schema, get_schema

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = 0.449, 0.226
FEATURE_STRIDES = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
STAGES = ("layer1", "layer2", "layer3", "layer4")
_RESNET_BLOCKS = {18: (torchvision.models.resnet.BasicBlock, (2, 2, 2, 2)),
                  34: (torchvision.models.resnet.BasicBlock, (3, 4, 6, 3)),
                  50: (torchvision.models.resnet.Bottleneck, (3, 4, 6, 3))}


# ----------------------------------------------------------------------------- backbone


def torchvision_backbone(depth: int, width: int = 64, in_channels: int = 3,
                         last_stage: str = "layer4") -> nn.Module:
    """torchvision ResNet-``depth`` without ``avgpool``/``fc``, randomly initialised.

    ``width=64, in_channels=3`` is exactly ``torchvision.models.resnet{depth}(weights=None)``;
    other widths rebuild the stages with torchvision's ``_make_layer`` (stage ``k``
    has ``width * 2**k`` planes, like the Flax ``ResNet``), initialised the way
    torchvision initialises. The stages after ``last_stage`` are deleted (no
    weights, not run), like the Flax ``ResNet(last_stage=...)``.
    """
    if depth not in _RESNET_BLOCKS:
        raise ValueError(f"depth: expected one of {sorted(_RESNET_BLOCKS)}, got {depth}")
    if last_stage not in STAGES:
        raise ValueError(f"last_stage: expected one of {STAGES}, got {last_stage!r}")
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    if width != 64 or in_channels != 3:
        block, layers = _RESNET_BLOCKS[depth]
        net.inplanes = width
        net.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        net.layer1 = net._make_layer(block, width, layers[0])
        net.layer2 = net._make_layer(block, 2 * width, layers[1], stride=2)
        net.layer3 = net._make_layer(block, 4 * width, layers[2], stride=2)
        net.layer4 = net._make_layer(block, 8 * width, layers[3], stride=2)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    del net.avgpool, net.fc
    for name in STAGES[STAGES.index(last_stage) + 1:]:
        delattr(net, name)
    return net


def backbone_stages(net: nn.Module) -> tuple[str, ...]:
    """The stages a (possibly truncated) torchvision ResNet has, in order."""
    return tuple(name for name in STAGES if hasattr(net, name))


def backbone_features(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision ResNet stages on normalised ``x [B, C, H, W]`` -> NCHW maps by name.

    Runs every stage the network has (a backbone truncated by
    :func:`torchvision_backbone` stops at its last stage).
    """
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    features = {"stem": x}
    for name in backbone_stages(net):
        x = getattr(net, name)(x)
        features[name] = x
    return features


@torch.no_grad()
def randomize_batch_norm_(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """Gives every BatchNorm random scale, bias and running statistics, in place.

    Freshly initialised BatchNorms (scale 1, bias 0, mean 0, var 1) would hide a
    transposed or swapped statistic; random ones do not.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 1.0 + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 1.0 + 0.5)


# ----------------------------------------------------------------------------- keypoints


def densify_keypoints(keypoints: torch.Tensor, schema_name: str, k: int) -> torch.Tensor:
    """Each compartment's polyline resampled to ``k`` points evenly spaced by arc length.

    ``keypoints [B, N, 2]`` -> ``[B, 4k, 2]`` (compartments FL, FM, TL, TM), end points kept.
    """
    schema = get_schema(schema_name)
    fractions = torch.linspace(0.0, 1.0, k, dtype=keypoints.dtype, device=keypoints.device)
    parts = []
    for compartment in COMPARTMENTS:
        poly = keypoints[:, list(schema.compartments[compartment]), :]             # [B, M, 2]
        seg_len = torch.linalg.vector_norm(poly[:, 1:] - poly[:, :-1], dim=-1)       # [B, M-1]
        cum = torch.cat([torch.zeros_like(seg_len[:, :1]), torch.cumsum(seg_len, dim=1)], 1)
        targets = cum[:, -1:] * fractions                                              # [B, k]
        # Segment holding each target; the last target (= total length) is clipped
        # onto the last segment, where it lands on the end point.
        seg = (torch.searchsorted(cum.contiguous(), targets.contiguous(), right=True) - 1)
        seg = seg.clamp(0, poly.shape[1] - 2)                                         # [B, k]
        start = cum.gather(1, seg)
        length = seg_len.gather(1, seg).clamp_min(torch.finfo(poly.dtype).tiny)
        frac = ((targets - start) / length).clamp(0, 1)[..., None]                    # [B, k, 1]
        p0 = poly.gather(1, seg[..., None].expand(-1, -1, 2))
        p1 = poly.gather(1, (seg + 1)[..., None].expand(-1, -1, 2))
        parts.append(p0 * (1 - frac) + p1 * frac)
    return torch.cat(parts, dim=1)


def grid_sample_keypoints(feature_map: torch.Tensor, keypoints: torch.Tensor,
                          stride: int) -> torch.Tensor:
    """Bilinear samples of ``feature_map [B, C, Hf, Wf]`` at input pixels ``keypoints [B, N, 2]``.

    The input image is taken to be ``stride * Wf`` by ``stride * Hf`` pixels; its
    pixel centre ``x`` maps to ``gx = (x + 0.5) / W_img * 2 - 1`` in
    ``grid_sample``'s ``align_corners=False`` coordinates. Returns ``[B, N, C]``.
    """
    height, width = feature_map.shape[-2:]
    scale = keypoints.new_tensor([stride * width, stride * height])
    grid = (keypoints + 0.5) / scale * 2 - 1                                      # [B, N, 2]
    # Never round the grid to a 16-bit feature dtype: in bfloat16 a normalised
    # coordinate is off by up to half a pixel at 320 px.
    dtype = torch.promote_types(feature_map.dtype, grid.dtype)
    sampled = F.grid_sample(feature_map.to(dtype), grid[:, None].to(dtype), mode="bilinear",
                            padding_mode="zeros", align_corners=False)            # [B, C, 1, N]
    return sampled[:, :, 0, :].transpose(1, 2)


# ----------------------------------------------------------------------------- model


class TorchKPN(nn.Module):
    """PyTorch twin of ``kpn_jax.models.kpn.KPN`` (``pooling='keypoints'``) and
    ``GlobalPoolNet`` (``pooling='global'``), with the same constructor fields.

    Submodules: ``backbone`` (torchvision ResNet without fc; for
    ``pooling='keypoints'`` it ends at ``feature_layer``, as the Flax KPN's does),
    ``head_{task}`` (``nn.Linear``) and, with ``aux_regression``, ``regression_{task}``.
    """

    def __init__(self, depth: int = 50, width: int = 64,
                 tasks: Sequence[str] = grades_lib.TASKS, schema_name: str = "kneel16",
                 densify_k: int | None = None, aggregation: str = "concat",
                 feature_layer: str = "layer3", aux_regression: bool = False,
                 input_mode: str = "repeat", pooling: str = "keypoints",
                 stem_max_pool: bool = True):
        super().__init__()
        if input_mode not in ("repeat", "single"):
            raise ValueError(f"input_mode: expected 'repeat' or 'single', got {input_mode!r}")
        if aggregation not in ("concat", "mean"):
            raise ValueError(f"aggregation: expected 'concat' or 'mean', got {aggregation!r}")
        if pooling not in ("keypoints", "global"):
            raise ValueError(f"pooling: expected 'keypoints' or 'global', got {pooling!r}")
        if feature_layer not in ("layer1", "layer2", "layer3", "layer4"):
            raise ValueError(f"feature_layer: expected layer1..layer4, got {feature_layer!r}")
        self.tasks = tuple(tasks)
        self.schema_name, self.densify_k = schema_name, densify_k
        self.aggregation, self.feature_layer = aggregation, feature_layer
        self.input_mode, self.pooling = input_mode, pooling
        self.aux_regression = aux_regression
        # The backbone's last stage: the pooled one (GlobalPoolNet pools layer4).
        self.last_stage = feature_layer if pooling == "keypoints" else "layer4"
        self.backbone = torchvision_backbone(depth, width, 3 if input_mode == "repeat" else 1,
                                             self.last_stage)
        self.stem_max_pool = stem_max_pool
        if not stem_max_pool:
            self.backbone.maxpool = nn.Identity()
        expansion = 4 if depth == 50 else 1
        schema = get_schema(schema_name)
        self._indices: dict[str, list[int]] = {}
        for task in self.tasks:
            if pooling == "global":
                in_features = 8 * width * expansion
            else:
                channels = width * 2 ** (int(feature_layer[-1]) - 1) * expansion
                task_schema = schema if densify_k is None else densified_schema(schema, densify_k)
                self._indices[task] = list(task_schema.indices_for_task(task))
                in_features = channels * (len(self._indices[task]) if aggregation == "concat" else 1)
            setattr(self, f"head_{task}", nn.Linear(in_features, grades_lib.NUM_CLASSES[task]))
            if aux_regression:
                setattr(self, f"regression_{task}", nn.Linear(in_features, 1))
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W]`` in [0, 1] -> the backbone's input."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images: expected grayscale [B, 1, H, W], got {tuple(images.shape)}")
        if self.input_mode == "repeat":
            mean, std = self.image_mean.to(images.dtype), self.image_std.to(images.dtype)
            return (images.expand(-1, 3, -1, -1) - mean) / std
        return (images - GRAY_MEAN) / GRAY_STD

    def forward(self, images: torch.Tensor, keypoints: torch.Tensor | None = None,
                return_features: bool = False) -> dict[str, Any]:
        """``images [B, 1, H, W]``, ``keypoints [B, N, 2]`` -> ``{task: logits [B, C]}``.

        Adds ``'regression': {task: [B]}`` with ``aux_regression``, and
        ``'features'`` (NCHW stage maps and ``'pooled' [B, N, C]``) when
        ``return_features``. Like the Flax model, the backbone runs up to
        ``feature_layer`` (``layer4`` for global pooling) and no further.
        """
        features = backbone_features(self.backbone, self.normalize(images))
        # Heads run in their weights' dtype (float32, or float64 for a .double() model),
        # like the Flax heads, which stay float32 under a bfloat16 backbone.
        head_dtype = getattr(self, f"head_{self.tasks[0]}").weight.dtype
        head_inputs = {}
        if self.pooling == "global":
            pooled = features["layer4"].to(head_dtype).mean(dim=(2, 3))
            head_inputs = {task: pooled for task in self.tasks}
        else:
            if keypoints is None or keypoints.ndim != 3 or keypoints.shape[-1] != 2:
                raise ValueError("keypoints: expected [B, N, 2], got "
                                 f"{None if keypoints is None else tuple(keypoints.shape)}")
            points = keypoints.to(torch.promote_types(keypoints.dtype, torch.float32))
            if self.densify_k is not None:
                points = densify_keypoints(points, self.schema_name, self.densify_k)
            stride = FEATURE_STRIDES[self.feature_layer] // (1 if self.stem_max_pool else 2)
            pooled = grid_sample_keypoints(features[self.feature_layer], points, stride)
            for task in self.tasks:
                selected = pooled[:, self._indices[task], :]                      # [B, n, C]
                head_inputs[task] = (selected.flatten(1) if self.aggregation == "concat"
                                     else selected.to(head_dtype).mean(dim=1))
        outputs: dict[str, Any] = {task: getattr(self, f"head_{task}")(head_inputs[task].to(head_dtype))
                                   for task in self.tasks}
        if self.aux_regression:
            outputs["regression"] = {task: getattr(self, f"regression_{task}")(
                head_inputs[task].to(head_dtype))[:, 0] for task in self.tasks}
        if return_features:
            outputs["features"] = dict(features)
            if self.pooling == "keypoints":
                outputs["features"]["pooled"] = pooled
        return outputs


def _head_names(model: TorchKPN) -> list[str]:
    names = [f"head_{t}" for t in model.tasks]
    if model.aux_regression:
        names += [f"regression_{t}" for t in model.tasks]
    return names


@torch.no_grad()
def load_flax_variables(model: TorchKPN, variables: Mapping[str, Any]) -> None:
    """Copies Flax KPN/GlobalPoolNet ``{'params', 'batch_stats'}`` into ``model`` (strict)."""
    params, stats = variables["params"], variables["batch_stats"]
    backbone_state = torch_weights.resnet_to_torch(
        {"params": params["backbone"], "batch_stats": stats["backbone"]},
        _backbone_depth(model.backbone), last_stage=model.last_stage)
    model.backbone.load_state_dict(backbone_state, strict=True)
    expected = set(_head_names(model))
    found = set(params) - {"backbone"}
    if found != expected:
        raise ValueError(f"load_flax_variables: params heads {sorted(found)} do not match the "
                         f"torch model's {sorted(expected)}")
    for name in expected:
        linear: nn.Linear = getattr(model, name)
        kernel = np.asarray(params[name]["kernel"], np.float32)                   # [in, out]
        bias = np.asarray(params[name]["bias"], np.float32)
        if kernel.shape != tuple(linear.weight.shape[::-1]):
            raise ValueError(f"load_flax_variables: {name}/kernel has shape {kernel.shape}, the "
                             f"torch head expects {tuple(linear.weight.shape[::-1])}")
        linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
        linear.bias.copy_(torch.from_numpy(bias.copy()))


def flax_variables_from_torch(model: TorchKPN) -> dict[str, Any]:
    """The torch model's weights as Flax ``{'params', 'batch_stats'}`` (jax arrays, float32)."""
    import jax.numpy as jnp
    backbone = torch_weights.resnet_from_torch(
        {k: v for k, v in model.backbone.state_dict().items()}, _backbone_depth(model.backbone),
        last_stage=model.last_stage)
    params: dict[str, Any] = {"backbone": backbone["params"]}
    for name in _head_names(model):
        linear: nn.Linear = getattr(model, name)
        params[name] = {"kernel": jnp.asarray(linear.weight.detach().cpu().float().numpy().T),
                        "bias": jnp.asarray(linear.bias.detach().cpu().float().numpy())}
    return {"params": params, "batch_stats": {"backbone": backbone["batch_stats"]}}


def _backbone_depth(net: nn.Module) -> int:
    """18, 34 or 50 from the blocks of the stages present (a truncated backbone too)."""
    block_counts = tuple(len(getattr(net, name)) for name in backbone_stages(net))
    bottleneck = isinstance(net.layer1[0], torchvision.models.resnet.Bottleneck)
    for depth, (block, layers) in _RESNET_BLOCKS.items():
        if (layers[:len(block_counts)] == block_counts
                and (block is torchvision.models.resnet.Bottleneck) == bottleneck):
            return depth
    raise ValueError(f"not a torchvision ResNet-18/34/50: blocks per stage {block_counts}")


# ----------------------------------------------------------------------------- GMM and losses


class TorchGMM(nn.Module):
    """``g(P) = log sum_k w_k N(P; mu_k, Sigma_k)`` with ``torch.distributions``.

    Built from a :class:`kpn_jax.gmm.GMM` (or its three arrays): the precision
    ``U U^T`` is formed in float64 and ``MultivariateNormal`` derives its
    ``scale_tril``; evaluation runs in float32 (the buffers' dtype).
    """

    def __init__(self, weights, means, precisions_cholesky):
        super().__init__()
        u = torch.tensor(np.array(precisions_cholesky, np.float64))
        loc = torch.tensor(np.array(means, np.float64))
        exact = MultivariateNormal(loc, precision_matrix=u @ u.transpose(-1, -2))
        self.register_buffer("weights", torch.tensor(np.array(weights, np.float32)))
        self.register_buffer("means", loc.float())
        self.register_buffer("scale_tril", exact.scale_tril.float())

    @classmethod
    def from_gmm(cls, gmm) -> "TorchGMM":
        return cls(gmm.weights, gmm.means, gmm.precisions_cholesky)

    def distribution(self) -> MixtureSameFamily:
        return MixtureSameFamily(Categorical(probs=self.weights, validate_args=False),
                                 MultivariateNormal(self.means, scale_tril=self.scale_tril,
                                                    validate_args=False), validate_args=False)

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        """``P [..., D]`` -> ``g [...]``."""
        return self.distribution().log_prob(probabilities.to(self.means.dtype))


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for bfloat16/float16 (losses are not computed in 16 bits); float64 stays."""
    return torch.promote_types(dtype, torch.float32)


def torch_weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 weight: torch.Tensor | None) -> torch.Tensor:
    """``F.cross_entropy(logits, labels, weight, ignore_index=-1)``, 0 when no label is present.

    Written as the sum of the per-example weighted losses over the sum of the
    present labels' weights (exactly the 'mean' reduction) so that an empty
    task gives 0 without a host sync and without a NaN gradient.
    """
    logits = logits.to(_at_least_float32(logits.dtype))
    if weight is not None:
        weight = weight.to(logits.dtype)
    per_example = F.cross_entropy(logits, labels, weight=weight, ignore_index=-1,
                                  reduction="none")                                # [B]
    present = labels >= 0
    example_weight = (weight[labels.clamp_min(0)] if weight is not None
                      else torch.ones_like(per_example)) * present
    return per_example.sum() / example_weight.sum().clamp_min(torch.finfo(torch.float32).tiny)


def torch_probabilities_vector(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Softmaxes of the 7 heads concatenated in ``grades.TASKS`` order: ``[B, 29]``."""
    return torch.cat([F.softmax(outputs[t].to(_at_least_float32(outputs[t].dtype)), dim=-1)
                      for t in grades_lib.TASKS], dim=-1)


def _device_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """A float32 tensor on ``device``; a tensor already there is returned as is (no copy)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return torch.as_tensor(np.asarray(value, np.float32), device=device)


def torch_total_loss(outputs: Mapping[str, Any], grades: torch.Tensor,
                     class_weights: Mapping[str, Any] | None, gmm: TorchGMM | None = None,
                     tau: float = 0.5, lambda_cls: float = 1.0, lambda_gmm: float = 1.0,
                     use_gmm: bool = True, labeled_mask: torch.Tensor | None = None,
                     tasks: Sequence[str] = grades_lib.TASKS,
                     aux_regression_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same arguments and metrics as ``kpn_jax.losses.total_loss``, in PyTorch.

    ``grades [B, 7]`` int (-1 missing); ``labeled_mask [B]`` bool.
    """
    batch = grades.shape[0]
    if labeled_mask is None:
        labeled_mask = torch.ones(batch, dtype=torch.bool, device=grades.device)
    metrics: dict[str, torch.Tensor] = {}
    cls = grades.new_zeros((), dtype=torch.float32)
    for task in tasks:
        column = grades[:, grades_lib.TASKS.index(task)].long()
        labels = torch.where(labeled_mask, column, torch.full_like(column, -1))
        weight = None
        if class_weights is not None:
            weight = _device_tensor(class_weights[task], outputs[task].device)
        task_loss = torch_weighted_cross_entropy(outputs[task], labels, weight)
        metrics[f"cls/{task}"] = task_loss
        cls = cls + task_loss
    metrics["cls"] = cls
    loss = lambda_cls * cls
    if "regression" in outputs:
        regression = cls.new_zeros(())
        for task, predicted in outputs["regression"].items():
            target = grades[:, grades_lib.TASKS.index(task)]
            present = labeled_mask & (target >= 0)
            predicted = predicted.to(_at_least_float32(predicted.dtype))
            squared = (predicted - target.to(predicted.dtype)) ** 2 * present
            regression = regression + squared.sum() / present.sum().clamp_min(1)
        metrics["regression"] = regression
        loss = loss + aux_regression_weight * regression
    if gmm is not None:
        log_prob = gmm(torch_probabilities_vector(outputs))                       # [B]
        # softplus with beta=tau is (1/tau) log(1 + exp(tau x)); at x = -g it is L_gmm.
        incoherence = F.softplus(-log_prob, beta=tau).mean()
        if use_gmm:
            loss = loss + lambda_gmm * incoherence
        metrics["gmm"] = incoherence
        metrics["gmm_on"] = torch.full_like(cls, float(bool(use_gmm)))
        metrics["log_prob"] = log_prob.mean()
    metrics["loss"] = loss
    return loss, metrics


# ----------------------------------------------------------------------------- training step


def make_torch_train_step(model: TorchKPN, gmm: TorchGMM | None,
                          class_weights: Mapping[str, Any] | None, *, learning_rate: float = 1e-4,
                          weight_decay: float = 1e-2, decoupled_weight_decay: bool = False,
                          tau: float = 0.5, lambda_cls: float = 1.0, lambda_gmm: float = 1.0,
                          aux_regression_weight: float = 1.0,
                          autocast_dtype: torch.dtype | None = None
                          ) -> Callable[..., dict[str, torch.Tensor]]:
    """One PyTorch optimisation step of the paper's training: a closure over an Adam optimiser.

    ``step(images [B,1,H,W], keypoints [B,N,2], grades [B,7], labeled_mask=None,
    use_gmm=True) -> metrics`` runs train-mode forward (BatchNorm batch
    statistics, running statistics updated), both losses, backward and the
    update. ``decoupled_weight_decay=False`` is ``torch.optim.Adam(weight_decay)``
    (L2 added to the gradient, as in the paper's PyTorch-era "Adam with weight
    decay"); ``True`` uses ``AdamW``. ``autocast_dtype`` (e.g. ``torch.bfloat16``)
    runs the forward under ``torch.autocast`` on the model's device. The
    optimiser is ``step.optimizer``. Tensors must already be on the model's device.
    """
    optimizer_cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    optimizer = optimizer_cls(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    device = next(model.parameters()).device
    device_type = device.type
    if class_weights is not None:
        # Moved to the device once, not on every step (a host copy per step would
        # stall a GPU benchmark).
        class_weights = {task: _device_tensor(w, device) for task, w in class_weights.items()}

    def step(images, keypoints, grades, labeled_mask=None, use_gmm: bool = True):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            outputs = model(images, keypoints)
        loss, metrics = torch_total_loss(outputs, grades, class_weights, gmm, tau, lambda_cls,
                                         lambda_gmm, use_gmm, labeled_mask, model.tasks,
                                         aux_regression_weight)
        loss.backward()
        optimizer.step()
        return {k: v.detach() for k, v in metrics.items()}

    step.optimizer = optimizer
    return step


# ----------------------------------------------------------------------------- side by side


def _flax_side(flax_model, variables, gmm, images, keypoints, grades, labeled_mask,
               class_weights, train: bool, loss_kwargs: Mapping[str, Any]):
    """Flax forward + losses + gradient w.r.t. every parameter, jitted; numpy results."""
    import jax
    import jax.numpy as jnp

    from kpn_jax import keypoints as keypoints_lib
    from kpn_jax import losses
    from kpn_jax.models.resnet import ResNet, feature_stride

    def is_backbone(module, method_name):
        return isinstance(module, ResNet) and method_name == "__call__"

    def loss_fn(params, batch_stats):
        mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
        outputs, state = flax_model.apply({"params": params, "batch_stats": batch_stats},
                                          images, keypoints, train=train, mutable=mutable,
                                          capture_intermediates=is_backbone)
        loss, metrics = losses.total_loss(outputs, grades, class_weights, gmm,
                                          labeled_mask=labeled_mask, tasks=flax_model.tasks,
                                          **loss_kwargs)
        features = dict(state["intermediates"]["backbone"]["__call__"][0])
        new_stats = state.get("batch_stats", batch_stats)
        return loss, (outputs, metrics, features, new_stats)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (_, (outputs, metrics, features, new_stats)), grads = grad_fn(variables["params"],
                                                                  variables["batch_stats"])
    if getattr(flax_model, "feature_layer", None) is not None and hasattr(flax_model, "densify_k"):
        points = jnp.asarray(keypoints, jnp.float32)
        if flax_model.densify_k is not None:
            points = keypoints_lib.densify(points, keypoints_lib.get_schema(flax_model.schema_name),
                                           flax_model.densify_k)
        layer = flax_model.feature_layer
        features["pooled"] = keypoints_lib.bilinear_gather(
            features[layer], points, feature_stride(layer, flax_model.stem_max_pool))
    return jax.tree.map(lambda x: np.asarray(x, np.float32),
                        (outputs, metrics, features, new_stats, grads))


def _as_batch(images, keypoints, grades, labeled_mask):
    images = np.asarray(images, np.float32)
    keypoints = np.asarray(keypoints, np.float32)
    grades = np.asarray(grades, np.int32)
    mask = np.ones(len(grades), bool) if labeled_mask is None else np.asarray(labeled_mask, bool)
    return images, keypoints, grades, mask


def _running_stats(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """All BatchNorms' running means / vars concatenated in sorted torch-key order."""
    out = {}
    for stat in ("mean", "var"):
        keys = sorted(k for k in state if k.endswith(f"running_{stat}"))
        out[f"batch_stats/{stat}"] = np.concatenate(
            [np.asarray(state[k], np.float64).ravel() for k in keys])
    return out


def flax_outputs(flax_model, variables: Mapping[str, Any], gmm, images, keypoints, grades,
                 labeled_mask=None, class_weights=None, train: bool = False, tau: float = 0.5,
                 lambda_cls: float = 1.0, lambda_gmm: float = 1.0,
                 aux_regression_weight: float = 1.0) -> dict[str, np.ndarray]:
    """Every output of the Flax model on one batch, named as in :func:`side_by_side`."""
    loss_kwargs = dict(tau=tau, lambda_cls=lambda_cls, lambda_gmm=lambda_gmm, use_gmm=True,
                       aux_regression_weight=aux_regression_weight)
    images, keypoints, grades, mask = _as_batch(images, keypoints, grades, labeled_mask)
    out, metrics, features, new_stats, grads = _flax_side(
        flax_model, variables, gmm, images, keypoints, grades, mask, class_weights, train,
        loss_kwargs)
    result = {f"features/{name}": value for name, value in features.items()}
    for task in flax_model.tasks:
        result[f"logits/{task}"] = out[task]
    for task, value in out.get("regression", {}).items():
        result[f"regression/{task}"] = value
    for key in [k for k in metrics if k.startswith("cls/")] + ["cls", "regression", "gmm"]:
        if key in metrics:
            result[f"loss/{key}"] = metrics[key]
    result["loss/total"] = metrics["loss"]
    if "log_prob" in metrics:
        result["log_prob"] = metrics["log_prob"]
    for name in sorted(grads):
        if name != "backbone":
            result[f"grad/{name}/kernel"] = grads[name]["kernel"]
            result[f"grad/{name}/bias"] = grads[name]["bias"]
    if train:
        backbone = {"params": variables["params"]["backbone"], "batch_stats": new_stats["backbone"]}
        depth = int(flax_model.depth)
        result.update(_running_stats(torch_weights.resnet_to_torch(backbone, depth, as_numpy=True)))
    return result


def torch_outputs(torch_model: TorchKPN, gmm, images, keypoints, grades, labeled_mask=None,
                  class_weights=None, train: bool = False, tau: float = 0.5,
                  lambda_cls: float = 1.0, lambda_gmm: float = 1.0,
                  aux_regression_weight: float = 1.0,
                  autocast_dtype: torch.dtype | None = None) -> dict[str, np.ndarray]:
    """Every output of the torch model on one batch (NHWC maps), float64 numpy.

    Runs in the model's dtype (``.double()`` gives a float64 reference), the
    forward under ``torch.autocast(autocast_dtype)`` when given (e.g.
    ``torch.bfloat16``; losses stay float32). The model is not modified (train
    mode runs on a copy).
    """
    import copy

    loss_kwargs = dict(tau=tau, lambda_cls=lambda_cls, lambda_gmm=lambda_gmm, use_gmm=True,
                       aux_regression_weight=aux_regression_weight)
    images, keypoints, grades, mask = _as_batch(images, keypoints, grades, labeled_mask)
    model = copy.deepcopy(torch_model) if train else torch_model
    model.train(train)
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype  # float32, or float64 for a float64 reference
    t_images = torch.from_numpy(images).permute(0, 3, 1, 2).to(device, dtype)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        out = model(t_images, torch.from_numpy(keypoints).to(device, dtype), return_features=True)
    t_gmm = None if gmm is None else TorchGMM.from_gmm(gmm).to(device, dtype)
    _, metrics = torch_total_loss(
        out, torch.from_numpy(grades).to(device), class_weights, t_gmm,
        labeled_mask=torch.from_numpy(mask).to(device), tasks=model.tasks, **loss_kwargs)
    metrics["loss"].backward()

    def cpu(t):
        return t.detach().cpu().to(torch.float64).numpy()

    result = {}
    for name, value in out["features"].items():
        value = cpu(value)
        result[f"features/{name}"] = value.transpose(0, 2, 3, 1) if value.ndim == 4 else value
    for task in model.tasks:
        result[f"logits/{task}"] = cpu(out[task])
    for task, value in out.get("regression", {}).items():
        result[f"regression/{task}"] = cpu(value)
    for key in [k for k in metrics if k.startswith("cls/")] + ["cls", "regression", "gmm"]:
        if key in metrics:
            result[f"loss/{key}"] = cpu(metrics[key])
    result["loss/total"] = cpu(metrics["loss"])
    if "log_prob" in metrics:
        result["log_prob"] = cpu(metrics["log_prob"])
    for name in sorted(_head_names(model)):
        linear: nn.Linear = getattr(model, name)
        result[f"grad/{name}/kernel"] = cpu(linear.weight.grad).T
        result[f"grad/{name}/bias"] = cpu(linear.bias.grad)
    if train:
        result.update(_running_stats({k: cpu(v) for k, v in model.backbone.state_dict().items()
                                      if "running" in k}))
    return result


def side_by_side(flax_model, variables: Mapping[str, Any], torch_model: TorchKPN, gmm,
                 images: np.ndarray, keypoints: np.ndarray, grades: np.ndarray,
                 labeled_mask: np.ndarray | None = None,
                 class_weights: Mapping[str, np.ndarray] | None = None, train: bool = False,
                 **loss_kwargs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Runs the Flax model and its torch twin on one batch; pairs up every output.

    Both must hold the same weights (see :func:`load_flax_variables` /
    :func:`flax_variables_from_torch`); ``torch_model`` is not modified.
    ``flax_model`` may compute in bfloat16, ``torch_model`` may be float64.

    Args:
      images: float ``[B, H, W, 1]`` in [0, 1] (NHWC; transposed for torch).
      keypoints: ``[B, N, 2]``; grades ``[B, 7]`` (-1 missing); labeled_mask ``[B]``.
      gmm: a :class:`kpn_jax.gmm.GMM` (``None``: no incoherence term).
      train: batch-statistics BatchNorm; adds the updated running statistics.
      loss_kwargs: ``tau``, ``lambda_cls``, ``lambda_gmm``, ``aux_regression_weight``.

    Returns:
      name -> ``(flax value, torch value)`` numpy, same layout (NHWC maps):
      ``features/{stem,layer1..<last stage>,pooled}``, ``logits/{task}``, ``regression/{task}``,
      ``loss/{cls/<task>,cls,regression,gmm,total}``, ``log_prob``,
      ``grad/{head}/{kernel,bias}`` (of the total loss), and in train mode
      ``batch_stats/{mean,var}`` (every BatchNorm's new running statistics).
    """
    args = (gmm, images, keypoints, grades, labeled_mask, class_weights, train)
    flax_values = flax_outputs(flax_model, variables, *args, **loss_kwargs)
    torch_values = torch_outputs(torch_model, *args, **loss_kwargs)
    missing = sorted(set(flax_values) ^ set(torch_values))
    if missing:
        raise ValueError(f"side_by_side: outputs only one side has: {missing}")
    return {name: (flax_values[name], torch_values[name]) for name in torch_values}


def max_differences(flax_value: np.ndarray, torch_value: np.ndarray) -> tuple[float, float]:
    """``(max |a - b|, max |a - b| / max |b|)`` with ``b`` the torch reference."""
    a = np.asarray(flax_value, np.float64)
    b = np.asarray(torch_value, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: flax {a.shape}, torch {b.shape}")
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return max_abs, (max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")))


@torch.no_grad()
def calibrate_batch_norm_(model: nn.Module, *inputs: torch.Tensor) -> None:
    """Sets every BatchNorm's running statistics to those of one batch, in place.

    Random weights with random running statistics let activations grow through
    the 16 blocks of a ResNet-50 (logits in the hundreds), where a softmax
    turns float32 rounding of the logits into large relative errors. After
    this, eval mode sees normalised activations as a trained network does;
    the statistics are still arbitrary (data-dependent), not 0 and 1.
    Momentum and train/eval mode are restored.
    """
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in batch_norms]
    was_training = model.training
    for m in batch_norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    model.train()
    model(*inputs)
    for m, momentum in saved:
        m.momentum = momentum
        m.num_batches_tracked.zero_()
    model.train(was_training)
