"""Data parallelism: one `data` mesh axis over every device of every process.

Parameters are replicated, batches are sharded along their leading axis. Each process feeds
only its own slice of the global batch (`host_batch_to_global`); `jax.jit` over the mesh turns
the mean-over-batch loss into an all-reduce of the gradients.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize`, with the coordinator
address, process count and id given explicitly (GPU/CPU clusters without auto-detection), or
without arguments where JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI).
"""

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

DATA_AXIS = "data"

# Environment variables through which `jax.distributed.initialize()` auto-detects a cluster,
# with the value that means "more than one process".
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _cluster_detected() -> bool:
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in tpu_hosts:
    return True
  for name in _CLUSTER_ENV[1:]:
    if int(os.environ.get(name, "1") or 1) > 1:
      return True
  return False


def check_distributed_args(coordinator_address: str, num_processes: int,
                           process_id: int) -> None:
  """Raises ValueError unless the arguments of `initialize_distributed` fit together."""
  if coordinator_address and (num_processes < 1 or not 0 <= process_id < num_processes):
    raise ValueError(
        f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < "
        f"--num_processes, got num_processes={num_processes}, process_id={process_id}.")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Starts JAX's multi-process runtime when the run spans several processes.

  Args:
    coordinator_address: "host:port" of process 0; empty for auto-detection / single process.
    num_processes: number of processes (with `coordinator_address`).
    process_id: this process's index (with `coordinator_address`).
  """
  check_distributed_args(coordinator_address, num_processes, process_id)
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """Returns a 1-D mesh with axis `data` over `devices` (default: all devices, all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that puts a full copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits the leading (batch) axis over the `data` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
  """Returns the per-process batch size; raises if the global batch does not divide evenly."""
  devices = mesh.devices.size
  if global_batch % devices:
    raise ValueError(
        f"train.batch_size={global_batch} must be a multiple of the device count {devices} "
        "(every device gets the same number of images).")
  return global_batch // jax.process_count()


def host_batch_to_global(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of a batch into global arrays sharded over `data`.

  Args:
    batch: this process's examples: arrays with leading dim B / process_count.
    mesh: the data mesh.

  Returns:
    The global batch: arrays with leading dim B, sharded along it.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (same values on every process) replicated on `mesh`."""
  sharding = replicated(mesh)

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)
