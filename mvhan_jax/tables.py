"""Markdown results tables: one row per model, mean ± std over seeds (used by the CLI and the table
scripts; a leaf module, so tasks and report both import it)."""

from __future__ import annotations

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
