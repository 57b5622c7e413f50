"""One place that decides how to call ``jax.distributed.initialize`` (multi-controller JAX).

Every process of a job runs the same program; this must run before anything touches a device.

  TPU VM / TPU slice on GKE      initialize()  with no arguments: JAX reads the TPU metadata
  SLURM (srun)                   initialize()  JAX reads SLURM_* (coordinator = first node)
  Kubernetes (JobSet / Indexed)  initialize()  JAX asks the API server (needs `pip install jax[k8s]`)
  anything else (GPU/CPU hosts)  initialize(coordinator_address, num_processes, process_id)
                                 from arguments or the env: MVHAN_COORDINATOR_ADDRESS,
                                 MVHAN_NUM_PROCESSES, MVHAN_PROCESS_ID (JAX_COORDINATOR_ADDRESS is
                                 used as the address when the count and id are given)
  one process                    nothing

`plan` is the pure decision (tested); `initialize` applies it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Mapping

from absl import logging
import jax

from mvhan_jax import errors

ENV_ADDRESS = ("MVHAN_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
ENV_NUM = "MVHAN_NUM_PROCESSES"
ENV_ID = "MVHAN_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Plan:
  mode: str                      # 'single' | 'tpu' | 'slurm' | 'kubernetes' | 'explicit'
  kwargs: dict                   # arguments for jax.distributed.initialize (mode != 'single')


class LaunchError(errors.UserError, ValueError):
  """Multi-process flags (or their environment variables) that do not describe one job."""


def _on_tpu(env: Mapping[str, str], platform: str | None) -> bool:
  if platform:
    return platform == "tpu"
  if "tpu" in env.get("JAX_PLATFORMS", ""):
    return True
  if any(k in env for k in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID")):
    return True
  return bool(glob.glob("/dev/accel[0-9]*"))


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, platform: str | None = None,
         env: Mapping[str, str] | None = None) -> Plan:
  """How this process should join the job.

  Explicit arguments win over the environment; explicit address/count/id must come together.
  """
  env = os.environ if env is None else env
  address = coordinator_address or env.get(ENV_ADDRESS[0]) or None
  num = num_processes if num_processes is not None else (int(env[ENV_NUM]) if env.get(ENV_NUM) else None)
  pid = process_id if process_id is not None else (int(env[ENV_ID]) if env.get(ENV_ID) else None)
  if num == 1:
    return Plan("single", {})
  if any(v is not None for v in (address, num, pid)):
    # JAX_COORDINATOR_ADDRESS only completes an explicit setup: JAX's own auto-detection reads it too.
    given = {"coordinator_address": address or env.get(ENV_ADDRESS[1]) or None, "num_processes": num,
             "process_id": pid}
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise LaunchError(f"multi-process run needs coordinator_address, num_processes and process_id; missing "
                        f"{missing}: pass --{missing[0]} (or set {ENV_ADDRESS[0]}, {ENV_NUM}, {ENV_ID})")
    if not 0 <= pid < num:
      raise LaunchError(f"process_id={pid} must be in [0, num_processes={num}): give each process its own "
                        f"--process_id in 0..{num - 1}")
    return Plan("explicit", given)
  if _on_tpu(env, platform):
    return Plan("tpu", {})
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return Plan("slurm", {})
  if "KUBERNETES_SERVICE_HOST" in env and ("JOB_COMPLETION_INDEX" in env or "JOBSET_NAME" in env):
    return Plan("kubernetes", {})
  return Plan("single", {})


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, platform: str | None = None) -> Plan:
  """Joins the multi-controller job described by the arguments/environment (see `plan`)."""
  p = plan(coordinator_address, num_processes, process_id, platform)
  if p.mode != "single":
    jax.distributed.initialize(**p.kwargs)
    logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", p.mode,
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return p
