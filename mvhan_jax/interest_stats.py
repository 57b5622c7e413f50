"""What a multi-interest user tower's K vectors do at serving time (numpy, per user).

The quantities ``experiments/interest_probe.py`` reports to explain a multi-interest model that does
not beat its single-vector twin: whether the live interests collapse onto one direction, how many of
them own any item of the merged top-k list, and which interest the target is closest to. Scores are
inner products (the towers' vectors are already L2-normalised when the model scores by cosine).
"""

from __future__ import annotations

import numpy as np


def _check(interests, mask) -> tuple[np.ndarray, np.ndarray]:
  interests = np.asarray(interests, np.float64)
  mask = np.asarray(mask, bool)
  if interests.ndim != 3 or mask.shape != interests.shape[:2]:
    raise ValueError(f"interests must be [Q, K, D] and mask [Q, K], got {interests.shape} and {mask.shape}")
  if not mask.any(axis=1).all():
    raise ValueError("every user needs at least one live interest (mask row of all False)")
  return interests, mask


def live_pairwise_cosine(interests, mask) -> np.ndarray:
  """Mean cosine over the pairs of a user's live interests, float [Q]; NaN with fewer than 2 live.

  1.0 means the interests collapsed onto one direction (the union readout is then MIND-1 with extra
  cost); values near 0 mean they point at different parts of the catalogue.
  """
  x, m = _check(interests, mask)
  unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  cos = np.einsum("qkd,qjd->qkj", unit, unit)
  pair = m[:, :, None] & m[:, None, :] & ~np.eye(x.shape[1], dtype=bool)[None]
  n = pair.sum(axis=(1, 2))
  total = np.where(pair, cos, 0.0).sum(axis=(1, 2))
  return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def owner(interests, mask, items, ids) -> np.ndarray:
  """Index of the live interest that scores each given item highest: ids int [Q, n] -> int [Q, n]
  (the interest through which the union readout, a max over interests, ranks that item)."""
  x, m = _check(interests, mask)
  ids = np.asarray(ids)
  vec = np.asarray(items, np.float64)[ids]  # [Q, n, D]
  scores = np.einsum("qkd,qnd->qnk", x, vec)
  scores = np.where(m[:, None, :], scores, -np.inf)
  return scores.argmax(axis=-1)


def owners_in_topk(interests, mask, items, topk_ids) -> np.ndarray:
  """Number of distinct interests owning at least one item of each user's merged top-k, int [Q]."""
  own = owner(interests, mask, items, topk_ids)
  K = np.asarray(mask).shape[1]
  counts = np.zeros((own.shape[0], K), bool)
  np.put_along_axis(counts, own, True, axis=1)
  return counts.sum(axis=1)


def bucket_means(values, buckets) -> dict[object, tuple[float, int]]:
  """Mean of ``values`` [Q] within each distinct value of ``buckets`` [Q]: {bucket: (mean, count)}."""
  values, buckets = np.asarray(values, np.float64), np.asarray(buckets)
  return {b.item() if hasattr(b, "item") else b: (float(values[buckets == b].mean()), int((buckets == b).sum()))
          for b in np.unique(buckets)}
