"""Device mesh and shardings for data parallelism (docs/DESIGN.md, section 7).

One ``jax.jit`` over a 1-D ``Mesh(devices, ('data',))``: batches are sharded
``P('data')``, parameters and optimizer state replicated. Multi-host runs call
:func:`initialize_distributed` first; each process then feeds its own slice of
the global batch through :func:`global_batch`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, name: str = "batch_size") -> int:
    """Per-process batch size; the global size must split evenly over devices and processes."""
    if global_batch_size % mesh.devices.size:
        raise ValueError(f"{name}={global_batch_size} is not divisible by the {mesh.devices.size} "
                         "devices of the mesh")
    return global_batch_size // jax.process_count()


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy batch ``{name: [B_local, ...]}`` -> global ``jax.Array``s sharded P('data')."""
    sharding = data_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def replicate(tree, mesh: Mesh):
    """Places a pytree (parameters, optimizer state) on every device of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: str | None = None,
                           auto: bool = False) -> None:
    """``jax.distributed.initialize`` for multi-host runs; a no-op for one process.

    On GPU clusters and TPU pods the arguments may be left out (auto-detected
    from the environment). ``cpu_collectives='gloo'`` enables cross-process
    collectives on CPU (tests run two processes on localhost this way).
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if not auto and (num_processes is None or num_processes <= 1):
        return
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def agree(value) -> np.ndarray:
    """Process 0's ``value`` (a number or numpy array) on every process: decisions that each
    process could otherwise take alone from files or its own clock are taken once."""
    if jax.process_count() == 1:
        return np.asarray(value)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def all_processes(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (each process's own answer, gathered)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op for one process): what
    process 0 wrote before it is visible to all after it."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def finish(name: str) -> None:
    """The end of a multi-process run: every process waits for the others here, then the
    distributed system is shut down while every part of JAX is still alive (a no-op for
    one process)."""
    if jax.process_count() > 1:
        barrier(name)
        jax.distributed.shutdown()


def stop_agreed(step: int, requested) -> bool:
    """Before ``step``: whether to stop there. One process: ``requested()`` (a SIGTERM or
    Ctrl-C flag). Several: JAX's preemption sync point, so that a SIGTERM to any process
    stops every process before the same step (``requested`` is not consulted there)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)
    return requested is not None and bool(requested())
