"""Device mesh, shardings, placing host data on the mesh, multi-host initialisation.

Data parallelism: one mesh axis ('data') over every device of every process.
Batches are global `jax.Array`s sharded along their leading (batch) axis
(`batch_sharding`); the train state and everything small is replicated
(`replicated_sharding`).  Every NamedSharding of the project is made here.

Host <-> device: `place` / `place_padded` put a host array on the mesh (every
process holds the whole array and hands out its own slices, so this works when
the mesh spans several processes); `shard_host_batch` assembles a global batch from
each process's share; `to_numpy` brings any array back, gathering a global array
that spans several processes.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def check_batch_size(batch_size: int, num_devices: int) -> None:
  """A global batch that splits evenly over the devices and the processes."""
  if batch_size < 1 or batch_size % num_devices:
    raise ValueError(f'batch size {batch_size} must be a positive multiple of the '
                     f'number of devices ({num_devices})')
  if batch_size % jax.process_count():
    raise ValueError(f'batch size {batch_size} must be divisible by the number of '
                     f'processes ({jax.process_count()})')


def create_mesh(devices=None, axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (axis_name,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the mesh's data axis, the rest replicated."""
  return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """The whole array on every device of the mesh."""
  return NamedSharding(mesh, P())


def shard_host_batch(mesh: Mesh, tree):
  """Turns this process's numpy batch (a pytree) into global arrays.

  Each process passes its own share of the global batch (leading axis = global
  batch / process count); the result is a global array sharded along the batch.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_numpy(x) -> np.ndarray:
  """Host copy of an array; a global array spanning several processes is gathered."""
  if isinstance(x, jax.Array):
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def pad_rows(x: np.ndarray, num_rows: int, value=0) -> np.ndarray:
  """Pads the leading axis of `x` to `num_rows` with `value`."""
  if x.shape[0] == num_rows:
    return x
  pad = np.full((num_rows - x.shape[0],) + x.shape[1:], value, dtype=x.dtype)
  return np.concatenate([x, pad], axis=0)


def place(x: np.ndarray, mesh: Mesh | None, spec: P = P()) -> jax.Array:
  """Puts a host array on the default device, or on `mesh` with partition `spec`."""
  if mesh is None:
    return jnp.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                      lambda index: x[index])


def place_padded(x: np.ndarray, num_rows: int, value, mesh: Mesh | None,
                 spec: P) -> jax.Array:
  """`place` of `x` padded to `num_rows` rows, without a padded host copy.

  A kNN bank can be most of the host's memory (ImageNet: 1.28M x 2048 float32 =
  10 GB), so the padding is added on device or per shard.
  """
  if mesh is None:
    pad = [(0, num_rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(jnp.asarray(x), pad, constant_values=value)

  def shard(index):
    start, stop, _ = index[0].indices(num_rows)
    block = x[min(start, x.shape[0]):min(stop, x.shape[0])]
    return pad_rows(block, stop - start, value)[(slice(None),) + tuple(index[1:])]

  return jax.make_array_from_callback((num_rows,) + x.shape[1:], NamedSharding(mesh, spec),
                                      shard)


def _multiprocess_environment() -> bool:
  """True where a launcher has started this process as one of several.

  Only launchers whose settings jax.distributed.initialize() reads by itself: a
  SLURM job step of several tasks (inside `srun`; the batch script's own shell is
  not a step), Open MPI's `mpirun` of several ranks, and TPU slices on GKE
  (TPU_WORKER_HOSTNAMES lists several hosts).  Cloud TPU VM slices announce
  themselves only through the metadata server: pass `force=True` there.
  """
  env = os.environ
  return bool(
      ('SLURM_STEP_NODELIST' in env and
       int(env.get('SLURM_STEP_NUM_TASKS', env.get('SLURM_NTASKS', '1'))) > 1)
      or ('OMPI_MCA_orte_hnp_uri' in env and int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1)
      or ',' in env.get('TPU_WORKER_HOSTNAMES', ''))


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, *,
                           force=None) -> bool:
  """jax.distributed.initialize when this is one of several processes; else a no-op.

  Call it before anything touches a JAX device.  First match wins:

  * `force=False`: never (one process).
  * An address or a process count/id given -- as arguments (main.py's
    --coordinator_address, --num_processes, --process_id) or as $JAX_COORDINATOR_ADDRESS,
    $JAX_NUM_PROCESSES, $JAX_PROCESS_ID: those values; the count and the id go
    together, and what is left unset comes from JAX's cluster detection.
  * `force=True`: jax.distributed.initialize() on JAX's cluster detection alone
    (Cloud TPU VMs and GKE, SLURM, Open MPI, Kubernetes).
  * Otherwise the same where `_multiprocess_environment()` recognises a
    multi-process launch, so that a plain single-process run never waits on a
    cluster service.

  Returns whether jax.distributed was initialised.  Across processes on CPU, JAX's
  default collectives (gloo) are used.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS')
  if num_processes is None and env.get('JAX_NUM_PROCESSES'):
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and env.get('JAX_PROCESS_ID'):
    process_id = int(env['JAX_PROCESS_ID'])
  if force is False:
    return False
  if coordinator_address is not None or num_processes is not None or process_id is not None:
    if (num_processes is None) != (process_id is None):
      raise ValueError('--num_processes and --process_id (or $JAX_NUM_PROCESSES and '
                       '$JAX_PROCESS_ID) go together')
    # What is still None (all but the address, or the address) is auto-detected.
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if force or _multiprocess_environment():
    jax.distributed.initialize()
    return True
  return False
