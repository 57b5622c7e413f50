"""Ranking metrics: AUC and GAUC (NumPy)."""

from __future__ import annotations

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x`` with ties given their average rank."""
  order = np.argsort(x, kind="mergesort")
  xs = x[order]
  starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
  ends = np.concatenate([starts[1:], [len(xs)]])
  avg = (starts + ends + 1) / 2.0                                  # mean of ranks start+1 .. end
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat(avg, ends - starts)
  return ranks


def auc(labels, scores) -> float:
  """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg)); ties count 1/2; NaN if one class."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  n_pos = int(labels.sum())
  n_neg = len(labels) - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = _average_ranks(scores)
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


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
