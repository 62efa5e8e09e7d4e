"""kpn_jax.kernels.choose and the CPU plug-in's convolution (kpn_jax.cpu) against XLA's."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax import cpu, kernels
from kpn_jax.cpu import onednn

CPU_CONV = functools.partial(nn.Conv, conv_general_dilated=cpu.conv_general_dilated)


def works():
    return True, ""


def broken():
    return False, "no C++ compiler"


def test_choose_by_backend_and_request():
    assert kernels.choose("auto", "gpu", 1, works) is kernels.XLA_KERNELS
    assert kernels.choose("auto", "tpu", 8, works) is kernels.XLA_KERNELS
    assert kernels.choose("xla", "cpu", 1, works) is kernels.XLA_KERNELS
    avx512, avx2 = (lambda: True), (lambda: False)
    assert kernels.choose("auto", "cpu", 1, works, avx512).name == "onednn"
    assert kernels.choose("auto", "cpu", 1, broken, avx512).name == "cpu"   # no extra: slower only
    assert kernels.choose("auto", "cpu", 1, works, avx2).name == "cpu"      # oneDNN slower there
    assert kernels.choose("auto", "cpu", 2, works, avx512).name == "cpu"    # not shardable
    assert kernels.choose("cpu", "cpu", 1, works, avx512).name == "cpu"
    chosen = kernels.choose("onednn", "cpu", 1, works, avx2)
    assert chosen.name == "onednn" and chosen.max_pool is cpu.max_pool
    assert chosen.conv.keywords["conv_general_dilated"] is cpu.onednn_conv_general_dilated
    with pytest.raises(onednn.OneDnnUnavailable, match="no C.. compiler"):
        kernels.choose("onednn", "cpu", 1, broken)
    with pytest.raises(ValueError, match="CPU backend"):
        kernels.choose("onednn", "gpu", 1, works)
    with pytest.raises(ValueError, match="CPU backend"):
        kernels.choose("cpu", "tpu", 1, works)
    with pytest.raises(ValueError, match="single device"):
        kernels.choose("onednn", "cpu", 2, works)
    with pytest.raises(ValueError, match="model.kernels"):
        kernels.choose("winograd", "cpu")


def test_compiler_options_are_accepted_by_this_jaxlib():
    """The plug-in's options compile here (or are dropped where this jaxlib rejects them)."""
    options = cpu.compiler_options()
    f = jax.jit(lambda x: jnp.sum(x * 2), compiler_options=options or None)
    assert float(f(jnp.ones((3,)))) == 6.0


@pytest.mark.slow
@pytest.mark.parametrize("kernel_size,stride,padding,use_bias", [
    (1, 1, ((0, 0), (0, 0)), False),
    (1, 2, ((0, 0), (0, 0)), False),   # strided 1x1: the slice keeps the pixels it reads
    (1, 1, "SAME", True),              # the landmark head's lateral 1x1 (bias, 'SAME')
    (3, 2, ((1, 1), (1, 1)), False),   # other kernels: XLA's own convolution
    (7, 2, ((3, 3), (3, 3)), False),
])
def test_cpu_convolution_equals_nn_conv_with_the_same_variables(kernel_size, stride, padding,
                                                                use_bias):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 11, 9, 5)), jnp.float32)
    reference = nn.Conv(6, (kernel_size, kernel_size), stride, padding=padding, use_bias=use_bias)
    variables = reference.init(jax.random.key(0), x)
    ours = CPU_CONV(6, (kernel_size, kernel_size), stride, padding=padding, use_bias=use_bias)
    assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
            == jax.tree.map(jnp.shape, variables))

    def loss(module, variables, x):
        return jnp.sum(jnp.sin(module.apply(variables, x)))

    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x),
                               rtol=1e-5, atol=1e-5)
    got = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(variables, x)
    want = jax.grad(functools.partial(loss, reference), argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_1x1_convolution_is_a_matrix_product_in_the_compiled_program():
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    conv = CPU_CONV(3, (1, 1), 2, padding=((0, 0), (0, 0)), use_bias=False)
    variables = conv.init(jax.random.key(0), x)
    hlo = jax.jit(conv.apply).lower(variables, x).as_text()
    assert "convolution" not in hlo and "dot_general" in hlo
