"""Results tables: one row per model, mean ± std over seeds, the command that produced them."""

from __future__ import annotations

import platform
from typing import Mapping, Sequence

import numpy as np


def mean_std_table(rows: Mapping[str, Sequence[Mapping[str, float]]], metrics: Sequence[str]) -> str:
  """A markdown table. ``rows``: model name -> one metrics dict per seed (in order)."""
  lines = ["| model | " + " | ".join(metrics) + " | seeds |", "|---" * (len(metrics) + 2) + "|"]
  for name, runs in rows.items():
    cells = []
    for m in metrics:
      vals = np.array([r[m] for r in runs], np.float64)
      if np.all(np.isnan(vals)):  # a metric that does not apply to this model
        cells.append("n/a")
        continue
      # ddof=1: the spread of the seeds as a sample; one seed has no spread to show.
      cells.append(f"{vals.mean():.4f} ± {vals.std(ddof=1):.4f}" if len(vals) > 1 else f"{vals.mean():.4f}")
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
  return "\n".join(lines)


def write_markdown(path: str, text: str) -> None:
  """Writes a results file (creating its folder) and echoes it, as every table script does."""
  import os  # pylint: disable=import-outside-toplevel
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  print(text)


def machine_description() -> str:
  import os  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
          f"jax {jax.__version__} on {dev.platform} ({dev.device_kind})")
