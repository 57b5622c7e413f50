#!/usr/bin/env python3
r"""Starts N processes of one multi-controller JAX job on 127.0.0.1, each with CPU devices.

The same code path as a cluster: every process runs the same command, joins through
``jax.distributed.initialize`` (coordinator 127.0.0.1:PORT, set by MVHAN_COORDINATOR_ADDRESS /
MVHAN_NUM_PROCESSES / MVHAN_PROCESS_ID, read by mvhan_jax/distributed.py), sees
``--devices_per_process`` CPU devices and trains on the global mesh of all of them.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \
      -m mvhan_jax.main --config=experiments/configs/two_tower_synthetic.py:smoke --workdir=runs/mp

Everything after ``--`` is passed to the Python interpreter of each process. ``--dry-run`` prints the
commands (with their environment) instead of running them. Exits with the first non-zero exit code;
when one process fails the others are stopped (SIGTERM, then SIGKILL after ``--grace_s``: JAX treats
SIGTERM as a preemption notice and keeps running, and a survivor would otherwise wait in a collective
or the shutdown barrier). SIGTERM / SIGINT to the launcher stop the processes the same way.

The caller's ``XLA_FLAGS`` are kept (the device count is appended). On a loaded machine raise the
timeout of the CPU collectives (gloo; 30 s by default), e.g.
``XLA_FLAGS=--xla_cpu_collective_timeout_seconds=600 python launch/local_multiprocess.py ...``; the
30 s a new gloo communicator has to connect its ranks is fixed, so an overloaded machine can still
fail a job at its first step ('Gloo context initialization failed'): relaunch it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(i: int, n: int, port: int, devices: int, base: dict | None = None) -> dict:
  env = dict(os.environ if base is None else base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
      "MVHAN_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "MVHAN_NUM_PROCESSES": str(n),
      "MVHAN_PROCESS_ID": str(i),
  })
  return env


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--log_dir", default=None, help="write process i's output to <log_dir>/process_<i>.log")
  parser.add_argument("--grace_s", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL when stopping")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
  parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the python arguments of each process")
  args = parser.parse_args(argv)
  cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
  if not cmd:
    parser.error("give the command after --, e.g. -- -m mvhan_jax.main --config=... --workdir=...")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  port = args.port or free_port()
  n = args.num_processes
  keys = ("JAX_PLATFORMS", "XLA_FLAGS", "MVHAN_COORDINATOR_ADDRESS", "MVHAN_NUM_PROCESSES", "MVHAN_PROCESS_ID")
  if args.dry_run:
    for i in range(n):
      env = process_env(i, n, port, args.devices_per_process)
      print(" ".join(f"{k}={shlex.quote(env[k])}" for k in keys), shlex.join([sys.executable, *cmd]), "&")
    print("wait")
    return 0
  procs, logs = [], []
  for i in range(n):
    out = None
    if args.log_dir:
      os.makedirs(args.log_dir, exist_ok=True)
      out = open(os.path.join(args.log_dir, f"process_{i}.log"), "w")  # pylint: disable=consider-using-with
      logs.append(out)
    procs.append(subprocess.Popen([sys.executable, *cmd], env=process_env(i, n, port, args.devices_per_process),
                                  stdout=out, stderr=subprocess.STDOUT if out else None))
  stop = []
  def on_signal(signum, frame):  # pylint: disable=unused-argument
    stop.append(-signum)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, on_signal)
  code = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)] + stop
      if failed:
        code = failed[0]
        stop_all(procs, args.grace_s)  # the survivors would wait in a collective or the shutdown barrier
        break
      time.sleep(0.2)
    for p in procs:
      p.wait()
  finally:
    for f in logs:
      f.close()
  return code or next((p.returncode for p in procs if p.returncode), 0)


def stop_all(procs, grace_s: float) -> None:
  """SIGTERM to every running process, SIGKILL to those still running ``grace_s`` later."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.time() + grace_s
  while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()


if __name__ == "__main__":
  sys.exit(main())
