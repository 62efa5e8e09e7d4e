"""kpn_jax.models.resnet: torchvision layout, padding, BatchNorm, injected kernels, dtypes."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax import cpu, kernels
from kpn_jax.models.layers import BatchNorm
from kpn_jax.models.resnet import BN_EPSILON, ResNet, stage_channels

# torchvision.models.resnet{18,34,50}(num_classes=1000) parameter counts
# (sum of p.numel() over model.parameters(); BN running stats are buffers).
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032}
FC_IN = {18: 512, 34: 512, 50: 2048}
# sum(p.numel() for p in torchvision.models.resnet{depth}().layer4.parameters())
TORCHVISION_LAYER4_PARAMS = {18: 8_393_728, 34: 13_114_368, 50: 14_964_736}


def jit_init(model, *args, seed=0):
    """``model.init`` compiled as one program with an ``rbg`` key.

    Initialising op by op compiles every parameter shape's random sampler
    separately, and threefry's sampler is slow to compile on CPU; this keeps
    the tests fast without changing what is tested (shapes, distributions).
    """
    return jax.jit(model.init)(jax.random.key(seed, impl="rbg"), *args)


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def init_shapes(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape, jnp.float32))


# ---------------------------------------------------------------------------
# float64 numpy references


def conv2d_ref(x, kernel, stride, pad):
    """``x [B,H,W,Ci]``, ``kernel [kh,kw,Ci,Co]``, symmetric zero padding -> float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kernel = np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * (out_h - 1) + 1:stride,
                      j:j + stride * (out_w - 1) + 1:stride]
            out += patch @ kernel[i, j]
    return out


def maxpool_ref(x, size=3, stride=2, pad=1):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    out_h = (x.shape[1] - size) // stride + 1
    out_w = (x.shape[2] - size) // stride + 1
    out = np.full((x.shape[0], out_h, out_w, x.shape[3]), -np.inf)
    for i in range(size):
        for j in range(size):
            out = np.maximum(out, x[:, i:i + stride * (out_h - 1) + 1:stride,
                                    j:j + stride * (out_w - 1) + 1:stride])
    return out


# ---------------------------------------------------------------------------
# layout


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_parameter_count_matches_torchvision(depth):
    with_fc = init_shapes(ResNet(depth, num_classes=1000), (1, 224, 224, 3))
    assert count(with_fc["params"]) == TORCHVISION_PARAMS[depth]
    backbone = init_shapes(ResNet(depth), (1, 224, 224, 3))
    assert count(backbone["params"]) == TORCHVISION_PARAMS[depth] - FC_IN[depth] * 1000 - 1000
    assert "fc" not in backbone["params"]


@pytest.mark.parametrize("depth", [18, 50])
def test_parameter_count_up_to_layer3_is_torchvision_minus_layer4_and_fc(depth):
    variables = init_shapes(ResNet(depth, last_stage="layer3"), (1, 224, 224, 3))
    expected = (TORCHVISION_PARAMS[depth] - FC_IN[depth] * 1000 - 1000
                - TORCHVISION_LAYER4_PARAMS[depth])
    assert count(variables["params"]) == expected
    for collection in ("params", "batch_stats"):
        assert not any(name.startswith("layer4") for name in variables[collection])
        assert "layer3_0" in variables[collection]


@pytest.mark.slow
def test_last_stage_stops_the_network_and_keeps_the_names():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    full = ResNet(18, width=4)
    variables = jit_init(full, x)
    for last in ("layer1", "layer2", "layer3"):
        model = ResNet(18, width=4, last_stage=last)
        shapes = jax.eval_shape(model.init, jax.random.key(0), x)
        keep = int(last[-1])
        # The same tree as the full network's, minus the later stages.
        truncated = {c: {k: v for k, v in variables[c].items()
                         if not k.startswith("layer") or int(k[5]) <= keep}
                     for c in variables}
        assert (jax.tree.structure(shapes) == jax.tree.structure(truncated))
        out, _ = model.apply(truncated, x, train=True, mutable=["batch_stats"])
        assert set(out) == {"stem"} | {f"layer{k}" for k in range(1, keep + 1)}
        reference = full.apply(variables, x)
        np.testing.assert_array_equal(np.asarray(model.apply(truncated, x)[last]),
                                      np.asarray(reference[last]))
    with pytest.raises(ValueError, match="last_stage"):
        jit_init(ResNet(18, last_stage="layer5"), x)
    with pytest.raises(ValueError, match="num_classes"):
        jit_init(ResNet(18, num_classes=3, last_stage="layer3"), x)


def test_resnet50_parameter_names_and_shapes():
    variables = init_shapes(ResNet(50, num_classes=10), (1, 64, 64, 3))
    params, stats = variables["params"], variables["batch_stats"]
    expected_blocks = [f"layer{k}_{i}" for k, n in zip(range(1, 5), (3, 4, 6, 3)) for i in range(n)]
    assert set(params) == {"conv1", "bn1", "fc", *expected_blocks}
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert set(params["bn1"]) == {"scale", "bias"} and set(stats["bn1"]) == {"mean", "var"}
    assert params["fc"]["kernel"].shape == (2048, 10) and params["fc"]["bias"].shape == (10,)
    # Bottleneck v1.5: the 3x3 conv2 carries the stride; every stage's first block downsamples.
    block = params["layer2_0"]
    assert set(block) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv",
                          "downsample_bn"}
    assert block["conv1"]["kernel"].shape == (1, 1, 256, 128)
    assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert block["conv3"]["kernel"].shape == (1, 1, 128, 512)
    assert block["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)
    assert params["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
    assert "downsample_conv" not in params["layer2_1"]
    # No convolution has a bias.
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        if any(n.startswith("conv") or n == "downsample_conv" for n in names):
            assert names[-1] == "kernel", names


def test_resnet18_blocks_are_basic():
    params = init_shapes(ResNet(18), (1, 64, 64, 3))["params"]
    assert set(params["layer1_0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert set(params["layer3_0"]) == {"conv1", "bn1", "conv2", "bn2", "downsample_conv",
                                       "downsample_bn"}
    assert params["layer3_0"]["conv1"]["kernel"].shape == (3, 3, 128, 256)
    assert params["layer3_0"]["downsample_conv"]["kernel"].shape == (1, 1, 128, 256)


@pytest.mark.slow
@pytest.mark.parametrize("depth,channels", [(50, (64, 256, 512, 1024, 2048)),
                                            (18, (64, 64, 128, 256, 512))])
def test_output_shapes_at_320(depth, channels):
    model = ResNet(depth, num_classes=7)
    variables = init_shapes(model, (1, 320, 320, 3))
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                         jax.ShapeDtypeStruct((3, 320, 320, 3), jnp.float32))
    sizes = {"stem": 80, "layer1": 80, "layer2": 40, "layer3": 20, "layer4": 10}
    for (name, size), c in zip(sizes.items(), channels):
        assert out[name].shape == (3, size, size, c), name
    assert out["logits"].shape == (3, 7)
    assert stage_channels(depth) == dict(zip(sizes, channels))


def test_invalid_arguments_raise():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="depth"):
        jit_init(ResNet(101), x)
    with pytest.raises(ValueError, match="images"):
        jit_init(ResNet(18), jnp.zeros((32, 32, 3)))


# ---------------------------------------------------------------------------
# numerics against float64 numpy


@pytest.mark.slow
@pytest.mark.parametrize("height,width", [(12, 14), (11, 9)])
def test_stem_matches_numpy_reference(height, width):
    """Explicit torchvision padding (conv pad 3, pool pad 1 with -inf), even and odd sizes.

    On an even input flax 'SAME' pads the 7x7 stride-2 conv by (2, 3) where torch
    pads (3, 3), so even sizes tell the two apart.
    """
    model = ResNet(18, width=4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, height, width, 3)).astype(np.float32)
    variables = jit_init(model, jnp.asarray(x), seed=1)
    # Non-trivial BatchNorm so the reference checks which statistics are used.
    bn = {"scale": rng.uniform(0.5, 1.5, 4), "bias": rng.normal(size=4)}
    stats = {"mean": rng.normal(size=4), "var": rng.uniform(0.5, 2.0, 4)}
    variables["params"]["bn1"] = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), bn)
    variables["batch_stats"]["bn1"] = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), stats)

    stem = model.apply(variables, jnp.asarray(x))["stem"]

    kernel = np.asarray(variables["params"]["conv1"]["kernel"])
    y = conv2d_ref(x, kernel, stride=2, pad=3)
    y = (y - stats["mean"]) / np.sqrt(stats["var"] + BN_EPSILON) * bn["scale"] + bn["bias"]
    expected = maxpool_ref(np.maximum(y, 0.0))
    assert stem.shape == expected.shape
    np.testing.assert_allclose(np.asarray(stem), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_train_mode_updates_batch_stats_with_momentum_0_9():
    model = ResNet(18, width=4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    variables = jit_init(model, jnp.asarray(x))
    _, updated = model.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])

    conv = conv2d_ref(x, np.asarray(variables["params"]["conv1"]["kernel"]), stride=2, pad=3)
    batch_mean = conv.mean(axis=(0, 1, 2))
    # Unbiased (n - 1 = 3 * 8 * 8 - 1), as torch's running_var; flax.linen.BatchNorm
    # would store the biased one.
    batch_var = conv.var(axis=(0, 1, 2), ddof=1)
    new = updated["batch_stats"]["bn1"]
    np.testing.assert_allclose(np.asarray(new["mean"]), 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["var"]), 0.9 + 0.1 * batch_var, rtol=1e-4)
    # Every BatchNorm in the network updated its statistics.
    old_leaves = jax.tree.leaves(variables["batch_stats"])
    new_leaves = jax.tree.leaves(updated["batch_stats"])
    assert len(old_leaves) == len(new_leaves)
    assert all(not np.allclose(a, b) for a, b in zip(old_leaves, new_leaves))
    # Eval mode leaves them alone and needs no mutable collection.
    out = model.apply(variables, jnp.asarray(x), train=False)
    assert np.all(np.isfinite(np.asarray(out["layer4"])))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_is_flax_batch_norm_but_for_the_unbiased_running_variance(dtype):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(3, 5, 4, 6)), dtype)
    ours = BatchNorm(momentum=0.9, epsilon=BN_EPSILON, dtype=dtype)
    flax_bn = nn.BatchNorm(momentum=0.9, epsilon=BN_EPSILON, dtype=dtype)
    variables = jax.jit(lambda key, x: ours.init(key, x, False))(jax.random.key(0), x)
    shapes = jax.eval_shape(lambda key, x: flax_bn.init(key, x, False), jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(shapes)
    assert all(a.shape == b.shape and a.dtype == b.dtype == jnp.float32
               for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(shapes)))
    variables = {"params": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=6), jnp.float32)},
                 "batch_stats": {"mean": jnp.asarray(rng.normal(size=6), jnp.float32),
                                 "var": jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)}}

    def run(module, train):
        return jax.jit(lambda v, x: module.apply(v, x, not train, mutable=["batch_stats"]))(
            variables, x)

    for train in (False, True):
        (y, new), (y_flax, new_flax) = run(ours, train), run(flax_bn, train)
        # The forward pass (biased batch variance in training) is flax's, to the bit.
        assert y.dtype == y_flax.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_flax, np.float32))
        np.testing.assert_array_equal(new["batch_stats"]["mean"], new_flax["batch_stats"]["mean"])
    # The running variance takes the unbiased batch variance: n / (n - 1), n = B * H * W.
    n = 3 * 5 * 4
    old = np.asarray(variables["batch_stats"]["var"], np.float64)
    batch_var = np.asarray(x, np.float64).var(axis=(0, 1, 2), ddof=1)
    assert new["batch_stats"]["var"].dtype == jnp.float32
    np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 * old + 0.1 * batch_var, rtol=1e-5)
    np.testing.assert_allclose((new["batch_stats"]["var"] - 0.9 * old)
                               / (new_flax["batch_stats"]["var"] - 0.9 * old), n / (n - 1),
                               rtol=1e-5)


CPU_CONV = functools.partial(nn.Conv, conv_general_dilated=cpu.conv_general_dilated)


@pytest.mark.parametrize("conv", [nn.Conv, CPU_CONV], ids=["xla", "cpu"])
def test_conv1x1_matches_numpy(conv):
    """A strided 1x1 convolution (the CPU plug-in's slice + matrix product, or XLA's)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 9, 5)).astype(np.float32)
    module = conv(6, (1, 1), 2, padding=((0, 0), (0, 0)), use_bias=False)
    variables = jit_init(module, jnp.asarray(x))
    kernel = np.asarray(variables["params"]["kernel"])
    assert kernel.shape == (1, 1, 5, 6)
    out = module.apply(variables, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), conv2d_ref(x, kernel, stride=2, pad=0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cpu_and_xla_kernels_agree_in_outputs_and_gradients():
    """Same variables, same function, same gradients (train mode), ResNet-50 with the CPU
    plug-in's kernels (1x1 convolutions as products, the masked max-pool gradient) and
    with flax's.

    The bottleneck has every kind of 1x1 (stride 1, strided downsample); the
    BasicBlock's downsample is the same convolution, checked against numpy above.

    Run in float64: train-mode BatchNorm on tiny maps sums large terms that
    cancel, so float32 results of two summation orders differ by ~1e-4 relative,
    which would hide a real difference; in float64 they agree to ~1e-12.
    """
    with jax.enable_x64(True):
        # 36 px: odd map sizes (9 -> 5 -> 3 -> 2) exercise the ceil of strided 1x1 convs.
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 36, 36, 3)), jnp.float64)
        kwargs = dict(num_classes=3, width=8, dtype=jnp.float64, param_dtype=jnp.float64)
        cpu_kernels = kernels.choose("cpu", "cpu", onednn_availability=lambda: (False, ""))
        assert cpu_kernels.name == "cpu"
        cpu_model = ResNet(50, conv=cpu_kernels.conv, max_pool=cpu_kernels.max_pool, **kwargs)
        xla_model = ResNet(50, **kwargs)
        variables = jit_init(cpu_model, x)
        assert (jax.tree.structure(variables)
                == jax.tree.structure(jax.eval_shape(xla_model.init, jax.random.key(0), x)))

        def outputs_and_grads(variables, model):
            def loss(params):
                out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     x, train=True, mutable=["batch_stats"])
                return jnp.sum(out["logits"] ** 2) + jnp.mean(out["layer3"])
            return model.apply(variables, x), jax.grad(loss)(variables["params"])

        (outs, grads) = zip(*[jax.jit(outputs_and_grads, static_argnums=1)(variables, m)
                              for m in (cpu_model, xla_model)])
    for name in ("layer1", "layer2", "layer3", "layer4", "logits"):
        assert outs[0][name].dtype == np.float64
        np.testing.assert_allclose(np.asarray(outs[0][name]), np.asarray(outs[1][name]),
                                   rtol=1e-9, atol=1e-12, err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads[0])[0],
                            jax.tree.leaves(grads[1])):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == np.float64
        scale = float(np.max(np.abs(b)))
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * scale,
                                   err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------
# initialisation and dtypes


@pytest.mark.slow
def test_initialisation_follows_torchvision():
    params = jit_init(ResNet(18, num_classes=10), jnp.zeros((1, 32, 32, 3)))["params"]
    # kaiming_normal_(mode='fan_out', nonlinearity='relu'): std sqrt(2 / (9 * 512)), not truncated.
    kernel = np.asarray(params["layer4_1"]["conv2"]["kernel"], np.float64)
    std = np.sqrt(2.0 / (3 * 3 * 512))
    assert abs(kernel.mean()) < 0.01 * std
    assert kernel.std() == pytest.approx(std, rel=0.01)
    assert np.abs(kernel).max() > 3.5 * std  # a truncated normal would stop at 2 std
    downsample = np.asarray(params["layer4_0"]["downsample_conv"]["kernel"], np.float64)
    assert downsample.std() == pytest.approx(np.sqrt(2.0 / 512), rel=0.02)
    # BatchNorm: scale 1, bias 0 (zero_init_residual=False).
    assert np.all(np.asarray(params["layer4_1"]["bn2"]["scale"]) == 1.0)
    assert np.all(np.asarray(params["layer4_1"]["bn2"]["bias"]) == 0.0)
    # nn.Linear default: kernel and bias uniform in +-1/sqrt(fan_in).
    bound = 1.0 / np.sqrt(512)
    for leaf in (params["fc"]["kernel"], params["fc"]["bias"]):
        leaf = np.asarray(leaf)
        assert np.abs(leaf).max() <= bound
    assert np.abs(np.asarray(params["fc"]["kernel"])).max() > 0.95 * bound
    assert np.asarray(params["fc"]["kernel"]).std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters():
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 64, 64, 3)), jnp.float32)
    model16 = ResNet(18, num_classes=4, width=8, dtype=jnp.bfloat16)
    variables = jit_init(model16, x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    out16, updated = jax.jit(lambda v, x: model16.apply(v, x, train=True,
                                                        mutable=["batch_stats"]))(variables, x)
    for name in ("stem", "layer1", "layer2", "layer3", "layer4"):
        assert out16[name].dtype == jnp.bfloat16, name
    assert out16["logits"].dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updated))
    # Same function as float32, up to bfloat16 rounding (eval mode: train-mode
    # BatchNorm over a 2x2x2 batch of layer4 would amplify rounding arbitrarily).
    a = np.asarray(model16.apply(variables, x)["layer4"], np.float32).ravel()
    b = np.asarray(ResNet(18, num_classes=4, width=8).apply(variables, x)["layer4"]).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.99


def test_single_channel_stem():
    params = init_shapes(ResNet(18, width=8), (1, 32, 32, 1))["params"]
    assert params["conv1"]["kernel"].shape == (7, 7, 1, 8)
