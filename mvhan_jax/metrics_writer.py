"""Where training metrics go: a JSON-lines log (the source of truth for plots) and TensorBoard.

TensorBoard event files are written with tensorboardX, which needs no TensorFlow (clu's writers do).
The workdir may be remote (``gs://...``, see `mvhan_jax.workdir`): object stores cannot append, so
there the log is kept in memory and rewritten whole at every write (a few hundred bytes a row), and
the event files are written to a local folder and copied to ``<workdir>/tb`` by ``flush``, ``close``
and every ``tb_sync_s`` seconds of ``write``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Mapping

from mvhan_jax import workdir as workdir_lib


class MetricsWriter:
  """Appends ``{"step": s, **metrics}`` lines to ``<workdir>/metrics.jsonl`` and TensorBoard scalars.

  On resume, ``truncate_after(step)`` drops the lines written after the checkpoint the run restarts
  from, so the log of a resumed run equals the log of an uninterrupted one.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, tb_sync_s: float = 120.0):
    self.path = os.fspath(workdir_lib.path(workdir) / "metrics.jsonl")
    self.enabled = enabled
    self._remote = not workdir_lib.is_local(workdir)
    self._lines = None  # remote only: the whole log, loaded at the first write or truncation
    self._tb = None
    self._tb_dir = workdir_lib.path(workdir) / "tb"
    self._tb_stage = None  # remote only: the local folder tensorboardX writes into
    self._tb_sync_s = tb_sync_s
    self._tb_synced = time.monotonic()
    if enabled:
      workdir_lib.makedirs(workdir)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
          if self._remote:
            # tensorboardX reaches gs:// only through google-cloud-storage (no dependency here, and
            # not epath), so its files are staged locally and copied.
            self._tb_stage = tempfile.TemporaryDirectory(prefix="mvhan_tb_")
          self._tb = SummaryWriter(self._tb_stage.name if self._tb_stage else os.fspath(self._tb_dir))
        except ImportError:  # optional: the JSON log stays complete without it
          self._tb = None

  def _read_lines(self) -> list[str]:
    p = workdir_lib.path(self.path)
    return p.read_text().splitlines(keepends=True) if p.exists() else []

  def truncate_after(self, step: int) -> None:
    if not self.enabled:
      return
    p = workdir_lib.path(self.path)
    if not p.exists():
      self._lines = [] if self._remote else None
      return
    kept = [line for line in self._read_lines() if line.strip() and json.loads(line)["step"] <= step]
    if self._remote:
      self._lines = kept
      p.write_text("".join(kept))
    else:
      with open(self.path, "w") as f:
        f.writelines(kept)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(row) + "\n"
    if self._remote:
      if self._lines is None:
        self._lines = self._read_lines()
      self._lines.append(line)
      workdir_lib.path(self.path).write_text("".join(self._lines))
    else:
      with open(self.path, "a") as f:
        f.write(line)
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))
      if self._tb_stage is not None and time.monotonic() - self._tb_synced >= self._tb_sync_s:
        self._sync_tb()

  def _sync_tb(self) -> None:
    self._tb.flush()
    workdir_lib.copy_tree(self._tb_stage.name, self._tb_dir)
    self._tb_synced = time.monotonic()

  def flush(self) -> None:
    if self._tb is not None:
      if self._tb_stage is not None:
        self._sync_tb()
      else:
        self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      if self._tb_stage is not None:
        workdir_lib.copy_tree(self._tb_stage.name, self._tb_dir)
        self._tb_stage.cleanup()
        self._tb_stage = None
      self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  path = workdir_lib.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
