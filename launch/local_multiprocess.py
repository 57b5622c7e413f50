#!/usr/bin/env python3
r"""Starts N processes of one multi-controller JAX job on 127.0.0.1, each with CPU devices.

The same code path as a cluster: every process runs the same command, joins through
``jax.distributed.initialize`` (coordinator 127.0.0.1:PORT, set by MVHAN_COORDINATOR_ADDRESS /
MVHAN_NUM_PROCESSES / MVHAN_PROCESS_ID, read by mvhan_jax/distributed.py), sees
``--devices_per_process`` CPU devices and trains on the global mesh of all of them.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \
      -m mvhan_jax.main --config=experiments/configs/two_tower_synthetic.py:smoke --workdir=runs/mp

Everything after ``--`` is passed to the Python interpreter of each process. ``--dry-run`` prints the
commands (with their environment) instead of running them. With ``--log_dir`` process i writes its
output to ``<log_dir>/process_<i>.log`` and its pid to ``<log_dir>/process_<i>.pid``.

When a process fails (a signal or a non-zero status) the launcher says which one failed first and
gives the others ``--grace_s`` to stop on their own: each notices within ``--peer_timeout_s``
(MVHAN_PEER_TIMEOUT_S, see mvhan_jax/distributed.py) and says which step a rerun resumes from;
those still running then are SIGKILLed. It exits with the first failure's status (128 + the signal
for a signal). SIGTERM / SIGINT to the launcher are passed on as SIGTERM (a preemption notice: the
processes save and exit), then SIGKILL after ``--grace_s``.

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


DEFAULT_PEER_TIMEOUT_S = 30.0  # mvhan_jax.distributed's (this script imports nothing of the package)


def process_env(i: int, n: int, port: int, devices: int, base: dict | None = None,
                peer_timeout_s: float | None = None) -> dict:
  env = dict(os.environ if base is None else base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
  env.update({
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
      "MVHAN_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "MVHAN_NUM_PROCESSES": str(n),
      "MVHAN_PROCESS_ID": str(i),
  })
  if peer_timeout_s is not None:
    env["MVHAN_PEER_TIMEOUT_S"] = f"{peer_timeout_s:g}"
  return env


def describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"was killed by signal {-returncode}"
  return f"exited with status {returncode}"


def exit_status(returncode: int) -> int:
  """A child's return code as a shell reports it (Popen gives -N for signal N)."""
  return 128 - returncode if returncode < 0 else returncode


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
  parser.add_argument("--log_dir", default=None,
                      help="write process i's output to <log_dir>/process_<i>.log, its pid to process_<i>.pid")
  parser.add_argument("--peer_timeout_s", type=float,
                      default=float(os.environ.get("MVHAN_PEER_TIMEOUT_S") or DEFAULT_PEER_TIMEOUT_S),
                      help="a process silent this long is dead to the others (sets MVHAN_PEER_TIMEOUT_S; 0: off)")
  parser.add_argument("--grace_s", type=float, default=None,
                      help="seconds the others get to stop on their own once one failed, or between SIGTERM and "
                           "SIGKILL when the launcher is stopped (default: peer timeout + 30)")
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
  grace_s = args.peer_timeout_s + 30 if args.grace_s is None else args.grace_s
  keys = ("JAX_PLATFORMS", "XLA_FLAGS", "MVHAN_COORDINATOR_ADDRESS", "MVHAN_NUM_PROCESSES", "MVHAN_PROCESS_ID",
          "MVHAN_PEER_TIMEOUT_S")
  if args.dry_run:
    for i in range(n):
      env = process_env(i, n, port, args.devices_per_process, peer_timeout_s=args.peer_timeout_s)
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
    procs.append(subprocess.Popen([sys.executable, *cmd],
                                  env=process_env(i, n, port, args.devices_per_process,
                                                  peer_timeout_s=args.peer_timeout_s),
                                  stdout=out, stderr=subprocess.STDOUT if out else None))
    if args.log_dir:
      with open(os.path.join(args.log_dir, f"process_{i}.pid"), "w") as f:
        f.write(f"{procs[-1].pid}\n")
  stop = []
  def on_signal(signum, frame):  # pylint: disable=unused-argument
    stop.append(-signum)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, on_signal)
  code, first = 0, None
  try:
    while True:
      codes = [p.poll() for p in procs]  # every one: any() would stop polling at the first one running
      if all(c is not None for c in codes):
        break
      if stop:
        code = stop[0]
        stop_all(procs, grace_s)
        break
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        first = failed[0]
        code = codes[first]
        print(f"local_multiprocess: process {first} (pid {procs[first].pid}) {describe(code)}, the first to fail; "
              f"the others get {grace_s:g} s to stop on their own (they notice within --peer_timeout_s="
              f"{args.peer_timeout_s:g}), then SIGKILL", file=sys.stderr, flush=True)
        # No SIGTERM first: it asks a JAX process to save a checkpoint, which needs every process.
        stop_all(procs, grace_s, terminate=False)
        break
      time.sleep(0.2)
    for p in procs:
      p.wait()
  finally:
    for f in logs:
      f.close()
  if first is not None:
    others = "; ".join(f"process {i} {describe(p.returncode)}" for i, p in enumerate(procs) if i != first)
    where = f" (the processes' logs in {args.log_dir} name its step)" if args.log_dir else ""
    print(f"local_multiprocess: the job failed: process {first} {describe(code)} first; {others}. Rerun the same "
          f"command to resume from the latest checkpoint{where}.", file=sys.stderr, flush=True)
  return exit_status(code or next((p.returncode for p in procs if p.returncode), 0))


def stop_all(procs, grace_s: float, terminate: bool = True) -> None:
  """SIGTERM to every running process (if ``terminate``), SIGKILL to those still running ``grace_s`` later."""
  for p in procs:
    if terminate and p.poll() is None:
      p.terminate()
  deadline = time.time() + grace_s
  while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()


if __name__ == "__main__":
  sys.exit(main())
