"""Where training metrics go: a JSON-lines log (the source of truth for plots) and TensorBoard.

TensorBoard event files are written with tensorboardX, which needs no TensorFlow (clu's writers do).
"""

from __future__ import annotations

import json
import os
from typing import Mapping


class MetricsWriter:
  """Appends ``{"step": s, **metrics}`` lines to ``<workdir>/metrics.jsonl`` and TensorBoard scalars.

  On resume, ``truncate_after(step)`` drops the lines written after the checkpoint the run restarts
  from, so the log of a resumed run equals the log of an uninterrupted one.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
          self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # optional: the JSON log stays complete without it
          self._tb = None

  def truncate_after(self, step: int) -> None:
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w") as f:
      f.writelines(kept)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
