"""Several JAX processes (hosts) running one program on one global mesh.

Every process runs the same stages in the same order (SPMD); jitted steps
span all devices.  What differs per host, and how it is kept consistent:

  * inputs: every host holds the same global batch on the host and places the
    shards its own devices need (`global_array`, from `make_array_from_callback`);
  * outputs: gathered to every host (`to_host`, `process_allgather`);
  * host work that scales with hosts (the verifier): each host takes every
    P-th item (`split_map`) and the results are exchanged, so all hosts end
    with the same values in the same order;
  * files: written by process 0 only (`is_writer`); the run directory must be
    one filesystem every host sees (NFS / Filestore, or a gcsfuse mount), and
    every host reads back what process 0 wrote when a run resumes.

With one process all of these are the plain single-host operations.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Joins the processes of a run (before any other JAX call).

  Explicit settings (flags of `restem_jax.main`) win; else JAX_COORDINATOR_ADDRESS /
  JAX_NUM_PROCESSES / JAX_PROCESS_ID; on Cloud TPU VM slices and SLURM / Open MPI
  clusters JAX finds them itself.  One process and no cluster: nothing to do.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(env.get("JAX_NUM_PROCESSES", "0"))
  process_id = process_id if process_id >= 0 else int(env.get("JAX_PROCESS_ID", "-1"))
  cluster = "TPU_WORKER_HOSTNAMES" in env or int(env.get("SLURM_NTASKS", "1")) > 1 \
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  if num_processes <= 1 and not cluster:
    return
  if num_processes > 1 and (not coordinator_address or process_id < 0):
    raise ValueError(f"{num_processes} processes: give --coordinator_address=HOST:PORT and "
                     "--process_id (0 .. num_processes-1) too")
  if num_processes > 1 and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id {process_id} is outside 0..{num_processes - 1}")
  # CPU processes exchange arrays through gloo (TPU / GPU use their own interconnect)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id) if num_processes > 1 else {}
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d: %d local devices, %d in all", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_writer() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def global_array(x: np.ndarray, sharding) -> jax.Array:
  """A global jax.Array of the host value `x` (the same on every host), each
  host placing only the shards of its own devices."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x) -> np.ndarray:
  """The whole value of a (possibly multi-host) jax.Array as numpy, on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def allgather_json(obj) -> list:
  """[each process's `obj`] (JSON-serialisable), in process order, on every host."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([data.size], np.int64))
  width = int(np.max(sizes))
  padded = np.zeros(width, np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(rows[i, :int(sizes[i][0])].tobytes()) for i in range(rows.shape[0])]


def split_map(fn: Callable[[Sequence], list], items: Sequence, encode=lambda x: x,
              decode=lambda x: x) -> list:
  """fn(items) computed with the work split over hosts: host p takes items
  p, p+P, ...; the results (`encode`d to JSON values and `decode`d back) are
  exchanged, so every host returns the full list in order."""
  p, n = jax.process_index(), jax.process_count()
  if n == 1:
    return list(fn(items))
  mine = [encode(x) for x in fn(items[p::n])]
  shares = allgather_json(mine)
  out = [None] * len(items)
  for q, share in enumerate(shares):
    out[q::n] = [decode(x) for x in share]
  return out
