"""Device mesh, shardings and multi-host initialisation.

Data parallelism only for now: one mesh axis (`config.mesh_data_axis`, 'data') over
every device of every process.  Batches are global `jax.Array`s sharded along their
leading (batch) axis; the train state is replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def create_mesh(devices=None, axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (axis_name,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the mesh's data axis, the rest replicated."""
  return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_host_batch(mesh: Mesh, tree):
  """Turns this process's numpy batch (a pytree) into global arrays.

  Each process passes its own share of the global batch (leading axis = global
  batch / process count); the result is a global array sharded along the batch.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed.initialize when running on several hosts; a no-op otherwise.

  With an explicit coordinator address all three values are required; without
  one, JAX's cluster auto-detection (TPU pod slices, SLURM, ...) is used when it
  recognises the environment (JAX_COORDINATOR_ADDRESS / SLURM_* / TPU metadata).
  """
  import os
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError('--coordinator_address needs --num_processes and --process_id')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif (os.environ.get('JAX_COORDINATOR_ADDRESS') or
        int(os.environ.get('SLURM_NTASKS', '1')) > 1 or os.environ.get('TPU_WORKER_HOSTNAMES')):
    jax.distributed.initialize()
