"""Multi-process runs: initialisation, the leader process, barriers.

The main job calls `initialize` before anything else touches JAX. With
explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`)
it starts `jax.distributed` with them; otherwise it asks JAX's own cluster
detection (Cloud TPU pods, SLURM, Open MPI, Kubernetes: the environments
`jax.distributed.initialize()` knows) whether this process is part of a
multi-host job, and initialises with JAX's auto-detected parameters if so.
On a single machine nothing is initialised.

Every process runs every stage (SPMD); only process 0, the leader, writes
shared files (stage markers, metrics, images, record shards), and processes
meet at `barrier`s around them.
"""

from __future__ import annotations

import os

from absl import logging
import jax
from jax.experimental import multihost_utils


def detected_cluster() -> str | None:
  """The name of the cluster environment JAX detects here, or None."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
  except ImportError:  # JAX moved it: fall back to the explicit flags.
    return None
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present():
        return env.__name__
    except Exception:  # pylint: disable=broad-except
      continue  # A probe that cannot run here means "not this cluster".
  return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> str | None:
  """Starts `jax.distributed` where the run is multi-process.

  Returns how it was started ("flags", a cluster name) or None.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and "
                       "--process_id")
    jax.distributed.initialize(coordinator_address, num_processes,
                               process_id)
    return "flags"
  if os.environ.get("MUSE_NO_DISTRIBUTED"):
    return None
  cluster = detected_cluster()
  if cluster is None:
    return None
  logging.info("initialising jax.distributed for %s", cluster)
  jax.distributed.initialize()
  return cluster


def is_leader() -> bool:
  """Whether this process writes the shared files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def broadcast_from_leader(value: int) -> int:
  """The leader's value of an int, on every process."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(value))
