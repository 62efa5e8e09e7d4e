"""3x3 convolutions as matrix products (kpn_jax.models.conv3x3) against float64 numpy, and
the model's conv3x3 option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax import native, train
from kpn_jax.models import conv3x3
from kpn_jax.models.layers import Conv3x3
from kpn_jax.models.resnet import ResNet
from tests.test_resnet import conv2d_ref, jit_init


def weight_grad_ref(x, grad_out):
    """``dL/dw [3, 3, Ci, Co]`` of a padding-1 3x3 convolution, float64 numpy."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    grad_out = np.asarray(grad_out, np.float64)
    height, width = grad_out.shape[1:3]
    return np.stack([np.stack([np.einsum("bhwc,bhwo->co", x[:, i:i + height, j:j + width],
                                         grad_out) for j in range(3)]) for i in range(3)])


def input_grad_ref(grad_out, kernel):
    """``dL/dx``: the padding-1 convolution of the output gradient with the kernel flipped
    in space and transposed in channels, float64 numpy."""
    flipped = np.transpose(np.asarray(kernel, np.float64)[::-1, ::-1], (0, 1, 3, 2))
    return conv2d_ref(grad_out, flipped, stride=1, pad=1)


def winograd_and_grads(x, kernel, grad_out):
    out, vjp = jax.vjp(conv3x3.winograd_conv3x3, jnp.asarray(x), jnp.asarray(kernel))
    grad_x, grad_kernel = vjp(jnp.asarray(grad_out))
    return np.asarray(out), np.asarray(grad_x), np.asarray(grad_kernel)


def relative_error(a, b):
    return np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b))


# Map sizes that are and are not multiples of the 4-pixel tile, down to one pixel.
SHAPES = [(2, 8, 8, 3, 5), (1, 13, 7, 4, 6), (3, 5, 10, 2, 3), (1, 1, 1, 2, 2)]


@pytest.mark.parametrize("batch,height,width,cin,cout", SHAPES)
def test_float64_winograd_is_the_convolution(batch, height, width, cin, cout):
    """The algorithm itself: exact up to float64 rounding, output and both gradients."""
    rng = np.random.default_rng(height * width)
    x = rng.normal(size=(batch, height, width, cin))
    kernel = rng.normal(size=(3, 3, cin, cout))
    grad_out = rng.normal(size=(batch, height, width, cout))
    with jax.enable_x64(True):
        out, grad_x, grad_kernel = winograd_and_grads(x, kernel, grad_out)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, conv2d_ref(x, kernel, stride=1, pad=1), rtol=0, atol=1e-11)
    np.testing.assert_allclose(grad_x, input_grad_ref(grad_out, kernel), rtol=0, atol=1e-11)
    np.testing.assert_allclose(grad_kernel, weight_grad_ref(x, grad_out), rtol=0, atol=1e-10)


def test_float32_winograd_within_stated_tolerance():
    """float32 at a layer2-like size: within 3e-5 of the largest magnitude (module
    docstring says about 1e-5), output and gradients."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 16, 16, 32)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, 32, 16)) * 0.1).astype(np.float32)
    grad_out = rng.normal(size=(2, 16, 16, 16)).astype(np.float32)
    out, grad_x, grad_kernel = winograd_and_grads(x, kernel, grad_out)
    assert out.dtype == np.float32
    assert relative_error(out, conv2d_ref(x, kernel, stride=1, pad=1)) < 3e-5
    assert relative_error(grad_x, input_grad_ref(grad_out, kernel)) < 3e-5
    assert relative_error(grad_kernel, weight_grad_ref(x, grad_out)) < 3e-5


@pytest.mark.parametrize("height,width", [(8, 8), (9, 7), (1, 2)])
def test_stride2_input_gradient_is_the_convolutions(height, width):
    """conv3x3_stride2: forward and weight gradient are XLA's; its own input gradient
    (one product, then the taps added per input pixel) against float64 numpy, even and odd
    map sizes, in float64 (exact) and float32 (rounding only)."""
    rng = np.random.default_rng(height * 10 + width)
    x = rng.normal(size=(2, height, width, 3))
    kernel = rng.normal(size=(3, 3, 3, 4))
    out_shape = (2, -(-height // 2), -(-width // 2), 4)
    grad_out = rng.normal(size=out_shape)
    # Reference: the stride-2 convolution is linear in x, so dL/dx[p] = sum over the
    # outputs that read p; build it by brute force from the definition.
    padded_grad = np.zeros((2, height + 2, width + 2, 3))
    for i in range(out_shape[1]):
        for j in range(out_shape[2]):
            padded_grad[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3] += np.einsum(
                "bo,uvco->buvc", grad_out[:, i, j], kernel)
    expected = padded_grad[:, 1:height + 1, 1:width + 1]
    for dtype, atol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        with jax.enable_x64(dtype == np.float64):
            out, vjp = jax.vjp(conv3x3.conv3x3_stride2, jnp.asarray(x, dtype),
                               jnp.asarray(kernel, dtype))
            grad_x, grad_kernel = vjp(jnp.asarray(grad_out, dtype))
        assert out.shape == out_shape and grad_x.dtype == dtype
        scale = np.max(np.abs(expected))
        np.testing.assert_allclose(np.asarray(grad_x) / scale, expected / scale, atol=atol)
        np.testing.assert_allclose(np.asarray(out), conv2d_ref(x, kernel, stride=2, pad=1),
                                   rtol=0, atol=50 * atol)


def test_applies_only_where_it_was_measured_to_help():
    big = (2, 40, 40, 128)
    assert conv3x3.winograd_applies(big, 1, jnp.float32)
    assert not conv3x3.winograd_applies(big, 2, jnp.float32)          # strided
    assert not conv3x3.winograd_applies(big, 1, jnp.bfloat16)         # transforms lose bf16 bits
    assert not conv3x3.winograd_applies((2, 20, 20, 256), 1, jnp.float32)  # too few tiles
    assert not conv3x3.winograd_applies((2, 80, 80, 64), 1, jnp.float32)   # too few channels


def test_conv3x3_module_modes_share_parameters_and_function():
    """Both modes: nn.Conv's parameter, the same numbers, where Winograd applies (128
    channels, 32 x 32) and where it does not (stride 2 falls back to the convolution)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(1, 32, 32, 128)).astype(np.float32))
    for stride in (1, 2):
        winograd_module = Conv3x3(8, stride, "matmul")
        conv_module = Conv3x3(8, stride, "conv")
        variables = jit_init(winograd_module, x)
        assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, jit_init(conv_module, x))
        assert variables["params"]["kernel"].shape == (3, 3, 128, 8)
        out = np.asarray(winograd_module.apply(variables, x))
        expected = conv2d_ref(x, variables["params"]["kernel"], stride=stride, pad=1)
        assert out.shape == expected.shape
        assert relative_error(out, expected) < 3e-5
        np.testing.assert_allclose(np.asarray(conv_module.apply(variables, x)), expected,
                                   rtol=1e-4, atol=1e-4)


def test_resnet_conv3x3_modes_agree_and_bad_mode_is_named():
    """ResNet-50 to layer2 at 256 px: the three stride-1 3x3 convolutions of layer2 (128
    channels, 32 x 32) become Winograd (three fewer convolutions in the compiled model),
    within float32 tolerance of the convolution model, with the same parameter tree."""
    rng = np.random.default_rng(4)
    kwargs = dict(last_stage="layer2")
    images = jnp.asarray(rng.normal(size=(1, 256, 256, 3)).astype(np.float32))
    winograd_model = ResNet(50, conv3x3="matmul", **kwargs)
    conv_model = ResNet(50, conv3x3="conv", **kwargs)
    variables = jit_init(conv_model, images)
    assert (jax.tree.structure(jit_init(winograd_model, images))
            == jax.tree.structure(variables))
    num_convolutions = {
        name: jax.jit(model.apply).lower(variables, images).compile().as_text().count(
            " convolution(")
        for name, model in (("winograd", winograd_model), ("conv", conv_model))}
    assert num_convolutions["winograd"] == num_convolutions["conv"] - 3
    fast = np.asarray(jax.jit(winograd_model.apply)(variables, images)["layer2"])
    reference = np.asarray(jax.jit(conv_model.apply)(variables, images)["layer2"])
    assert relative_error(fast, reference.astype(np.float64)) < 1e-4
    with pytest.raises(ValueError, match="conv3x3"):
        jit_init(ResNet(18, conv3x3="fft"), images[:, :32, :32])


def test_config_auto_rule_and_explicit_onednn_errors():
    """'auto': oneDNN on one CPU device when it works, else 'matmul' on CPU; 'conv' on
    GPU/TPU. An explicit 'onednn' that cannot run is an error naming the reason."""
    works = lambda: (True, "")  # noqa: E731
    broken = lambda: (False, "no C++ compiler found")  # noqa: E731
    assert train.conv3x3_mode("auto", "cpu", 1, works) == "onednn"
    assert train.conv3x3_mode("auto", "cpu", 1, broken) == "matmul"
    assert train.conv3x3_mode("auto", "cpu", 2, works) == "matmul"
    assert train.conv3x3_mode("auto", "gpu", 1, works) == "conv"
    assert train.conv3x3_mode("auto", "tpu", 1, works) == "conv"
    assert train.conv3x3_mode("conv", "cpu", 1, works) == "conv"
    assert train.conv3x3_mode("matmul", "gpu", 1, works) == "matmul"
    assert train.conv3x3_mode("onednn", "cpu", 1, works) == "onednn"
    with pytest.raises(native.OneDnnUnavailable, match="no C.. compiler"):
        train.conv3x3_mode("onednn", "cpu", 1, broken)
    with pytest.raises(ValueError, match="CPU backend"):
        train.conv3x3_mode("onednn", "gpu", 1, works)
    with pytest.raises(ValueError, match="single device"):
        train.conv3x3_mode("onednn", "cpu", 2, works)
    with pytest.raises(ValueError, match="model.conv3x3"):
        train.conv3x3_mode("winnograd", "cpu")
