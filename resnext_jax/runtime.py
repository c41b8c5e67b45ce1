"""Processes, devices and where arrays live: the one module that knows the mesh layout.

Every entry point (train, eval, predict, export, the benchmark) runs on the same layout: one 'data' axis over
every device of every process, the batch split along it and everything else (weights, optimizer state,
metrics) replicated. The mesh, the two shardings, the host transfers and the batch-size rule they imply live
here, so that a different layout (e.g. a model axis) starts in this file rather than in each loop.
"""

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from resnext_jax.errors import ConfigError


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """Joins the other processes: explicit arguments, or JAX's cluster detection (TPU pod, SLURM, ...)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs: cross-process collectives
  if coordinator_address or num_processes or process_id is not None:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError):  # no cluster detected: a single process
      pass
  logging.info("Process %d of %d; %d local / %d global devices.", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def make_mesh(devices=None) -> Mesh:
  """One 'data' axis over all devices of all processes (pure data parallelism; params replicated)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def replicated(mesh) -> NamedSharding:
  """Whole on every device: weights, optimizer state, metrics and eval results."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  """Split along the leading (batch) dimension over the 'data' axis."""
  return NamedSharding(mesh, P("data"))


def abstract_replicated(shapes, mesh):
  """ShapeDtypeStructs (e.g. from jax.eval_shape) with replicated shardings: a target for jit or Orbax."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def to_host(tree):
  """Replicated (or host) arrays -> numpy, on every process (a replicated global array is whole on each)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x),
                      tree)


def from_host(batch: np.ndarray, mesh) -> jax.Array:
  """A host batch that every process holds whole -> a global array split over the 'data' axis."""
  return jax.make_array_from_callback(batch.shape, batch_sharded(mesh), lambda idx: batch[idx])


def check_batch_size(name: str, batch_size: int, mesh, multiple_of: int = 1) -> None:
  """Batches are split evenly over processes, devices (and micro-batches): say so instead of failing in XLA."""
  devices, processes = mesh.devices.size, jax.process_count()
  if batch_size > 0 and batch_size % (devices * multiple_of) == 0 and batch_size % processes == 0:
    return
  extra = f" x grad_accum_steps ({multiple_of})" if multiple_of > 1 else ""
  per_process = f" and by the number of processes ({processes})" if processes > 1 else ""
  raise ConfigError(f"config.{name}={batch_size} must be divisible by the number of devices ({devices}){extra}"
                    f"{per_process}")
