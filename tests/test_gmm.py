"""kpn_jax.gmm against scikit-learn and a float64 numpy reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from kpn_jax import gmm as gmm_lib
from kpn_jax import grades as grades_lib

D = grades_lib.ONE_HOT_DIM


def coherent_grades(rng: np.random.Generator, m: int) -> np.ndarray:
    """``[m, 7]`` made-up grades that move together: JSN and osteophytes follow KL."""
    kl = rng.integers(0, 5, size=m)
    columns = [kl]
    for _ in range(6):
        columns.append(np.clip(kl - 1 + rng.integers(-1, 2, size=m), 0, 3))
    return np.stack(columns, axis=1).astype(np.int32)


def reference_log_prob(weights, means, chol, x) -> np.ndarray:
    """float64 numpy log-density of a full-covariance GMM, ``x [N, D]`` -> ``[N]``."""
    weights, means, chol, x = (np.asarray(a, np.float64) for a in (weights, means, chol, x))
    out = []
    for k in range(weights.shape[0]):
        y = (x - means[k]) @ chol[k]
        log_det = np.sum(np.log(np.diag(chol[k])))
        out.append(np.log(weights[k]) - 0.5 * (x.shape[1] * np.log(2 * np.pi) + np.sum(y * y, 1))
                   + log_det)
    out = np.stack(out, axis=1)
    top = out.max(axis=1, keepdims=True)
    return (top + np.log(np.sum(np.exp(out - top), axis=1, keepdims=True)))[:, 0]


@pytest.fixture(scope="module")
def sklearn_gm():
    rng = np.random.default_rng(0)
    samples = grades_lib.one_hot(coherent_grades(rng, 200)).astype(np.float64)
    samples = samples + rng.normal(0, 0.2, samples.shape)
    return GaussianMixture(n_components=4, covariance_type="full", random_state=0).fit(samples)


def test_from_sklearn_matches_score_samples(sklearn_gm):
    gmm = gmm_lib.GMM.from_sklearn(sklearn_gm, sigma=0.2)
    assert gmm.weights.shape == (4,) and gmm.means.shape == (4, D)
    assert gmm.precisions_cholesky.shape == (4, D, D)
    assert gmm.weights.dtype == jnp.float32
    rng = np.random.default_rng(1)
    near_one_hot = (grades_lib.one_hot(coherent_grades(rng, 50))
                    + rng.normal(0, 0.05, (50, D))).astype(np.float32)
    uniform = rng.uniform(0, 1, (50, D)).astype(np.float32)
    logits = rng.normal(0, 3, (50, D))
    softmaxes = np.concatenate(
        [np.exp(logits[:, a:b]) / np.exp(logits[:, a:b]).sum(1, keepdims=True)
         for a, b in grades_lib.one_hot_offsets()], axis=1).astype(np.float32)
    for x in (near_one_hot, uniform, softmaxes):
        expected = sklearn_gm.score_samples(x.astype(np.float64))
        got = np.asarray(gmm_lib.log_prob(gmm, jnp.asarray(x)))
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_reference_agrees_with_sklearn(sklearn_gm):
    # The numpy reference used for gradients is itself checked against sklearn.
    x = np.random.default_rng(2).uniform(0, 1, (20, D))
    ref = reference_log_prob(sklearn_gm.weights_, sklearn_gm.means_,
                             sklearn_gm.precisions_cholesky_, x)
    np.testing.assert_allclose(ref, sklearn_gm.score_samples(x), rtol=1e-10)


def test_gradient_matches_float64_finite_differences(sklearn_gm):
    gmm = gmm_lib.GMM.from_sklearn(sklearn_gm)
    params = [np.asarray(a, np.float64) for a in (gmm.weights, gmm.means, gmm.precisions_cholesky)]
    rng = np.random.default_rng(3)
    points = np.concatenate([
        grades_lib.one_hot(coherent_grades(rng, 3)) + rng.normal(0, 0.1, (3, D)),
        rng.uniform(0, 1, (2, D))]).astype(np.float32)
    grad_fn = jax.jit(jax.grad(lambda x: gmm_lib.log_prob(gmm, x)))
    eps = 1e-5
    for x in points:
        x64 = x.astype(np.float64)
        numeric = np.empty(D)
        for d in range(D):
            step = np.zeros(D)
            step[d] = eps
            numeric[d] = (reference_log_prob(*params, (x64 + step)[None])[0]
                          - reference_log_prob(*params, (x64 - step)[None])[0]) / (2 * eps)
        got = np.asarray(grad_fn(jnp.asarray(x)))
        scale = np.max(np.abs(numeric))
        np.testing.assert_allclose(got, numeric, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.slow
def test_log_prob_batch_shapes_jit_and_vmap(sklearn_gm):
    gmm = gmm_lib.GMM.from_sklearn(sklearn_gm)
    x = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (2, 3, D)), jnp.float32)
    flat = gmm_lib.log_prob(gmm, x.reshape(6, D))
    batched = jax.jit(gmm_lib.log_prob)(gmm, x)
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(batched).reshape(6), np.asarray(flat), rtol=1e-6)
    single = jax.vmap(lambda row: gmm_lib.log_prob(gmm, row))(x.reshape(6, D))
    np.testing.assert_allclose(np.asarray(single), np.asarray(flat), rtol=1e-6)
    with pytest.raises(ValueError, match="log_prob"):
        gmm_lib.log_prob(gmm, jnp.zeros((3, D - 1)))


def test_fit_is_deterministic_and_drops_partial_rows():
    grades = coherent_grades(np.random.default_rng(5), 120)
    a = gmm_lib.fit(grades, num_components=3, sigma=0.2, repeats=2, seed=7)
    b = gmm_lib.fit(grades, num_components=3, sigma=0.2, repeats=2, seed=7)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a.sigma == 0.2 and a.num_components == 3 and a.dim == D
    np.testing.assert_allclose(float(jnp.sum(a.weights)), 1.0, rtol=1e-5)
    # Partially graded rows are dropped before the noise is drawn: same fit.
    partial = coherent_grades(np.random.default_rng(6), 30)
    partial[:, 2] = -1
    mixed = np.concatenate([grades[:60], partial, grades[60:]])
    c = gmm_lib.fit(mixed, num_components=3, sigma=0.2, repeats=2, seed=7)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # A different seed gives a different fit.
    d = gmm_lib.fit(grades, num_components=3, sigma=0.2, repeats=2, seed=8)
    assert not np.array_equal(np.asarray(a.means), np.asarray(d.means))


def test_fitted_gmm_prefers_coherent_grades():
    grades = coherent_grades(np.random.default_rng(9), 300)
    gmm = gmm_lib.fit(grades, num_components=4, seed=0)
    coherent = np.array([[0, 0, 0, 0, 0, 0, 0], [4, 3, 3, 3, 3, 3, 3]])
    incoherent = np.array([[0, 3, 3, 3, 3, 3, 3], [4, 0, 0, 0, 0, 0, 0]])
    good = np.asarray(gmm_lib.log_prob(gmm, grades_lib.one_hot(coherent)))
    bad = np.asarray(gmm_lib.log_prob(gmm, grades_lib.one_hot(incoherent)))
    assert np.all(good > bad + 10.0)


def test_fit_needs_enough_fully_graded_rows():
    grades = coherent_grades(np.random.default_rng(10), 40)
    grades[:25, 0] = -1  # 15 fully graded rows remain
    with pytest.raises(ValueError, match="found 15, need at least 20"):
        gmm_lib.fit(grades, num_components=10)
    with pytest.raises(ValueError, match="kl grade 7"):
        gmm_lib.fit(np.full((30, 7), 7), num_components=2)


def test_save_load_round_trip(tmp_path, sklearn_gm):
    gmm = gmm_lib.GMM.from_sklearn(sklearn_gm, sigma=0.2)
    path = tmp_path / "gmm.npz"
    gmm_lib.save(gmm, path)
    loaded = gmm_lib.load(path)
    assert loaded.sigma == 0.2
    for x, y in zip(jax.tree.leaves(gmm), jax.tree.leaves(loaded)):
        assert np.asarray(y).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with np.load(path) as data:
        assert tuple(str(t) for t in data["tasks"]) == grades_lib.TASKS
    unknown_sigma = gmm_lib.GMM(gmm.weights, gmm.means, gmm.precisions_cholesky)
    gmm_lib.save(unknown_sigma, tmp_path / "nosigma.npz")
    assert gmm_lib.load(tmp_path / "nosigma.npz").sigma is None


def test_load_rejects_bad_files(tmp_path, sklearn_gm):
    gmm = gmm_lib.GMM.from_sklearn(sklearn_gm)
    good = tmp_path / "good.npz"
    gmm_lib.save(gmm, good)
    with np.load(good) as data:
        contents = {k: data[k] for k in data.files}

    missing = tmp_path / "missing.npz"
    np.savez(missing, **{k: v for k, v in contents.items() if k != "means"})
    with pytest.raises(ValueError, match=r"missing\.npz.*means"):
        gmm_lib.load(missing)

    bad_shape = tmp_path / "bad_shape.npz"
    np.savez(bad_shape, **{**contents, "means": contents["means"][:, :10]})
    with pytest.raises(ValueError, match=r"bad_shape\.npz"):
        gmm_lib.load(bad_shape)

    bad_layout = tmp_path / "bad_layout.npz"
    np.savez(bad_layout, **{**contents, "tasks": contents["tasks"][::-1]})
    with pytest.raises(ValueError, match=r"bad_layout\.npz.*layout"):
        gmm_lib.load(bad_layout)

    not_npz = tmp_path / "garbage.npz"
    not_npz.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"garbage\.npz"):
        gmm_lib.load(not_npz)


def test_from_sklearn_rejects_other_covariance_types():
    samples = np.random.default_rng(11).normal(size=(30, 3))
    diag = GaussianMixture(2, covariance_type="diag", random_state=0).fit(samples)
    with pytest.raises(ValueError, match="covariance_type"):
        gmm_lib.GMM.from_sklearn(diag)
    assert math.isfinite(float(gmm_lib.log_prob(
        gmm_lib.GMM.from_sklearn(GaussianMixture(2, random_state=0).fit(samples)),
        jnp.zeros(3))))


def test_auto_repeats_reaches_a_thousand_samples_per_component():
    assert gmm_lib.auto_repeats(11600, 10) == 1        # the paper's OAI training set
    assert gmm_lib.auto_repeats(1000, 10) == 10
    assert gmm_lib.auto_repeats(200, 10) == 50
    assert gmm_lib.auto_repeats(333, 10) == 31         # rounds up: 31 * 333 >= 10,000
    with pytest.raises(ValueError, match="auto_repeats"):
        gmm_lib.auto_repeats(0, 10)


def test_covariance_floor_is_the_smallest_covariance_eigenvalue(sklearn_gm):
    expected = min(np.linalg.eigvalsh(c).min() for c in sklearn_gm.covariances_)
    got = gmm_lib.covariance_floor(gmm_lib.GMM.from_sklearn(sklearn_gm))
    np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.slow
def test_small_labelled_set_needs_noisy_copies():
    """200 knees fitted once each leave K=10 components with too few points in 29 dims: the
    covariances collapse to reg_covar and held-out expert grades look 'incoherent'. The
    automatic number of noisy copies keeps the noise floor and scores them as coherent."""
    rng = np.random.default_rng(11)
    train, held_out = coherent_grades(rng, 200), coherent_grades(rng, 300)
    once = gmm_lib.fit(train, num_components=10, sigma=0.2, repeats=1, seed=0)
    auto = gmm_lib.fit(train, num_components=10, sigma=0.2, seed=0)   # 50 copies
    assert gmm_lib.covariance_floor(once) < 1e-3
    assert gmm_lib.covariance_floor(auto) > 0.5 * 0.2 ** 2
    held_out_once = np.asarray(gmm_lib.log_prob(once, grades_lib.one_hot(held_out)))
    held_out_auto = np.asarray(gmm_lib.log_prob(auto, grades_lib.one_hot(held_out)))
    assert np.median(held_out_once) < -100.0
    assert np.median(held_out_auto) > 0.0
