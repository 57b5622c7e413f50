"""Keeping a CPU training step's memory in the process, so that no step page-faults.

XLA on CPU allocates each step's temporary buffer (tens to hundreds of MB: MV-HAN at batch 256 needs
74 MB) with the C library's malloc and frees it when the step ends. glibc serves a block above its
mmap threshold (at most 32 MB) or one larger than a thread arena's heap (64 MB) with a fresh
``mmap`` and returns it with ``munmap``, so every step touches new pages: the kernel faults and
zeroes each 4 KiB page again. MV-HAN's step at batch 256 took 18,212 minor faults and 30 ms of
system time per step (of a 64 ms step; experiments/results/bench/README.md, "Host memory").

`configure` takes both causes away:
- ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, <2 GiB>)``: the main arena grows with
  ``brk`` and keeps what is freed, so the next step reuses the same, already-mapped pages;
- ``jax_cpu_enable_async_dispatch=False``: a single-device CPU step runs on the calling (main)
  thread, whose allocations come from that main arena. With async dispatch it runs on a worker
  thread, whose arena serves blocks over 64 MB by ``mmap`` whatever the settings;
- `ready` before each step: a step whose inputs are still being copied in is run later by the
  thread that finishes the copy (a worker again), so the training loop waits for its batch (a copy
  of ~0.1-1 MB) before calling the step. On an accelerator `ready` does nothing.
Results are the same numbers (the computation does not change); the cost is that memory a process
once used is not returned to the system before it exits, which a training run reuses anyway. The
dispatch setting must come before JAX creates its CPU backend (the first array or jit call);
`configure` says so when it comes too late. Only glibc's malloc is changed (Linux); elsewhere the
allocator is left as it is.

Every entry point that trains calls it first (`mvhan-train`, the experiment and bench scripts);
``--noreuse_host_memory`` turns it off (before/after timings). A notebook calls
``host_memory.configure()`` before its first JAX computation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

from absl import flags
from absl import logging

# jax is imported in the functions: mvhan-train imports this module (for its flag) before it parses
# the command line, and a bad flag's one-line error should not wait for JAX.

flags.DEFINE_bool("reuse_host_memory", True, "Keep freed host memory in the process and run CPU steps on the "
                  "calling thread, so each step reuses the previous step's pages instead of page-faulting fresh "
                  "ones (mvhan_jax/host_memory.py); --noreuse_host_memory keeps the C library's and JAX's defaults.")

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest an int takes: never give the top of the heap back


@functools.lru_cache(maxsize=None)
def _glibc():
  """The process's glibc, or None (another C library, another system)."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc
  except (OSError, AttributeError):
    return None


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without the check: assume it is not too late
    return False


def _inline_cpu_steps() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return not jax.config.read("jax_cpu_enable_async_dispatch")


def ready(batch):
  """``batch`` (a pytree of jax.Arrays) once it is on its devices, when CPU steps run inline (see the
  module docstring); otherwise ``batch`` at once, its copy left to overlap the step."""
  import jax  # pylint: disable=import-outside-toplevel
  if _inline_cpu_steps():
    leaves = jax.tree.leaves(batch)
    if leaves and isinstance(leaves[0], jax.Array) and all(d.platform == "cpu" for d in leaves[0].devices()):
      return jax.block_until_ready(batch)
  return batch


def configure(enabled: bool | None = None) -> dict[str, str]:
  """Sets the allocator and CPU dispatch up as the module docstring says; returns what it did.

  ``enabled=None`` reads the ``--reuse_host_memory`` flag (True when flags are not parsed, e.g. in a
  notebook). False changes nothing. Safe to call more than once."""
  if enabled is None:
    enabled = flags.FLAGS.reuse_host_memory if flags.FLAGS.is_parsed() else True
  done = {"malloc": "unchanged", "cpu_dispatch": "unchanged"}
  if not enabled:
    return done
  import jax  # pylint: disable=import-outside-toplevel
  libc = _glibc()
  if libc is not None:
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    done["malloc"] = "glibc: no mmap, no trim" if ok else "glibc refused mallopt: unchanged"
  else:
    done["malloc"] = "not glibc: unchanged"
  if _backends_initialized():
    if jax.config.read("jax_cpu_enable_async_dispatch"):
      logging.warning("host_memory.configure() came after JAX created its backends: CPU steps keep async dispatch "
                      "(call it before the first JAX computation)")
      done["cpu_dispatch"] = "async (too late to change)"
  else:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    done["cpu_dispatch"] = "synchronous"
  return done
