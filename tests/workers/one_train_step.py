"""Runs one kpn-jax train step on a fixed random global batch and saves the parameters.

Used by tests/test_parallel.py in fresh processes, because the device count
(XLA_FLAGS) and jax.distributed must be set before JAX starts.

  python one_train_step.py OUT.npz [--process_id I --num_processes P --port N]
"""

import argparse
import os
import sys

import numpy as np


def tiny_config():
    from configs import default

    config = default.get_config()
    config.model.update(dict(depth=18, width=8))
    config.batch_size = 4
    config.unlabeled_batch_size = 4
    config.learning_rate = 1e-2
    config.augment.max_translation_px = 3.0
    return config


def fixed_global_batch(size=32, batch=8, num_points=16):
    rng = np.random.default_rng(0)
    grades = np.stack([rng.integers(0, 5, batch)] + [rng.integers(0, 4, batch) for _ in range(6)], 1)
    return {
        "image": rng.integers(0, 256, (batch, size, size, 1), dtype=np.uint8),
        "keypoints": rng.uniform(4, size - 4, (batch, num_points, 2)).astype(np.float32),
        "grades": grades.astype(np.int32),
        "labeled": np.arange(batch) < batch // 2,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import jax
    import jax.numpy as jnp

    from kpn_jax import gmm as gmm_lib, losses, parallel, train, trainer

    if args.num_processes > 1:
        parallel.initialize_distributed(f"127.0.0.1:{args.port}", args.num_processes,
                                        args.process_id, cpu_collectives="gloo")
    config = tiny_config()
    batch = fixed_global_batch()
    mesh = parallel.make_mesh()
    # Each process feeds only its own slice of the global batch.
    per_process = len(batch["grades"]) // jax.process_count()
    local = {k: v[args.process_id * per_process:(args.process_id + 1) * per_process]
             for k, v in batch.items()}
    gmm = gmm_lib.fit(np.concatenate([batch["grades"]] * 8), num_components=2, seed=0)
    weights = {k: jnp.asarray(v) for k, v in losses.class_weights(batch["grades"]).items()}
    model = train.create_model(config)
    tx = train.make_optimizer(config, steps_per_epoch=10)
    state = train.create_state(config, model, tx, 32, 16, mesh)
    step = train.make_train_step(config, model, weights, gmm)
    global_batch = parallel.global_batch(local, mesh)
    health = parallel.replicate(trainer.initial_health(), mesh)
    step_index = jnp.asarray(0, jnp.int32)  # past the (zero) warm-up: the GMM term is on
    compiled = step.lower(state, global_batch, health, step_index).compile()
    if args.num_processes > 1:
        # Compile first, then meet: on a loaded CPU one process can finish compiling more
        # than gloo's 30 s key-exchange timeout after the other, and the first collective
        # of the step would fail (seen once under load 8: 'GetKeyValue() timed out').
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier("one_train_step_compiled", 600_000)
    state, aux, _ = compiled(state, global_batch, health, step_index)
    params = jax.tree_util.tree_flatten_with_path(
        {"params": state.params, "batch_stats": state.batch_stats})[0]
    if jax.process_index() == 0:
        arrays = {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf)) for path, leaf in params}
        arrays["__loss__"] = np.asarray(jax.device_get(aux["loss"]))
        arrays["__devices__"] = np.asarray(jax.device_count())
        np.savez(args.out, **arrays)


if __name__ == "__main__":
    main()
