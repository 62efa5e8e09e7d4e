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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def truncated(variables, last_stage):
    """``variables`` without the stages after ``last_stage`` (and without fc)."""
    keep = int(last_stage[-1])
    return {c: {k: v for k, v in tree.items()
                if k != "fc" and (not k.startswith("layer") or int(k[5]) <= keep)}
            for c, tree in variables.items()}


def test_last_stage_drops_later_stages_and_fc_and_still_names_missing_keys():
    _, variables = small_flax_resnet(depth=18)
    state = torch_weights.resnet_to_torch(variables, 18, as_numpy=True)
    assert "layer4.1.bn2.running_var" in state and "fc.weight" in state
    up_to_layer3 = torch_weights.resnet_from_torch(state, 18, last_stage="layer3")
    assert_trees_equal(up_to_layer3, truncated(variables, "layer3"))
    assert_trees_equal(torch_weights.load_backbone(state, 18, last_stage="layer2"),
                       truncated(variables, "layer2"))
    # The truncated tree converts back to exactly the torch keys of its stages.
    back = torch_weights.resnet_to_torch(up_to_layer3, 18, as_numpy=True)
    assert set(back) == {k for k in state if not k.startswith(("layer4.", "fc."))}
    assert set(back) == set(torch_weights.iter_torch_keys(18, last_stage="layer3")) | {
        k for k in back if k.endswith("num_batches_tracked")}
    # Keys of the stages kept must all be there and well shaped; later ones may be anything.
    broken = {k: v for k, v in state.items() if k != "layer3.1.bn1.running_mean"}
    broken["layer4.0.conv1.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(torch_weights.StateDictMismatchError,
                       match=r"missing keys \['layer3.1.bn1.running_mean'\]"):
        torch_weights.resnet_from_torch(broken, 18, last_stage="layer3")
    broken = dict(state, **{"layer3.0.conv2.weight": np.zeros((32, 32, 1, 1), np.float32)})
    with pytest.raises(torch_weights.StateDictMismatchError, match="layer3.0.conv2.weight"):
        torch_weights.load_backbone(broken, 18, last_stage="layer3")
    with pytest.raises(ValueError, match="last_stage"):
        torch_weights.resnet_from_torch(state, 18, last_stage="layer5")
    with pytest.raises(torch_weights.StateDictMismatchError, match="fc"):
        torch_weights.resnet_to_torch(variables, 18, last_stage="layer3")


def test_merge_backbone_leaves_out_stages_the_model_does_not_have():
    _, full = small_flax_resnet(depth=18, num_classes=None)
    model_variables = {c: {"backbone": jax.tree.map(jnp.zeros_like, truncated(full, "layer3")[c])}
                       for c in ("params", "batch_stats")}
    merged = torch_weights.merge_backbone(model_variables, full)
    assert_trees_equal(merged["params"]["backbone"], truncated(full, "layer3")["params"])
    assert_trees_equal(merged["batch_stats"]["backbone"], truncated(full, "layer3")["batch_stats"])
    # What the model has must still be matched: a missing block of a kept stage is named,
    with pytest.raises(torch_weights.StateDictMismatchError, match="layer3_1/conv1/kernel"):
        torch_weights.merge_backbone(model_variables, {
            c: {k: v for k, v in full[c].items() if k != "layer3_1"} for c in full})
    # and a full model does not take weights that stop early.
    full_model = {c: {"backbone": full[c]} for c in full}
    with pytest.raises(torch_weights.StateDictMismatchError, match="layer4_0"):
        torch_weights.merge_backbone(full_model, truncated(full, "layer3"))


# ----------------------------------------------------------------------------- torch files


@pytest.mark.slow
def test_torchvision_resnet50_loads_into_a_layer3_kpn_backbone():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from kpn_jax.models.kpn import KPN

    torch.manual_seed(0)
    state = torchvision.models.resnet50(weights=None).state_dict()
    images = jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32)
    points = jax.ShapeDtypeStruct((1, 16, 2), jnp.float32)
    shapes = jax.eval_shape(KPN(depth=50).init, jax.random.key(0), images, points)
    assert "layer4_0" not in shapes["params"]["backbone"]
    model_variables = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    # As train.py does it (the full ResNet, merge leaves layer4 out) and with last_stage.
    merged = torch_weights.merge_backbone(model_variables,
                                          torch_weights.load_backbone(state, 50))
    direct = torch_weights.load_backbone(state, 50, last_stage="layer3")
    assert_trees_equal(merged["params"]["backbone"], direct["params"])
    assert_trees_equal(merged["batch_stats"]["backbone"], direct["batch_stats"])
    back = torch_weights.resnet_to_torch(direct, 50)
    assert set(back) == {k for k in state if not k.startswith(("layer4.", "fc."))}
    for key, value in back.items():
        assert torch.equal(value, state[key]), key


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
