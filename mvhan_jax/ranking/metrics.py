"""Ranking metrics: AUC and GAUC (NumPy). AUC is `mvhan_jax.evaluation.auc`, the one implementation."""

from __future__ import annotations

import numpy as np

from mvhan_jax.evaluation import auc


def gauc(labels, scores, groups) -> float:
  """Group AUC: the AUC of every group (user) with both classes, weighted by its impressions.

  ``GAUC = sum_u n_u AUC_u / sum_u n_u`` over users u with at least one positive and one negative
  (Zhou et al., DIN, KDD'18). NaN if no group qualifies.
  """
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  groups = np.asarray(groups)
  order = np.argsort(groups, kind="mergesort")
  g, lab, sc = groups[order], labels[order], scores[order]
  bounds = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1], [True]]))
  total, weight = 0.0, 0
  for a, b in zip(bounds[:-1], bounds[1:]):
    n_pos = int(lab[a:b].sum())
    if 0 < n_pos < b - a:
      total += (b - a) * auc(lab[a:b], sc[a:b])
      weight += b - a
  return total / weight if weight else float("nan")
