"""torchvision ResNet weights <-> the Flax ResNet of :mod:`kpn_jax.models.resnet`.

Two lines take an ImageNet checkpoint into a KPN::

    backbone = torch_weights.load_backbone("resnet50.pth", depth=50)
    variables = torch_weights.merge_backbone(variables, backbone)

A KPN's backbone stops at its ``feature_layer`` (``layer3``: no ``layer4``);
``merge_backbone`` leaves out the stages the model does not have, and
``load_backbone(..., last_stage='layer3')`` reads only the stages up to it.

Name mapping (torch key <-> Flax collection/path):

    conv1.weight [out, in, kh, kw]      params/conv1/kernel [kh, kw, in, out]
    bn1.weight, bn1.bias                params/bn1/scale, params/bn1/bias
    bn1.running_mean, .running_var      batch_stats/bn1/mean, batch_stats/bn1/var
    bn1.num_batches_tracked             (ignored on import, written as 0 on export)
    layer3.5.conv2.weight               params/layer3_5/conv2/kernel
    layer1.0.downsample.0.weight        params/layer1_0/downsample_conv/kernel
    layer1.0.downsample.1.*             layer1_0/downsample_bn/*
    fc.weight [out, in], fc.bias        params/fc/kernel [in, out], params/fc/bias

A source is a mapping of torch tensors or numpy arrays, a ``.safetensors`` file
(read with numpy; torch is not needed), a ``.npz`` file, or a ``.pth`` / ``.pt``
file (needs torch). ``.pth`` files are pickles: they are read with
``torch.load(weights_only=True)``, which refuses any pickle that would build an
object other than tensors and plain containers, so a downloaded checkpoint
cannot run code.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from kpn_jax.models import resnet as resnet_lib

Variables = dict[str, Any]
StateDict = dict[str, np.ndarray]

INPUT_MODES: tuple[str, ...] = ("repeat", "single")
# Flax leaf name -> torch parameter / buffer suffix.
_TORCH_SUFFIX: dict[str, str] = {"kernel": "weight", "scale": "weight", "bias": "bias",
                                 "mean": "running_mean", "var": "running_var"}
_BLOCK_NAME = re.compile(r"^layer(\d)_(\d+)$")
_NESTED_STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict")
_MAX_NAMES_IN_ERROR = 12


class StateDictMismatchError(ValueError):
    """Keys of a state dict or variable tree do not fit the expected ResNet.

    Attributes:
      missing: expected keys that are absent.
      unknown: keys present that the model does not have.
      mismatched: ``(key, found_shape, expected_shape)`` for wrongly shaped entries.
    """

    def __init__(self, where: str, missing: list[str], unknown: list[str],
                 mismatched: list[tuple[str, tuple, tuple]], hint: str = ""):
        self.missing, self.unknown, self.mismatched = missing, unknown, mismatched
        parts = []
        if missing:
            parts.append(f"missing keys {_shorten(missing)}")
        if unknown:
            parts.append(f"unknown keys {_shorten(unknown)}")
        if mismatched:
            shapes = [f"{k}: got {tuple(got)}, expected {tuple(exp)}" for k, got, exp in mismatched]
            parts.append(f"mis-shaped keys [{'; '.join(_shorten(shapes, quote=False))}]")
        super().__init__(f"{where}: " + "; ".join(parts) + (f". {hint}" if hint else ""))


def _shorten(names: list[str], quote: bool = True) -> list[str] | str:
    shown = [repr(n) if quote else n for n in names[:_MAX_NAMES_IN_ERROR]]
    if len(names) > _MAX_NAMES_IN_ERROR:
        shown.append(f"... ({len(names) - _MAX_NAMES_IN_ERROR} more)")
    return "[" + ", ".join(shown) + "]" if quote else shown


# ----------------------------------------------------------------------------- names


def torch_key(path: tuple[str, ...]) -> str:
    """Flax path (e.g. ``('layer1_0', 'downsample_bn', 'mean')``) -> torch key.

    The collection is implied by the leaf name: ``kernel``, ``scale``, ``bias``
    are params, ``mean``, ``var`` are batch_stats.
    """
    *modules, leaf = path
    if leaf not in _TORCH_SUFFIX:
        raise ValueError(f"no torch name for Flax leaf {'/'.join(path)!r}")
    names = []
    for module in modules:
        block = _BLOCK_NAME.match(module)
        if block:
            names.append(f"layer{block.group(1)}.{block.group(2)}")
        elif module == "downsample_conv":
            names.append("downsample.0")
        elif module == "downsample_bn":
            names.append("downsample.1")
        else:
            names.append(module)
    return ".".join(names + [_TORCH_SUFFIX[leaf]])


def _to_flax_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """torch layout -> Flax layout of one array (conv OIHW -> HWIO, linear [out,in] -> [in,out])."""
    if leaf == "kernel":
        if array.ndim == 4:
            return np.transpose(array, (2, 3, 1, 0))
        if array.ndim == 2:
            return np.transpose(array, (1, 0))
    return array


def _to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_to_flax_layout`."""
    if leaf == "kernel":
        if array.ndim == 4:
            return np.transpose(array, (3, 2, 0, 1))
        if array.ndim == 2:
            return np.transpose(array, (1, 0))
    return array


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested mapping -> ``{path tuple: leaf}`` in insertion order."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def expected_resnet_shapes(depth: int, width: int = 64, in_channels: int = 3,
                           num_classes: int | None = None, last_stage: str = "layer4"
                           ) -> Variables:
    """``{'params', 'batch_stats'}`` of ``ShapeDtypeStruct`` of the Flax ResNet (no compute)."""
    if depth not in resnet_lib.RESNET_CONFIGS:
        raise ValueError(f"depth: expected one of {sorted(resnet_lib.RESNET_CONFIGS)}, got {depth}")
    resnet_lib.num_stages(last_stage)  # validates
    model = resnet_lib.ResNet(depth=depth, num_classes=num_classes, width=width,
                              last_stage=last_stage)
    images = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)


# ----------------------------------------------------------------------------- reading


def _tensor_to_numpy(value: Any, key: str, where: str) -> np.ndarray:
    """A torch tensor or array-like -> numpy, bfloat16 tensors widened to float32 (exact)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, without importing torch
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    try:
        return np.asarray(value)
    except Exception as error:  # noqa: BLE001 - any failure here means "not an array"
        raise ValueError(f"{where}: key {key!r} is not an array ({type(value).__name__})") from error


def _read_pth(path: str) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"{path}: reading .pth/.pt files needs torch (pip install "
                          "'kpn-jax[torch]'), or convert the file to .safetensors") from error
    try:
        # weights_only=True: the unpickler only builds tensors and plain
        # containers; a pickle that would call anything else is refused.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path}: refused: the file is not a plain tensor checkpoint "
                         f"(torch.load(weights_only=True) would not unpickle it): {error}") from error
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"{path}: cannot be read as a torch checkpoint: {error}") from error


def _read_file(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            return load_file(path)
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path}: cannot be read as .safetensors with numpy "
                             f"(bfloat16 files need torch): {error}") from error
    if lower.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot be read as .npz: {error}") from error
    if lower.endswith((".pth", ".pt", ".bin", ".ckpt")):
        return _read_pth(path)
    raise ValueError(f"weights file {path}: unknown extension; expected .pth, .pt, "
                     ".safetensors or .npz")


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> StateDict:
    """Reads a torch-style state dict as ``{key: numpy array}``.

    Args:
      source: a mapping of torch tensors / numpy arrays, or a path to a
        ``.safetensors``, ``.npz`` or ``.pth``/``.pt`` file. A checkpoint that
        wraps its weights under one of ``state_dict``, ``model``,
        ``model_state_dict`` is unwrapped.

    Raises:
      ValueError: naming the file or key when the source cannot be read, holds
        something other than arrays, or is a pickle that carries code.
    """
    where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state_dict"
    raw = _read_file(where) if isinstance(source, (str, os.PathLike)) else source
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping of names to tensors, got {type(raw).__name__}")
    nested = [k for k in _NESTED_STATE_DICT_KEYS if isinstance(raw.get(k), Mapping)]
    if nested:
        raw = raw[nested[0]]
    arrays = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}: keys must be strings, got {key!r}")
        if isinstance(value, Mapping):
            raise ValueError(f"{where}: key {key!r} holds a nested mapping, not a tensor")
        arrays[key] = _tensor_to_numpy(value, key, where)
    return arrays


# ----------------------------------------------------------------------------- torch -> flax


def resnet_from_torch(state_dict: str | os.PathLike | Mapping[str, Any], depth: int, *,
                      drop_fc: bool = False, prefix: str = "",
                      dtype: Any = np.float32, last_stage: str = "layer4") -> Variables:
    """Converts a torchvision ResNet state dict into Flax ``{'params', 'batch_stats'}``.

    Width, input channels and the number of classes are read from the shapes
    (``conv1.weight``, ``fc.weight``); ``fc`` is converted when present unless
    ``drop_fc``.

    Args:
      state_dict: see :func:`load_state_dict`.
      depth: 18, 34 or 50.
      drop_fc: ignore ``fc.*`` (e.g. the 1000-class ImageNet classifier).
      prefix: read only keys under this prefix, stripped (e.g. ``'backbone.'``
        for a :class:`TorchKPN` state dict); other keys are ignored.
      dtype: dtype of the returned arrays (batch_stats are always float32).
      last_stage: convert only up to this stage (``ResNet(last_stage=...)``); the
        keys of later stages and ``fc`` are ignored (present or not). Every key of
        the stages kept must be there.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` for ``ResNet(depth, num_classes,
      last_stage=last_stage)``, jax arrays.

    Raises:
      StateDictMismatchError: missing, unknown or mis-shaped keys, all named.
    """
    where = os.fspath(state_dict) if isinstance(state_dict, (str, os.PathLike)) else "state_dict"
    arrays = load_state_dict(state_dict)
    if prefix:
        arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    stages = resnet_lib.num_stages(last_stage)
    if stages < len(resnet_lib.STAGES):
        # A truncated ResNet has no fc (it reads layer4) and none of the later stages.
        drop_fc = True
        arrays = {k: v for k, v in arrays.items()
                  if (_torch_stage_of(k) or 0) <= stages}
    if drop_fc:
        arrays = {k: v for k, v in arrays.items() if not k.startswith("fc.")}
    if "conv1.weight" not in arrays or arrays["conv1.weight"].ndim != 4:
        raise StateDictMismatchError(where, [prefix + "conv1.weight"], [], [],
                                     "Is this a torchvision ResNet state dict?")
    width, in_channels = arrays["conv1.weight"].shape[:2]
    num_classes = None
    if "fc.weight" in arrays:
        num_classes = arrays["fc.weight"].shape[0]
    elif "fc.bias" in arrays:
        num_classes = arrays["fc.bias"].shape[0]
    expected = expected_resnet_shapes(depth, int(width), int(in_channels), num_classes,
                                      last_stage)

    converted: dict[str, dict[tuple[str, ...], Any]] = {}
    used, missing, mismatched = set(), [], []
    for collection in ("params", "batch_stats"):
        converted[collection] = {}
        leaf_dtype = dtype if collection == "params" else np.float32
        for path, spec in _flatten(expected[collection]).items():
            key = torch_key(path)
            if key not in arrays:
                missing.append(prefix + key)
                continue
            used.add(key)
            array = _to_flax_layout(path[-1], arrays[key])
            if tuple(array.shape) != tuple(spec.shape):
                torch_shape = _to_torch_layout(path[-1], np.empty(spec.shape, np.int8)).shape
                mismatched.append((prefix + key, arrays[key].shape, torch_shape))
                continue
            converted[collection][path] = jnp.asarray(array.astype(leaf_dtype))
    unknown = [prefix + k for k in arrays
               if k not in used and not k.endswith(".num_batches_tracked")]
    if missing or unknown or mismatched:
        raise StateDictMismatchError(where, missing, unknown, mismatched,
                                     f"Expected a torchvision resnet{depth}; is depth={depth} right?")
    return {c: _unflatten(flat) for c, flat in converted.items()}


# ----------------------------------------------------------------------------- flax -> torch


def _stage_of(module: str) -> int | None:
    """``'layer3_5'`` -> 3; any other module name (stem, fc) -> None."""
    block = _BLOCK_NAME.match(module)
    return int(block.group(1)) if block else None


def _torch_stage_of(key: str) -> int | None:
    """``'layer3.5.conv2.weight'`` -> 3; ``'fc.weight'``, ``'conv1.weight'`` -> None."""
    match = re.match(r"^layer(\d)\.", key)
    return int(match.group(1)) if match else None


def last_stage_of(params: Mapping[str, Any]) -> str:
    """The last stage present in a Flax ResNet's ``params`` tree, e.g. ``'layer3'``."""
    stages = [_stage_of(name) for name in params]
    stages = [k for k in stages if k is not None]
    return f"layer{max(stages)}" if stages else resnet_lib.STAGES[0]


def _check_tree(where: str, found: Mapping[tuple[str, ...], Any],
                expected: Mapping[tuple[str, ...], Any], hint: str = "") -> None:
    """Raises StateDictMismatchError naming '/'-joined paths that differ."""
    missing = ["/".join(p) for p in expected if p not in found]
    unknown = ["/".join(p) for p in found if p not in expected]
    mismatched = [("/".join(p), tuple(np.shape(found[p])), tuple(expected[p].shape))
                  for p in expected if p in found and tuple(np.shape(found[p])) != tuple(expected[p].shape)]
    if missing or unknown or mismatched:
        raise StateDictMismatchError(where, missing, unknown, mismatched, hint)


def _leaf_to_numpy(leaf: Any) -> np.ndarray:
    array = np.asarray(leaf)
    if array.dtype.name in ("bfloat16", "float16"):
        array = array.astype(np.float32)  # exact; torch/numpy consumers get plain float32
    return array


def resnet_to_torch(variables: Mapping[str, Any], depth: int, *, as_numpy: bool = False,
                    last_stage: str | None = None) -> dict[str, Any]:
    """Converts Flax ``{'params', 'batch_stats'}`` of a ResNet into a torchvision state dict.

    Args:
      variables: of ``ResNet(depth, num_classes, last_stage=...)`` (for a KPN, pass
        its ``params['backbone']`` / ``batch_stats['backbone']``).
      depth: 18, 34 or 50; the tree must be exactly that ResNet's.
      as_numpy: return numpy arrays (torch not needed; bfloat16 widened to
        float32) instead of torch tensors.
      last_stage: the ResNet's last stage; ``None``: the last one in the tree
        (a KPN's backbone ends at its ``feature_layer``).

    Returns:
      ``{torch key: tensor}`` loadable with ``torchvision.models.resnet{depth}
      (num_classes=...).load_state_dict(..., strict=True)`` (strict only when
      ``fc`` is present and all four stages are; a truncated tree loads strictly
      into a torchvision ResNet whose later stages were removed);
      ``num_batches_tracked`` is written as 0.

    Raises:
      StateDictMismatchError: the tree is not that of ResNet-``depth``.
    """
    for collection in ("params", "batch_stats"):
        if collection not in variables:
            raise ValueError(f"variables: missing collection {collection!r}")
    params_tree = variables["params"]
    params = _flatten(params_tree)
    stats = _flatten(variables["batch_stats"])
    if ("conv1", "kernel") not in params or np.ndim(params[("conv1", "kernel")]) != 4:
        raise StateDictMismatchError("variables", ["params/conv1/kernel"], [], [],
                                     "Is this a Flax ResNet variable tree?")
    _, _, in_channels, width = np.shape(params[("conv1", "kernel")])
    num_classes = np.shape(params[("fc", "bias")])[0] if ("fc", "bias") in params else None
    if last_stage is None:
        # A tree with fc is a full ResNet (a missing layer4 is then reported as missing).
        last_stage = (resnet_lib.STAGES[-1] if num_classes is not None
                      else last_stage_of(params_tree))
    if num_classes is not None and last_stage != resnet_lib.STAGES[-1]:
        raise StateDictMismatchError("variables['params']", [], ["fc/kernel", "fc/bias"], [],
                                     f"a ResNet up to {last_stage} has no fc")
    expected = expected_resnet_shapes(depth, int(width), int(in_channels), num_classes,
                                      last_stage)
    hint = (f"Expected Flax ResNet-{depth} variables up to {last_stage}; "
            f"is depth={depth} right?")
    _check_tree("variables['params']", params, _flatten(expected["params"]), hint)
    _check_tree("variables['batch_stats']", stats, _flatten(expected["batch_stats"]), hint)

    batch_norms = {path[:-1] for path in stats}
    state: dict[str, np.ndarray] = {}
    for path, leaf in params.items():
        state[torch_key(path)] = np.ascontiguousarray(_to_torch_layout(path[-1], _leaf_to_numpy(leaf)))
        module = path[:-1]
        if path[-1] == "bias" and module in batch_norms:
            # torch orders a BatchNorm's entries weight, bias, running_mean, running_var, count.
            mean_key = torch_key(module + ("mean",))
            state[mean_key] = _leaf_to_numpy(stats[module + ("mean",)])
            state[torch_key(module + ("var",))] = _leaf_to_numpy(stats[module + ("var",)])
            state[mean_key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    if as_numpy:
        return state
    import torch
    return {key: torch.from_numpy(np.array(value)) for key, value in state.items()}


def save_safetensors(variables: Mapping[str, Any], depth: int, path: str | os.PathLike) -> None:
    """Writes ResNet variables as a torchvision-keyed ``.safetensors`` file (no torch needed).

    A truncated backbone (a KPN's, up to its ``feature_layer``) writes only its stages.
    """
    from safetensors.numpy import save_file
    save_file(resnet_to_torch(variables, depth, as_numpy=True), os.fspath(path))


# ----------------------------------------------------------------------------- backbone init


def load_backbone(source: str | os.PathLike | Mapping[str, Any], depth: int,
                  input_mode: str = "repeat", last_stage: str = "layer4") -> Variables:
    """ImageNet (or any torchvision ResNet) weights as the KPN's ``backbone`` variables.

    The classifier ``fc`` is dropped, and so are the stages after ``last_stage``
    (a KPN pooling ``layer3`` has no ``layer4``; :func:`merge_backbone` also
    leaves out stages the model lacks, so the default works for it too).

    With ``input_mode='single'`` the model feeds the 1-channel radiograph
    straight into ``conv1``; the stem kernel is summed over its input channels,
    which is what a 3-channel stem computes on a grey image repeated into 3 channels (``sum_c W_c * x == W * [x, x, x]``).
    It is exact for equal per-channel normalisation; the KPN's 'single' mode
    normalises with the channel-averaged ImageNet mean/std (0.449 / 0.226)
    instead of (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225), a small shift the
    fine-tuning absorbs.

    Args:
      source: state dict or file, see :func:`load_state_dict`.
      depth: 18, 34 or 50.
      input_mode: ``'repeat'`` (3-channel stem kept) or ``'single'`` (1 channel).
      last_stage: the backbone's last stage (the KPN's ``feature_layer``).

    Returns:
      ``{'params', 'batch_stats'}`` of ``ResNet(depth, num_classes=None,
      last_stage=last_stage)``.
    """
    if input_mode not in INPUT_MODES:
        raise ValueError(f"input_mode: expected one of {INPUT_MODES}, got {input_mode!r}")
    backbone = resnet_from_torch(source, depth, drop_fc=True, last_stage=last_stage)
    kernel = backbone["params"]["conv1"]["kernel"]          # [7, 7, Cin, width]
    if input_mode == "single" and kernel.shape[2] != 1:
        backbone["params"]["conv1"]["kernel"] = jnp.sum(kernel, axis=2, keepdims=True)
    elif input_mode == "repeat" and kernel.shape[2] != 3:
        raise ValueError(f"load_backbone: input_mode='repeat' needs a 3-channel stem; conv1 of "
                         f"{source if isinstance(source, (str, os.PathLike)) else 'the state dict'} "
                         f"has {kernel.shape[2]} input channels (use input_mode='single')")
    return backbone


def merge_backbone(variables: Mapping[str, Any], backbone_variables: Mapping[str, Any]
                   ) -> Variables:
    """Returns ``variables`` with ``params/backbone`` and ``batch_stats/backbone`` replaced.

    Leaves are cast to the dtype already in ``variables`` (e.g. a bfloat16
    ``param_dtype``). Nothing is modified in place.

    Whole stages of ``backbone_variables`` after the model backbone's last stage
    are left out (a full ImageNet ResNet into a KPN whose backbone ends at
    ``layer3``); everything the model has must be matched exactly.

    Raises:
      StateDictMismatchError: the trees differ (paths or shapes), all named.
    """
    merged = dict(variables)
    if "params" in variables and "backbone" in variables["params"]:
        model_stages = [_stage_of(name) for name in variables["params"]["backbone"]]
        last = max([k for k in model_stages if k is not None], default=0)
        if last:
            backbone_variables = {
                collection: {name: tree for name, tree in value.items()
                             if (_stage_of(name) or 0) <= last}
                if isinstance(value, Mapping) else value
                for collection, value in backbone_variables.items()}
    for collection in ("params", "batch_stats"):
        if collection not in variables or "backbone" not in variables[collection]:
            raise ValueError(f"merge_backbone: variables has no {collection}/backbone")
        if collection not in backbone_variables:
            raise ValueError(f"merge_backbone: backbone_variables has no {collection!r}")
        current = _flatten(variables[collection]["backbone"])
        new = _flatten(backbone_variables[collection])
        _check_tree(f"merge_backbone: {collection}/backbone", new, current,
                    "Do depth, width and input_mode of the weights match the model config?")
        cast = {path: jnp.asarray(new[path], dtype=jnp.asarray(current[path]).dtype)
                for path in current}
        merged[collection] = {**variables[collection], "backbone": _unflatten(cast)}
    return merged


def iter_torch_keys(depth: int, num_classes: int | None = None,
                    last_stage: str = "layer4") -> Iterable[str]:
    """Every torchvision key of ResNet-``depth`` that :func:`resnet_from_torch` reads."""
    expected = expected_resnet_shapes(depth, num_classes=num_classes, last_stage=last_stage)
    for collection in ("params", "batch_stats"):
        for path in _flatten(expected[collection]):
            yield torch_key(path)
