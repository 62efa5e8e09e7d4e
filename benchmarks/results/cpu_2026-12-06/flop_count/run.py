"""Model FLOPs of the paper's train step (ResNet-50 KPN + CL, 320 px, 48 + 48 knees) as
benchmarks/train_step.py counts them now (a strided convolution's input gradient as the
forward's multiply-adds) and as it counted before (over the zero-dilated map).

  python benchmarks/results/cpu_2026-12-06/flop_count/run.py
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import train_step as bench  # noqa: E402
from configs import default  # noqa: E402
from kpn_jax import gmm as gmm_lib, parallel, train, trainer  # noqa: E402


def zero_dilation_extra(closed_jaxpr) -> float:
    """What the earlier count added: each lhs-dilated convolution over its dilated map."""
    from jax._src.interpreters import partial_eval as pe

    jaxpr, _ = pe.dce_jaxpr(closed_jaxpr.jaxpr, [True] * len(closed_jaxpr.jaxpr.outvars))
    extra = 0.0
    for eqn in bench._jaxpr_eqns(jaxpr):
        if eqn.primitive.name == "conv_general_dilated" and any(
                d > 1 for d in eqn.params.get("lhs_dilation") or ()):
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec
            spatial = int(np.prod([rhs[d] for d in spec[2:]]))
            before = 2.0 * int(np.prod(eqn.outvars[0].aval.shape)) * spatial * rhs[spec[1]]
            now = 2.0 * int(np.prod(eqn.invars[0].aval.shape)) * spatial * rhs[spec[0]]
            extra += before - now
    return extra


def main():
    config = default.get_config()
    config.model.kernels = "xla"
    size, labeled, unlabeled = 320, 48, 48
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (labeled + unlabeled, size, size, 1), dtype=np.uint8),
             "keypoints": rng.uniform(40, 280, (labeled + unlabeled, 16, 2)).astype(np.float32),
             "grades": np.concatenate([rng.integers(0, 4, (labeled + unlabeled, 7))]).astype(np.int32),
             "labeled": np.arange(labeled + unlabeled) < labeled}
    grades = rng.integers(0, 4, (400, 7)).astype(np.int32)
    gmm = gmm_lib.fit(grades, num_components=10, seed=0)
    mesh = parallel.make_mesh()
    model = train.create_model(config)
    tx = train.make_optimizer(config, steps_per_epoch=1000)
    state = jax.eval_shape(lambda: train.create_state(config, model, tx, size, 16, mesh))
    step = train.make_train_step(config, model, None, gmm)
    closed = jax.make_jaxpr(step)(state, batch, trainer.initial_health(), jnp.asarray(0, jnp.int32))
    now = bench.jaxpr_flops(closed)
    before = now + zero_dilation_extra(closed)
    print(f"ResNet-50 KPN + CL train step, 320 px, 48 + 48: {now / 1e12:.3f} TFLOP now, "
          f"{before / 1e12:.3f} TFLOP counted before ({before / now - 1:+.1%})")


if __name__ == "__main__":
    main()
