"""Markdown results tables: one row per model, mean ± std over seeds (used by the CLI and the table
scripts; a leaf module, so tasks and report both import it)."""

from __future__ import annotations

import datetime
import json
from typing import Any, Mapping, Sequence

import numpy as np

from mvhan_jax import workdir


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


# --------------------------------------------------------------------------------------------------
# Seed records: one committed JSON file per (row, seed) of a long-running table, so that a row whose
# seeds take hours each can be assembled from runs made on different machines, after the workdirs are
# gone. A record holds the run's full config, its results.json and where it ran.
# --------------------------------------------------------------------------------------------------
def write_seed_record(path: str, config_json: str, results: Mapping[str, Any], machine: str,
                      command: str) -> None:
  """Writes ``path`` whole (`workdir.write_json`: creating its folder, never half a file): the run's
  config (``config.to_json_best_effort()``), its results (what ``train_and_evaluate`` returned), the
  machine and the command that produced it."""
  record = {"command": command, "machine": machine,
            "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "config": json.loads(config_json), "results": results}
  workdir.write_json(path, record, indent=1, sort_keys=True)


def read_seed_record(path: str, config_json: str) -> dict[str, Any] | None:
  """The record at ``path`` when it exists and was made with exactly this config, else None.

  A record of another config (the row's config file changed since) is not used: the caller trains
  the seed again and overwrites it. Raises ValueError, naming the file, on a record that is not JSON
  or lacks its fields."""
  if not workdir.exists(path):
    return None
  try:
    record = workdir.read_json(path)
    config = record["config"]
    if not isinstance(record["results"], dict):
      raise TypeError("results is not an object")
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a seed record ({e!r}); delete it to train that seed again") from None
  if config != json.loads(config_json):
    return None
  return record
