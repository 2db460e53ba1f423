"""Joining the processes of a multi-host run with `jax.distributed.initialize()`.

Every host runs the same command. The coordinator comes from the config
(`--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I`); on Cloud TPU pods and SLURM clusters JAX finds it by itself
(`distributed.auto`, on by default, initialises when such an environment is detected).
"""

from __future__ import annotations

import os
from typing import Any

import jax

from configs.errors import ConfigError, check_int

# Environment variables that mark a multi-host environment JAX's cluster detection understands
# (TPU_WORKER_HOSTNAMES only when it lists several hosts: one host needs no coordinator).
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID")


def validate(d: Any) -> None:
  if d.coordinator_address:
    if ":" not in d.coordinator_address:
      raise ConfigError("distributed.coordinator_address", d.coordinator_address, allowed="HOST:PORT")
    check_int("distributed.num_processes", d.num_processes, minimum=1)
    check_int("distributed.process_id", d.process_id, minimum=0)
    if d.process_id >= d.num_processes:
      raise ConfigError("distributed.process_id", d.process_id,
                        allowed=f"0..{d.num_processes - 1} (distributed.num_processes={d.num_processes})")


def initialize(d: Any) -> bool:
  """Join the other processes if the config or the environment asks for it; True when joined.
  Safe to call more than once."""
  validate(d)
  if jax.distributed.is_initialized():
    return True
  if d.coordinator_address:
    jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id,
                               initialization_timeout=d.timeout_s)
    return True
  multi_host_env = any(os.environ.get(v) for v in _CLUSTER_ENV) and os.environ.get(
      "SLURM_NTASKS", "2") != "1" and "," in os.environ.get("TPU_WORKER_HOSTNAMES", ",")
  if d.auto and multi_host_env:
    jax.distributed.initialize(initialization_timeout=d.timeout_s)
    return True
  return False
