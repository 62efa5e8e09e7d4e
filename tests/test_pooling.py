"""kpn_jax.cpu.pooling.max_pool: nn.max_pool's forward, select-and-scatter's gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kpn_jax.cpu import pooling

CASES = [
    # (shape [B, H, W, C], window, strides, padding)
    ((2, 17, 16, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),    # the ResNet stem, odd height
    ((1, 12, 13, 2), (3, 3), (1, 1), ((1, 1), (1, 1))),    # heavy overlap
    ((2, 8, 8, 4), (2, 2), (2, 2), ((0, 0), (0, 0))),      # no overlap, no padding
    ((1, 9, 11, 1), (3, 2), (2, 3), ((1, 0), (0, 1))),     # asymmetric everything
]


def _inputs(shape, kind, seed):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.normal(size=shape).astype(np.float32)
    if kind == "relu":      # after BatchNorm + ReLU most windows tie at 0
        return np.maximum(rng.normal(size=shape), 0.0).astype(np.float32)
    return rng.integers(0, 3, size=shape).astype(np.float32)   # 'coarse': ties of any value


def _reference(x, window, strides, padding):
    return nn.max_pool(x, window, strides=strides, padding=padding)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["random", "relu", "coarse"])
def test_forward_and_gradient_match_select_and_scatter(case, kind):
    shape, window, strides, padding = case
    x = jnp.asarray(_inputs(shape, kind, seed=len(kind)))
    expected = _reference(x, window, strides, padding)
    got = pooling.max_pool(x, window, strides, padding)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=expected.shape), jnp.float32)
    _, vjp_ref = jax.vjp(lambda v: _reference(v, window, strides, padding), x)
    _, vjp_got = jax.vjp(lambda v: pooling.max_pool(v, window, strides, padding), x)
    (g_ref,), (g_got,) = vjp_ref(cotangent), vjp_got(cotangent)
    # Same winners; only the order of additions where windows overlap may differ.
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g_got) != 0, np.asarray(g_ref) != 0)


@pytest.mark.slow
def test_gradient_matches_torch_max_pool_tie_rule():
    torch = pytest.importorskip("torch")
    x = _inputs((2, 15, 14, 3), "coarse", seed=5)
    cotangent = np.random.default_rng(6).normal(size=(2, 8, 7, 3)).astype(np.float32)
    _, vjp = jax.vjp(lambda v: pooling.max_pool(v), jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(cotangent))
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    yt.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy().transpose(0, 2, 3, 1),
                               rtol=1e-6, atol=1e-6)


def test_jit_bfloat16_and_second_use():
    x = jnp.asarray(_inputs((2, 10, 10, 2), "relu", seed=7), jnp.bfloat16)
    f = jax.jit(lambda v: jnp.sum(pooling.max_pool(v).astype(jnp.float32) ** 2))
    g = jax.jit(jax.grad(f))(x)
    g_ref = jax.grad(lambda v: jnp.sum(_reference(v, (3, 3), (2, 2), ((1, 1), (1, 1)))
                                       .astype(jnp.float32) ** 2))(x)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_ref, np.float32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=(3, 3), strides=(2, 2), padding=((3, 1), (1, 1))), "padding must be smaller"),
    (dict(window=(3,), strides=(2, 2), padding=((1, 1), (1, 1))), "window and strides"),
    (dict(window=(3, 3), strides=(0, 2), padding=((1, 1), (1, 1))), "strides >= 1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pooling.max_pool(jnp.zeros((1, 8, 8, 1)), **kwargs)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        pooling.max_pool(jnp.zeros((8, 8, 1)))
