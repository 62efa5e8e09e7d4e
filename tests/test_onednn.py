"""oneDNN convolutions (kpn_jax.cpu.onednn) against float64 numpy, and the model with them.

Where the ``cpu`` extra is installed on Linux x86-64 the library must build (CI installs
it and has a C++ compiler): these tests fail rather than skip if it does not. Without the
extra, or elsewhere, they skip.
"""

import functools
import os
import importlib.metadata
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax import cpu, kernels
from kpn_jax.cpu import onednn as native
from kpn_jax.models.resnet import ResNet
from tests.test_resnet import conv2d_ref, jit_init

SUPPORTED = sys.platform == "linux" and platform.machine() == "x86_64"


def _extra_installed() -> bool:
    try:
        importlib.metadata.distribution("onednn-cpu-gomp")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


EXTRA_INSTALLED = _extra_installed()
ONEDNN_CONV = functools.partial(nn.Conv, conv_general_dilated=cpu.onednn_conv_general_dilated)


@pytest.fixture(scope="module", autouse=True)
def onednn():
    ok, why_not = native.availability()
    if not ok and not (SUPPORTED and EXTRA_INSTALLED):
        pytest.skip(f"oneDNN convolutions unavailable ({sys.platform}/{platform.machine()}, "
                    f"the cpu extra not installed?): {why_not}")
    assert ok, why_not


def grads_ref(x, kernel, grad_out, stride, pad):
    """``(dL/dx, dL/dkernel)`` of ``sum(conv(x, kernel) * grad_out)``, float64 numpy: every
    output pixel's gradient sent back through every kernel tap."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    grad_out = np.asarray(grad_out, np.float64)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    grad_padded = np.zeros_like(padded)
    grad_kernel = np.zeros_like(kernel)
    out_h, out_w = grad_out.shape[1:3]
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            rows = slice(i, i + stride * (out_h - 1) + 1, stride)
            cols = slice(j, j + stride * (out_w - 1) + 1, stride)
            grad_kernel[i, j] = np.einsum("bhwc,bhwo->co", padded[:, rows, cols], grad_out)
            grad_padded[:, rows, cols] += grad_out @ kernel[i, j].T
    return grad_padded[:, pad:pad + x.shape[1], pad:pad + x.shape[2]], grad_kernel


def relative_error(a, b):
    return np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("batch,size,in_ch,out_ch,kernel_size,stride,pad", [
    (2, 9, 5, 7, 3, 1, 1),      # odd map, stride 1
    (1, 10, 16, 8, 3, 2, 1),    # even map, stride 2 (nothing read past the last pixel)
    (2, 11, 4, 6, 3, 2, 1),     # odd map, stride 2
    (2, 1, 3, 4, 3, 1, 1),      # 1x1 map: only the centre tap sees data
    (1, 21, 3, 8, 7, 2, 3),     # the ResNet stem
])
def test_convolution_and_both_gradients_match_float64(batch, size, in_ch, out_ch, kernel_size,
                                                      stride, pad):
    rng = np.random.default_rng(size * 10 + stride)
    x = rng.standard_normal((batch, size, size, in_ch)).astype(np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, in_ch, out_ch)).astype(np.float32)
    want = conv2d_ref(x, kernel, stride, pad)
    grad_out = rng.standard_normal(want.shape).astype(np.float32)
    out, vjp = jax.vjp(lambda a, k: native.convolution(a, k, stride, pad), jnp.asarray(x),
                       jnp.asarray(kernel))
    grad_x, grad_kernel = vjp(jnp.asarray(grad_out))
    want_grad_x, want_grad_kernel = grads_ref(x, kernel, grad_out, stride, pad)
    assert out.shape == want.shape and out.dtype == jnp.float32
    assert relative_error(out, want) < 2e-6
    assert relative_error(grad_x, want_grad_x) < 2e-6
    assert relative_error(grad_kernel, want_grad_kernel) < 2e-6


def test_inside_jit_with_several_shapes_and_unused_input_gradient():
    """Compiled, two shapes in one program (two cached primitives), and a gradient with
    respect to the kernel only (XLA drops the unused input-gradient call)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 12, 12, 8)), jnp.float32)
    k1 = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32)
    k2 = jnp.asarray(rng.standard_normal((3, 3, 8, 4)), jnp.float32)

    def loss(k1, k2):
        y = jax.nn.relu(native.convolution(x, k1, 1, 1))
        return jnp.sum(native.convolution(y, k2, 2, 1) ** 2)

    def loss_xla(k1, k2):
        conv = lambda a, k, s: jax.lax.conv_general_dilated(  # noqa: E731
            a, k, (s, s), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(conv(jax.nn.relu(conv(x, k1, 1)), k2, 2) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, (g1, g2) = compiled(k1, k2)
    value_ref, (g1_ref, g2_ref) = jax.value_and_grad(loss_xla, argnums=(0, 1))(k1, k2)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    np.testing.assert_allclose(g1, g1_ref, rtol=1e-4, atol=1e-4 * np.abs(g1_ref).max())
    np.testing.assert_allclose(g2, g2_ref, rtol=1e-4, atol=1e-4 * np.abs(g2_ref).max())
    hlo = compiled.lower(k1, k2).compile().as_text()
    assert hlo.count("kpn_onednn_conv_backward_data") == 1  # only y's input gradient


def test_oneDNN_picks_optimised_kernels_not_reference_ones():
    for kind in ("forward", "backward_data", "backward_weights"):
        name = native.implementation(kind, (8, 80, 80, 64), (3, 3, 64, 64), 1, 1)
        assert name and "ref" not in name, (kind, name)


def test_bad_inputs_are_named():
    x = jnp.zeros((1, 8, 8, 4), jnp.float32)
    with pytest.raises(ValueError, match="float32"):
        native.convolution(x.astype(jnp.bfloat16), jnp.zeros((3, 3, 4, 4), jnp.bfloat16), 1, 1)
    with pytest.raises(ValueError, match=r"kernel \[kh, kw, C, out\]"):
        native.convolution(x, jnp.zeros((3, 3, 5, 4), jnp.float32), 1, 1)
    with pytest.raises(ValueError, match="padding 3"):
        native.convolution(x, jnp.zeros((3, 3, 4, 4), jnp.float32), 1, 3)
    with pytest.raises(native.OneDnnUnavailable, match="CXX='no-such-compiler'"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CXX", "no-such-compiler")
            native._compiler()


def test_the_custom_call_checks_shapes_itself():
    """A result shape that does not fit the operands is refused by the C++ handler."""
    call = jax.ffi.ffi_call("kpn_onednn_conv_forward",
                            jax.ShapeDtypeStruct((1, 5, 8, 4), jnp.float32))
    with pytest.raises(Exception, match="inconsistent shapes"):
        jax.block_until_ready(call(jnp.zeros((1, 8, 8, 4), jnp.float32),
                                   jnp.zeros((3, 3, 4, 4), jnp.float32),
                                   stride=np.int64(1), padding=np.int64(1)))


@pytest.mark.slow
def test_missing_library_and_cached_build(tmp_path, monkeypatch):
    monkeypatch.setenv("KPN_JAX_ONEDNN_LIBDIR", str(tmp_path))
    with pytest.raises(native.OneDnnUnavailable, match=r"libdnnl\.so\.3 not found"):
        native.build(tmp_path / "cache")
    monkeypatch.delenv("KPN_JAX_ONEDNN_LIBDIR")
    first = native.build(tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path / "cache") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no leftovers


@pytest.mark.slow
def test_injected_convolution_matches_xla_and_keeps_the_parameter_tree():
    """nn.Conv with the oneDNN convolution equals nn.Conv: the stem (7x7, stride 2), a
    strided 3x3, and a biased 3x3 (bias added by nn.Conv); same variables."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 9, 9, 6)), jnp.float32)
    for args, kwargs, inputs in (((8, (7, 7), 2), dict(padding=((3, 3), (3, 3)), use_bias=False), x),
                                 ((5, (3, 3), 2), dict(padding=((1, 1), (1, 1)), use_bias=False), y),
                                 ((5, (3, 3)), dict(padding=((1, 1), (1, 1))), y)):
        reference = nn.Conv(*args, **kwargs)
        variables = reference.init(jax.random.key(0), inputs)
        ours = ONEDNN_CONV(*args, **kwargs)
        assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), inputs))
                == jax.tree.map(jnp.shape, variables))
        hlo = jax.jit(ours.apply).lower(variables, inputs).compile().as_text()
        assert "kpn_onednn_conv_forward" in hlo and "convolution(" not in hlo
        np.testing.assert_allclose(ours.apply(variables, inputs), reference.apply(variables, inputs),
                                   rtol=1e-5, atol=1e-5)


def _layer3_loss(model, variables, images):
    def loss(params):
        out, updates = model.apply({**variables, "params": params}, images, train=True,
                                   mutable=["batch_stats"])
        return jnp.sum(out["layer3"] ** 2), (out, updates)
    return loss


def _max_normalised_difference(got, want) -> float:
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                     / np.max(np.abs(np.asarray(b, np.float64))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


@pytest.mark.slow
def test_resnet_with_onednn_equals_xla_in_training():
    """ResNet-18 (width 8) in train mode with oneDNN convolutions: the same outputs,
    BatchNorm statistics and parameter gradients as with XLA's, and no XLA convolution
    left in the compiled program.

    Parameter gradients of a ReLU network jump where a ReLU input or two max-pool
    candidates cross: two correct float32 convolutions, rounding differently, then give
    gradients apart by up to ~0.1 of a leaf's largest entry. At 64 px such crossings lie
    within 1e-5 relative input perturbations for most inputs, so which side each lands on
    depends on the CPU's instruction set. The test therefore first shows, in float64,
    that its input is well conditioned (perturbing it by 3e-5 relative, in several random
    directions, moves no gradient entry by more than 2e-3 of its leaf's largest; float32
    rounding moves activations by ~1e-6), then compares the float32 gradients closely.
    """
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    xla_model = ResNet(18, width=8, last_stage="layer3")
    onednn_model = ResNet(18, width=8, last_stage="layer3", conv=ONEDNN_CONV)
    variables = jit_init(xla_model, images)

    with jax.enable_x64(True):
        model64 = ResNet(18, width=8, last_stage="layer3", dtype=jnp.float64,
                         param_dtype=jnp.float64)
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        x64 = jnp.asarray(images, jnp.float64)
        grad64 = jax.jit(lambda x: jax.grad(_layer3_loss(model64, v64, x), has_aux=True)(
            v64["params"])[0])
        at_input = grad64(x64)
        for direction in range(4):
            noise = np.random.default_rng(100 + direction).standard_normal(images.shape)
            change = _max_normalised_difference(grad64(x64 * (1 + 3e-5 * noise)), at_input)
            assert change < 2e-3, f"test input near a ReLU/max-pool kink ({change:.1e})"

    def run(model):
        return jax.jit(jax.grad(_layer3_loss(model, variables, images), has_aux=True))

    grads, (out, stats) = run(onednn_model)(variables["params"])
    grads_ref, (out_ref, stats_ref) = run(xla_model)(variables["params"])
    for got, want in ((out, out_ref), (stats, stats_ref)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * (np.abs(b).max() + 1e-12))
    assert _max_normalised_difference(grads, grads_ref) < 5e-4
    hlo = run(onednn_model).lower(variables["params"]).compile().as_text()
    assert "convolution(" not in hlo and "kpn_onednn_conv_forward" in hlo


@pytest.mark.slow
def test_first_use_inside_jit(tmp_path):
    """A fresh process whose first oneDNN convolution is traced inside jax.jit: the build
    and self-check run on concrete arrays, not on the tracer."""
    script = textwrap.dedent("""
        import functools, flax.linen as nn, jax, jax.numpy as jnp
        from kpn_jax import cpu
        conv = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)),
                       conv_general_dilated=cpu.onednn_conv_general_dilated)
        x = jnp.ones((1, 8, 8, 2), jnp.float32)
        variables = conv.init(jax.random.key(0), x)
        print(float(jax.jit(lambda v, x: conv.apply(v, x).sum())(variables, x)))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    float(result.stdout.strip().splitlines()[-1])


def test_auto_uses_onednn_on_one_avx512_device_only():
    assert kernels.choose("auto", "cpu", 1, has_avx512=lambda: True).name == "onednn"
    assert kernels.choose("auto", "cpu", 1, has_avx512=lambda: False).name == "cpu"
    assert kernels.choose("auto", "cpu", 2, has_avx512=lambda: True).name == "cpu"
    assert kernels.choose("onednn", "cpu", 1, has_avx512=lambda: False).name == "onednn"
