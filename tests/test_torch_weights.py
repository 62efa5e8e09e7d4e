"""torchvision <-> Flax ResNet weight conversion (kpn_jax.interop.torch_weights).

Relative difference everywhere: max|flax - torch| / max|torch|.
Tests needing torch skip without it; CI installs the ``torch`` extra.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax.interop import torch_weights
from kpn_jax.models.resnet import ResNet

REL_TOL = 1e-4


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def small_flax_resnet(depth=18, width=8, num_classes=5, in_channels=3, seed=0):
    """A narrow ResNet and random variables for it, BN statistics included (no torch needed).

    Filled from the shapes with numpy: ``model.init`` of a ResNet-50 compiles one
    initialiser per shape, which takes half a minute on a CPU.
    """
    model = ResNet(depth=depth, num_classes=num_classes, width=width)
    shapes = torch_weights.expected_resnet_shapes(depth, width, in_channels, num_classes)
    rng = np.random.default_rng(seed)

    def random_leaf(path, spec):
        if path[-1].key == "var":  # must stay positive
            return jnp.asarray(rng.uniform(0.5, 1.5, spec.shape), jnp.float32)
        if path[-1].key == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, spec.shape), jnp.float32)
        fan_in = int(np.prod(spec.shape[:-1])) if path[-1].key == "kernel" else 100
        return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), spec.shape), jnp.float32)

    return model, jax.tree_util.tree_map_with_path(random_leaf, shapes)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- names (no torch)


@pytest.mark.parametrize("path, key", [
    (("conv1", "kernel"), "conv1.weight"),
    (("bn1", "scale"), "bn1.weight"),
    (("bn1", "mean"), "bn1.running_mean"),
    (("layer3_5", "bn2", "var"), "layer3.5.bn2.running_var"),
    (("layer3_5", "conv2", "kernel"), "layer3.5.conv2.weight"),
    (("layer1_0", "downsample_conv", "kernel"), "layer1.0.downsample.0.weight"),
    (("layer1_0", "downsample_bn", "bias"), "layer1.0.downsample.1.bias"),
    (("fc", "kernel"), "fc.weight"),
])
def test_torch_key_names(path, key):
    assert torch_weights.torch_key(path) == key


def test_resnet50_key_count_matches_torchvision_layout():
    # 53 convolutions + 53 BatchNorms x 4 + fc weight and bias; torchvision's state
    # dict has these 267 plus 53 num_batches_tracked counters (320 keys).
    keys = list(torch_weights.iter_torch_keys(50, num_classes=1000))
    assert len(keys) == len(set(keys)) == 267
    assert "layer4.2.bn3.running_var" in keys and "layer4.0.downsample.1.weight" in keys


def test_numpy_round_trip_is_exact_and_keeps_counters():
    _, variables = small_flax_resnet(depth=50)
    state = torch_weights.resnet_to_torch(variables, 50, as_numpy=True)
    assert state["conv1.weight"].shape == (8, 3, 7, 7)
    assert state["fc.weight"].shape == (5, 32 * 8)
    assert state["layer2.0.downsample.1.num_batches_tracked"] == 0
    back = torch_weights.resnet_from_torch(state, 50)
    assert_trees_equal(back, variables)


def test_safetensors_file_round_trip(tmp_path):
    _, variables = small_flax_resnet(depth=18)
    path = tmp_path / "resnet18.safetensors"
    torch_weights.save_safetensors(variables, 18, path)
    assert_trees_equal(torch_weights.resnet_from_torch(path, 18), variables)


def test_unknown_missing_and_misshaped_keys_are_named():
    _, variables = small_flax_resnet(depth=18)
    state = torch_weights.resnet_to_torch(variables, 18, as_numpy=True)
    state["layer9.0.conv1.weight"] = np.zeros((1,), np.float32)
    del state["layer2.1.bn2.running_var"]
    state["layer3.0.conv2.weight"] = np.zeros((32, 32, 3, 1), np.float32)
    with pytest.raises(torch_weights.StateDictMismatchError) as info:
        torch_weights.resnet_from_torch(state, 18)
    message = str(info.value)
    assert "layer9.0.conv1.weight" in message
    assert "layer2.1.bn2.running_var" in message
    assert "layer3.0.conv2.weight" in message and "(32, 32, 3, 1)" in message
    assert info.value.missing == ["layer2.1.bn2.running_var"]


def test_wrong_depth_is_reported():
    _, variables = small_flax_resnet(depth=18)
    state = torch_weights.resnet_to_torch(variables, 18, as_numpy=True)
    with pytest.raises(torch_weights.StateDictMismatchError, match="depth=34"):
        torch_weights.resnet_from_torch(state, 34)
    with pytest.raises(torch_weights.StateDictMismatchError, match="depth=50"):
        torch_weights.resnet_to_torch(variables, 50)


def test_unreadable_file_names_the_file(tmp_path):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="weights.safetensors"):
        torch_weights.resnet_from_torch(bad, 18)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        torch_weights.load_state_dict(tmp_path / "nothere.pth")


def test_load_backbone_single_sums_stem_and_drops_fc():
    _, variables = small_flax_resnet(depth=18)
    state = torch_weights.resnet_to_torch(variables, 18, as_numpy=True)
    repeat = torch_weights.load_backbone(state, 18, input_mode="repeat")
    single = torch_weights.load_backbone(state, 18, input_mode="single")
    assert "fc" not in repeat["params"] and "fc" not in single["params"]
    np.testing.assert_allclose(single["params"]["conv1"]["kernel"],
                               variables["params"]["conv1"]["kernel"].sum(2, keepdims=True),
                               rtol=1e-6, atol=1e-7)
    # The summed stem on a grey image == the 3-channel stem on the image repeated.
    backbone = ResNet(depth=18, width=8)
    grey = jax.random.uniform(jax.random.key(3), (2, 32, 32, 1))
    out_repeat = backbone.apply(repeat, jnp.repeat(grey, 3, axis=-1))["layer3"]
    out_single = backbone.apply(single, grey)["layer3"]
    assert float(jnp.abs(out_repeat).max()) > 0
    assert rel_diff(out_single, out_repeat) < REL_TOL
    with pytest.raises(ValueError, match="input_mode"):
        torch_weights.load_backbone(state, 18, input_mode="rgb")


def test_merge_backbone_replaces_only_the_backbone_and_checks_shapes():
    _, variables = small_flax_resnet(depth=18, num_classes=None)
    head = {"kernel": jnp.ones((4, 5), jnp.bfloat16), "bias": jnp.zeros((5,), jnp.bfloat16)}
    bf16_backbone = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.bfloat16), variables["params"])
    model_variables = {"params": {"backbone": bf16_backbone, "head_kl": head},
                       "batch_stats": {"backbone": jax.tree.map(jnp.zeros_like,
                                                                variables["batch_stats"])}}
    merged = torch_weights.merge_backbone(model_variables, variables)
    assert merged["params"]["head_kl"] is head
    assert merged["params"]["backbone"]["conv1"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(merged["params"]["backbone"]["layer2_0"]["conv1"]["kernel"], np.float32),
        np.asarray(variables["params"]["layer2_0"]["conv1"]["kernel"].astype(jnp.bfloat16),
                   np.float32))
    assert_trees_equal(merged["batch_stats"]["backbone"], variables["batch_stats"])
    # The input was not modified.
    assert float(jnp.abs(model_variables["params"]["backbone"]["conv1"]["kernel"]).max()) == 0.0

    _, wider = small_flax_resnet(depth=18, width=16, num_classes=None)
    with pytest.raises(torch_weights.StateDictMismatchError, match="conv1/kernel"):
        torch_weights.merge_backbone(model_variables, wider)


# ----------------------------------------------------------------------------- torch files


def test_pth_file_round_trip_and_nested_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    _, variables = small_flax_resnet(depth=34)
    state = torch_weights.resnet_to_torch(variables, 34)
    assert isinstance(state["conv1.weight"], torch.Tensor)
    path = tmp_path / "resnet34.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    assert_trees_equal(torch_weights.resnet_from_torch(path, 34), variables)


class _CodeCarrier:
    """Unpickling this object calls ``Path.touch(sentinel)``: a stand-in for arbitrary code."""

    def __init__(self, sentinel: pathlib.Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (pathlib.Path.touch, (self.sentinel,))


def test_pickle_carrying_code_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    sentinel = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "payload": _CodeCarrier(sentinel)}, path)
    with pytest.raises(ValueError, match="refused"):
        torch_weights.resnet_from_torch(path, 18)
    assert not sentinel.exists()
    # The file really carries code: an unrestricted load runs it.
    torch.load(path, weights_only=False)
    assert sentinel.exists()


def test_prefix_reads_only_the_backbone_of_a_larger_state_dict():
    _, variables = small_flax_resnet(depth=18, num_classes=None)
    state = {f"backbone.{k}": v
             for k, v in torch_weights.resnet_to_torch(variables, 18, as_numpy=True).items()}
    state["head_kl.weight"] = np.zeros((5, 10), np.float32)
    assert_trees_equal(torch_weights.resnet_from_torch(state, 18, prefix="backbone."), variables)
    with pytest.raises(torch_weights.StateDictMismatchError, match="conv1.weight"):
        torch_weights.resnet_from_torch(state, 18)  # without the prefix nothing fits
