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

When one process of a job dies the others wait for it: in a gloo collective (up to
``--xla_cpu_collective_timeout_seconds``), or, when the collective fails on the closed connection,
in JAX's shutdown barrier; JAX's coordination service ends them with a C++ abort after its heartbeat
timeout (100 s by default; 67-88 s measured) under a page of errors that name neither the step to
resume from nor, plainly, the cause. So in a multi-process run `PeerWatch` beats into the
coordination service's key-value store and watches the other processes' beats: a process silent for
``MVHAN_PEER_TIMEOUT_S`` seconds (default 30; 0: off), or gone with an error, ends the others
within about that time with one line naming it and the step a rerun resumes from (exit status 75).
JAX's own heartbeat timeout becomes four times that: the backstop that needs no Python (a process that
holds the GIL longer than the timeout looks dead to the others: raise it then). The death of
process 0 (the coordination service) JAX itself reports at once, with its abort.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import os
import sys
import threading
import time
from typing import Callable, Mapping

from absl import logging
import jax

from mvhan_jax import errors

ENV_ADDRESS = ("MVHAN_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
ENV_NUM = "MVHAN_NUM_PROCESSES"
ENV_ID = "MVHAN_PROCESS_ID"
ENV_PEER_TIMEOUT = "MVHAN_PEER_TIMEOUT_S"
DEFAULT_PEER_TIMEOUT_S = 30.0
EXIT_PEER_FAILED = 75  # EX_TEMPFAIL: rerunning the command is the remedy


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


def peer_timeout_s(env: Mapping[str, str] | None = None) -> float:
  env = os.environ if env is None else env
  return float(env.get(ENV_PEER_TIMEOUT) or DEFAULT_PEER_TIMEOUT_S)


def jax_heartbeat_timeout_s(peer_timeout: float) -> int:
  """JAX's own heartbeat timeout for a run whose `PeerWatch` uses ``peer_timeout``: four times ours
  (120 s at the default 30 s; JAX's default is 100 s), at least 10 s."""
  return max(10, int(4 * peer_timeout))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, platform: str | None = None, workdir=None) -> Plan:
  """Joins the multi-controller job described by the arguments/environment (see `plan`) and watches
  the other processes (`PeerWatch`); ``workdir`` names the step a rerun resumes from."""
  p = plan(coordinator_address, num_processes, process_id, platform)
  if p.mode != "single":
    timeout = peer_timeout_s()
    # JAX's heartbeat stays the backstop (it needs no GIL), far enough behind ours that ours speaks
    # first on a loaded machine too (at twice ours, CI once saw JAX's abort win).
    kwargs = dict(p.kwargs, heartbeat_timeout_seconds=jax_heartbeat_timeout_s(timeout)) if timeout > 0 else p.kwargs
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", p.mode,
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    if timeout > 0 and jax.process_count() > 1:
      from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
      PeerWatch(jax_distributed.global_state.client, jax.process_index(), jax.process_count(), timeout,
                workdir).start()
  return p


def latest_checkpoint(workdir) -> tuple[int, str] | None:
  """(step, path) of the newest finalized checkpoint of any stage of ``workdir``
  (``checkpoints/<step>``, ``<stage>/checkpoints/<step>``), or None."""
  from mvhan_jax import workdir as wd  # pylint: disable=import-outside-toplevel
  found = []
  try:
    root = wd.path(workdir)
    for ckpts in [root / "checkpoints", *root.glob("*/checkpoints")]:
      if ckpts.is_dir():
        # orbax writes '<step>.orbax-checkpoint-tmp*' and renames it once every process has written.
        found += [(d.stat().mtime, int(d.name), str(d)) for d in ckpts.iterdir() if d.name.isdigit()]
  except Exception:  # pylint: disable=broad-except
    return None  # only a hint in a failure message
  return max(found)[1:] if found else None


def resume_hint(workdir) -> str:
  if workdir is None:
    return "rerun the same command to resume from the latest checkpoint"
  latest = latest_checkpoint(workdir)
  if latest is None:
    return "rerun the same command to start again (no checkpoint was saved yet)"
  return f"rerun the same command to resume from step {latest[0]} (the latest checkpoint, {latest[1]})"


# Errors of a collective or of the coordination service: a symptom of another process's death.
_LOST_PEER = ("gloo", "connection reset", "connection closed", "connection refused", "heartbeat",
              "coordination service", "barrier", "deadline_exceeded", "unavailable")


class PeerWatch(threading.Thread):
  """Beats into the coordination service's key-value store and ends this process when another one
  is gone (see the module docstring).

  Each process's key holds 'beat <n>' while it runs, 'exit' once it exits normally (it then waits
  in JAX's shutdown barrier: no longer watched), 'fail <error>' when it raised (it then leaves at
  once, so the others' collectives fail instead of waiting), or 'gone <why>' when it left because
  of another. A process whose beat stops changing for ``timeout_s`` is dead. An uncaught exception
  that looks like a collective error (`_LOST_PEER`) first waits, up to ``timeout_s``, for a peer to
  be found silent for a few beats, to name it.

  ``check`` is the decision, on (values, monotonic time); ``run`` does the I/O.
  """

  PREFIX = "mvhan/peer/"
  LEAVE_PUBLISH_S = 5.0  # the longest `leave` waits to publish why it leaves

  def __init__(self, client, process_id: int, num_processes: int, timeout_s: float, workdir=None,
               exit_fn: Callable[[int], None] = os._exit):  # pylint: disable=protected-access
    super().__init__(name="mvhan-peer-watch", daemon=True)
    self.client, self.me, self.n, self.timeout_s, self.workdir = client, process_id, num_processes, timeout_s, workdir
    self.exit_fn = exit_fn
    self.interval = min(5.0, max(0.5, timeout_s / 10))
    self.threshold = timeout_s       # silence that makes a peer dead; a few beats once we saw an error
    self.status = None               # None: beating; else 'exit' | 'fail ...' | 'gone ...'
    self.longest_silence = (0.0, None)  # (seconds, process)
    self._beat = 0
    self._seen = {j: (None, time.monotonic()) for j in range(num_processes) if j != process_id}
    self._lock = threading.Lock()

  def check(self, values: Mapping[int, str], now: float) -> str | None:
    """Why this process must stop (a sentence naming the other process), or None."""
    dead, failed, gone = [], [], []
    for j, (last, since) in list(self._seen.items()):
      value = values.get(j)
      if value != last:
        self._seen[j] = (value, now)
        since = now
      kind, _, why = (value or "").partition(" ")
      if kind == "exit":
        continue
      if kind == "fail":
        failed.append(f"process {j} of {self.n} failed ({why})")
      elif kind == "gone":
        gone.append(f"process {j} of {self.n} left the job ({why})")
      else:
        if now - since > self.longest_silence[0]:
          self.longest_silence = (now - since, j)
        if now - since >= self.threshold:
          dead.append(f"process {j} of {self.n} stopped responding (no heartbeat for {now - since:.0f} s: killed, "
                      "crashed or its host is gone)")
    reasons = dead or failed or gone  # the root cause first: the others' errors follow from it
    return "; ".join(reasons) if reasons else None

  def publish(self, status: str | None = None) -> dict[int, str] | None:
    """Sets this process's key (to ``status``, or the next beat) and returns every process's, or None
    once this process has exited normally (JAX then shuts its client down: no more calls)."""
    with self._lock:
      if status is None and self.status == "exit":
        return None
      if status is not None:
        self.status = status
      self._beat += 1
      self.client.key_value_set(f"{self.PREFIX}{self.me}", self.status or f"beat {self._beat}",
                                allow_overwrite=True)
      return {int(k.rsplit("/", 1)[1]): v for k, v in self.client.key_value_dir_get(self.PREFIX)}

  def leave(self, reason: str, code: int = EXIT_PEER_FAILED) -> None:
    # Tell the others why (so a third process names the root cause), but never wait long on the
    # coordination service to do so: JAX's backstop abort must not overtake this exit.
    def tell():
      try:
        self.publish(f"gone after {reason}")
      except Exception:  # pylint: disable=broad-except
        pass
    teller = threading.Thread(target=tell, name="mvhan-peer-leave", daemon=True)
    teller.start()
    teller.join(self.LEAVE_PUBLISH_S)
    print(f"mvhan_jax.distributed: {reason}; process {self.me} of {self.n} stops too instead of waiting in a "
          f"collective (exit status {code}): {resume_hint(self.workdir)}.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    self.exit_fn(code)

  def start(self) -> None:
    self.publish()
    self._previous_hook = sys.excepthook
    sys.excepthook = self._excepthook
    atexit.register(self._atexit)  # runs before JAX's own atexit shutdown (registered at import)
    super().start()

  def run(self) -> None:
    while True:
      time.sleep(self.interval)
      try:
        values = self.publish()
      except Exception:  # pylint: disable=broad-except
        continue  # the coordination service is gone: JAX ends this process itself
      if values is None:
        return  # exited normally: JAX's shutdown barrier and heartbeat take over
      reason = self.check(values, time.monotonic())
      if reason:
        self.leave(reason)
        return

  def _excepthook(self, exc_type, exc, tb) -> None:
    text = f"{exc_type.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    if any(s in str(exc).lower() for s in _LOST_PEER):
      self._previous_hook(exc_type, exc, tb)
      # Another process probably died: name it once it has missed a few beats (its peers keep beating).
      self.threshold = min(self.timeout_s, 3 * self.interval + 1)
      self.join(self.timeout_s)
      self.leave(f"a collective failed ({text}) and no other process was found dead")
    else:
      try:
        self.publish(f"fail {text}")
      except Exception:  # pylint: disable=broad-except
        pass
      self._previous_hook(exc_type, exc, tb)
      sys.stderr.flush()
      sys.stdout.flush()
      # Not JAX's shutdown barrier: the others wait for this process in a collective until it leaves.
      self.exit_fn(1)

  def _atexit(self) -> None:
    if self.status is None:
      # How close a healthy run came to the timeout (a beat interval is normal).
      logging.info("peer watch: longest silence of another process seen %.1f s (timeout %.0f s)",
                   self.longest_silence[0], self.timeout_s)
      try:
        self.publish("exit")
      except Exception:  # pylint: disable=broad-except
        pass
