"""Data parallelism: a 1-D ('data',) device mesh, batch sharding, and multi-host start-up.

`jax.jit` over this mesh replaces `pmap`: the batch is split along its first axis with a
`NamedSharding`, the train state is replicated, and XLA inserts the gradient all-reduce. The same
code runs on one CPU, several GPUs, a TPU slice and several hosts; BatchNorm sees the global batch.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from donuseg_jax import cli

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> None:
  """Joins a multi-process run when the environment asks for one (before any other JAX call).

  Set DONUSEG_COORDINATOR=host:port, DONUSEG_NUM_PROCESSES and DONUSEG_PROCESS_ID explicitly, or
  DONUSEG_DISTRIBUTED=auto to let JAX detect a cluster (Cloud TPU, SLURM, Open MPI).
  """
  if os.environ.get('DONUSEG_COORDINATOR'):
    if os.environ.get('DONUSEG_CPU_COLLECTIVES'):
      jax.config.update('jax_cpu_collectives_implementation', os.environ['DONUSEG_CPU_COLLECTIVES'])
    jax.distributed.initialize(
        coordinator_address=os.environ['DONUSEG_COORDINATOR'],
        num_processes=int(os.environ['DONUSEG_NUM_PROCESSES']),
        process_id=int(os.environ['DONUSEG_PROCESS_ID']))
  elif os.environ.get('DONUSEG_DISTRIBUTED') == 'auto':
    jax.distributed.initialize()


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device of every process (or the given ones)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
  if global_batch % mesh.size:
    raise cli.UsageError(
        f'batch size {global_batch} does not divide over {mesh.size} devices; '
        f'set --config.data.batch_size to a multiple of {mesh.size}')


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles the global batch from this process's rows (all rows on a single process)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
