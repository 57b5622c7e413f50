"""A cross-process lock for the data caches (``fcntl.flock`` on a lock file beside the cache).

Two processes that find a cache missing at the same moment (two test workers, two training runs
started together on a fresh machine) must not both build it: they would share or rename onto each
other's temporary folders. The second one waits on the lock, then finds the cache ready.
"""

from __future__ import annotations

import contextlib
import fcntl
import os


@contextlib.contextmanager
def exclusive(lock_path: str):
  """Holds an exclusive lock on ``lock_path`` (created if missing, with its folder) for the block."""
  os.makedirs(os.path.dirname(lock_path) or ".", exist_ok=True)
  with open(lock_path, "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
