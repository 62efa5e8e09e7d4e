"""The grade-coherence prior: a Gaussian mixture over one-hot grade vectors.

The paper (section 2.2) models the joint distribution of the 7 grades with a
``K``-component full-covariance GMM fitted by EM on the one-hot encoding of
expert grades (``D = 29``) plus ``N(0, sigma^2)`` noise, so that the soft
predictions ``P`` (concatenated softmaxes) lie inside its support. During
training ``g(P) = log p(P)`` scores how coherent a prediction is.

Fitting runs once on the host with scikit-learn; :func:`log_prob` is pure
``jax.numpy`` so it can sit inside the jitted loss. Parameters follow
scikit-learn's ``covariance_type='full'`` convention: ``precisions_cholesky[k]``
is the upper-triangular ``U`` with ``precision_k = U @ U.T``, so

    log N(x; mu, Sigma) = -0.5 * (D log(2 pi) + ||(x - mu) @ U||^2) + sum(log diag U)

with no inverse and no determinant.
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from kpn_jax import grades as grades_lib
from kpn_jax import storage

if TYPE_CHECKING:
    from sklearn.mixture import GaussianMixture

_FORMAT_VERSION = 1
_ARRAY_KEYS = ("weights", "means", "precisions_cholesky")


@flax.struct.dataclass
class GMM:
    """Full-covariance Gaussian mixture, a pytree of float32 arrays.

    Attributes:
      weights: ``[K]`` mixing weights (sum to 1).
      means: ``[K, D]`` component means.
      precisions_cholesky: ``[K, D, D]`` upper-triangular ``U`` per component
        with ``precision = U @ U.T`` (scikit-learn's ``precisions_cholesky_``).
      sigma: std of the noise added to the one-hot grades when fitting; static
        metadata (not a pytree leaf), ``None`` when unknown.
    """

    weights: jax.Array
    means: jax.Array
    precisions_cholesky: jax.Array
    sigma: float | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[-1])

    @classmethod
    def from_sklearn(cls, gm: GaussianMixture, sigma: float | None = None) -> "GMM":
        """Converts a fitted ``GaussianMixture(covariance_type='full')``."""
        if getattr(gm, "covariance_type", None) != "full":
            raise ValueError(f"GMM.from_sklearn: covariance_type must be 'full', got "
                             f"{getattr(gm, 'covariance_type', None)!r}")
        if not hasattr(gm, "precisions_cholesky_"):
            raise ValueError("GMM.from_sklearn: the GaussianMixture is not fitted")
        gmm = cls(
            weights=jnp.asarray(gm.weights_, jnp.float32),
            means=jnp.asarray(gm.means_, jnp.float32),
            precisions_cholesky=jnp.asarray(gm.precisions_cholesky_, jnp.float32),
            sigma=None if sigma is None else float(sigma),
        )
        _check_shapes(gmm.weights.shape, gmm.means.shape, gmm.precisions_cholesky.shape,
                      "GMM.from_sklearn")
        return gmm


def _check_shapes(weights_shape, means_shape, chol_shape, where: str) -> None:
    """Raises ValueError unless shapes are ``[K]``, ``[K, D]``, ``[K, D, D]``."""
    ok = (len(weights_shape) == 1 and len(means_shape) == 2 and len(chol_shape) == 3
          and means_shape[0] == weights_shape[0] and chol_shape[0] == weights_shape[0]
          and chol_shape[1] == chol_shape[2] == means_shape[1])
    if not ok:
        raise ValueError(f"{where}: expected weights [K], means [K, D], precisions_cholesky "
                         f"[K, D, D]; got {tuple(weights_shape)}, {tuple(means_shape)}, "
                         f"{tuple(chol_shape)}")


# EM needs many more samples per component than dimensions, or a component's
# covariance collapses onto the few points it holds: its smallest eigenvalues fall
# to ``reg_covar`` (1e-6) instead of the noise floor ``sigma^2``, and every vector
# off that thin subspace, expert grades included, gets a log-density of -1e4 or
# lower. Fitting on 200 knees once each did exactly that (docs/RESULTS.md); with
# at least this many noisy samples per component (34 per dimension at D = 29) the
# covariance floor stays within a factor of two of ``sigma^2``.
MIN_SAMPLES_PER_COMPONENT = 1000


def auto_repeats(num_rows: int, num_components: int,
                 min_samples_per_component: int = MIN_SAMPLES_PER_COMPONENT) -> int:
    """Noisy copies per fully graded row so that EM sees ``>= K * min_samples_per_component``.

    1 for the paper's OAI training set (11,600 knees, K = 10); 50 for 200 knees.
    """
    if num_rows < 1 or num_components < 1:
        raise ValueError(f"auto_repeats: need num_rows >= 1 and num_components >= 1, got "
                         f"{num_rows}, {num_components}")
    return max(1, math.ceil(num_components * min_samples_per_component / num_rows))


def covariance_floor(gmm: GMM) -> float:
    """The smallest eigenvalue over all component covariances.

    With noise ``sigma`` added to the one-hot grades, a healthy fit keeps it near
    ``sigma^2``; far below it means a degenerate component (see
    :data:`MIN_SAMPLES_PER_COMPONENT`).
    """
    chol = np.asarray(gmm.precisions_cholesky, np.float64)
    precisions = np.einsum("kij,klj->kil", chol, chol)
    return float(1.0 / np.max(np.linalg.eigvalsh(precisions)))


def fit(grades, num_components: int = 10, sigma: float = 0.2, repeats: int | None = None,
        seed: int = 0, reg_covar: float = 1e-6, max_iter: int = 200, n_init: int = 1) -> GMM:
    """Fits the coherence GMM on expert grades (EM, scikit-learn).

    Args:
      grades: int ``[M, 7]`` in ``TASKS`` order, -1 = missing. Rows with any
        missing grade are dropped: a partial one-hot vector is not a point of
        the joint distribution.
      num_components: ``K`` (10 in the paper).
      sigma: std of the Gaussian noise added to each one-hot coordinate (0.2).
      repeats: each fully graded row is used this many times, each copy with
        fresh noise (more samples of the smoothed distribution). ``None``:
        :func:`auto_repeats` (1 at the paper's data size, more for small sets).
      seed: seeds both the noise and scikit-learn's initialisation.
      reg_covar, max_iter, n_init: passed to ``GaussianMixture``.

    Returns:
      The fitted :class:`GMM` (``D = 29``), float32, with ``sigma`` recorded.

    Raises:
      ValueError: invalid grades or arguments, or fewer than
        ``2 * num_components`` fully graded rows.
    """
    if num_components < 1:
        raise ValueError(f"fit: num_components must be >= 1, got {num_components}")
    if repeats is not None and repeats < 1:
        raise ValueError(f"fit: repeats must be >= 1 (or None for automatic), got {repeats}")
    if not sigma >= 0 or not math.isfinite(sigma):
        raise ValueError(f"fit: sigma must be a finite number >= 0, got {sigma}")
    grades_arr = grades_lib.validate(grades, name="fit: grades")
    if grades_arr.ndim != 2:
        raise ValueError(f"fit: grades must be [M, {len(grades_lib.TASKS)}], got {grades_arr.shape}")
    complete = grades_lib.fully_graded(grades_arr)
    found, needed = int(complete.sum()), 2 * num_components
    if found < needed:
        raise ValueError("coherence learning needs fully graded examples to fit the GMM: "
                         f"found {found}, need at least {needed}")
    if repeats is None:
        repeats = auto_repeats(found, num_components)
    one_hot = grades_lib.one_hot(grades_arr[complete]).astype(np.float64)   # [M', 29]
    samples = np.repeat(one_hot, repeats, axis=0)                             # [M' * r, 29]
    rng = np.random.default_rng(seed)
    samples = samples + rng.normal(0.0, sigma, size=samples.shape)
    # Imported here: scikit-learn (with scipy) costs every process that only loads a fitted
    # mixture (a resumed run, predict, the page) about a second of start-up.
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(n_components=num_components, covariance_type="full",
                         reg_covar=reg_covar, max_iter=max_iter, n_init=n_init,
                         random_state=seed)
    gm.fit(samples)
    return GMM.from_sklearn(gm, sigma=sigma)


def log_prob(gmm: GMM, x: jax.Array) -> jax.Array:
    """Log-density of the mixture, ``log sum_k w_k N(x; mu_k, Sigma_k)``.

    Args:
      gmm: the mixture, ``D``-dimensional.
      x: ``[..., D]`` points (e.g. the concatenated softmaxes ``P``).

    Returns:
      ``[...]`` log-densities, float32 (or wider if ``x`` is wider). Agrees with
      scikit-learn's ``score_samples``; differentiable, jit/vmap friendly.
    """
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != gmm.means.shape[-1]:
        raise ValueError(f"log_prob: x must be [..., {gmm.means.shape[-1]}], got {x.shape}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    means = gmm.means.astype(dtype)
    chol = gmm.precisions_cholesky.astype(dtype)
    dim = means.shape[-1]
    # y[..., k, :] = (x - mu_k) @ U_k, the whitened residual of each component.
    # Full float32: the squared residuals are large and cancel in logsumexp, so bfloat16-
    # rounded inputs (the default matmul precision on TPU) would shift log p visibly.
    y = jnp.einsum("...kd,kde->...ke", x[..., None, :] - means, chol,
                   precision=jax.lax.Precision.HIGHEST)
    log_det = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)      # [K]
    log_gauss = -0.5 * (dim * math.log(2 * math.pi) + jnp.sum(y * y, axis=-1)) + log_det
    return jax.nn.logsumexp(log_gauss + jnp.log(gmm.weights.astype(dtype)), axis=-1)


def save(gmm: GMM, path: str | os.PathLike) -> None:
    """Writes the mixture to an ``.npz`` with its grade layout and ``sigma``."""
    path = os.fspath(path)
    encoded = io.BytesIO()
    np.savez(
        encoded,
        weights=np.asarray(gmm.weights, np.float32),
        means=np.asarray(gmm.means, np.float32),
        precisions_cholesky=np.asarray(gmm.precisions_cholesky, np.float32),
        tasks=np.asarray(grades_lib.TASKS),
        num_classes=np.asarray([grades_lib.NUM_CLASSES[t] for t in grades_lib.TASKS], np.int32),
        sigma=np.float64(np.nan if gmm.sigma is None else gmm.sigma),
        format_version=np.int32(_FORMAT_VERSION),
    )
    # Whole or not at all (a reader never sees half a file); local or gs://.
    storage.write_atomic(storage.path(path if path.endswith(".npz") else path + ".npz"),
                         encoded.getvalue())


def load(path: str | os.PathLike) -> GMM:
    """Reads a mixture written by :func:`save`.

    Raises:
      ValueError: naming the file when a key is missing, the shapes disagree,
        values are not finite, or the stored grade layout is not ``TASKS``.
    """
    path = os.fspath(path)
    try:
        with np.load(io.BytesIO(storage.path(path).read_bytes()), allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"GMM file {path}: cannot be read as .npz: {error}") from error
    missing = [k for k in _ARRAY_KEYS + ("tasks", "num_classes") if k not in contents]
    if missing:
        raise ValueError(f"GMM file {path}: missing keys {missing}")
    tasks = tuple(str(t) for t in np.atleast_1d(contents["tasks"]))
    num_classes = tuple(int(c) for c in np.atleast_1d(contents["num_classes"]))
    expected_classes = tuple(grades_lib.NUM_CLASSES[t] for t in grades_lib.TASKS)
    if tasks != grades_lib.TASKS or num_classes != expected_classes:
        raise ValueError(f"GMM file {path}: grade layout {tasks} with classes {num_classes} does "
                         f"not match {grades_lib.TASKS} with {expected_classes}")
    weights, means, chol = (contents[k] for k in _ARRAY_KEYS)
    _check_shapes(weights.shape, means.shape, chol.shape, f"GMM file {path}")
    if means.shape[1] != grades_lib.ONE_HOT_DIM:
        raise ValueError(f"GMM file {path}: dimension {means.shape[1]} != one-hot dimension "
                         f"{grades_lib.ONE_HOT_DIM}")
    for key, value in zip(_ARRAY_KEYS, (weights, means, chol)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"GMM file {path}: {key} has non-finite values")
    sigma = float(contents["sigma"]) if "sigma" in contents else float("nan")
    return GMM(
        weights=jnp.asarray(weights, jnp.float32),
        means=jnp.asarray(means, jnp.float32),
        precisions_cholesky=jnp.asarray(chol, jnp.float32),
        sigma=None if math.isnan(sigma) else sigma,
    )
