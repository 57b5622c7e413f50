"""SEMINAR's losses: the three PSU objectives and the downstream BCE.

InfoNCE here is the standard form: cosine similarities divided by the temperature tau, then a
softmax cross-entropy with the positive as the label,
  L = -log( exp(s_pos / tau) / sum_c exp(s_c / tau) ).
The released SEMINAR code has two bugs that are NOT reproduced: its alignment loss multiplies the
similarities by tau instead of dividing (a near-uniform softmax that barely trains at tau = 0.05),
and its query-item relevance loss minimises the ratio pos / neg (which pushes the positive *down*).

Candidates that are the same item as the positive (accidental hits: lifelong sequences repeat
items) are masked out of the denominators.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import optax

from mvhan_jax.layers import l2_normalize

_MASKED = -1e9


def info_nce_from_logits(logits, labels, row_weight, candidate_mask=None):
  """Weighted mean over rows of softmax cross-entropy.

  logits [R, C] (already divided by tau), labels int [R], row_weight [R] (0 = row ignored),
  candidate_mask bool [R, C] (False = excluded from the denominator; the label column is always
  kept). Returns 0 when no row has weight.
  """
  if candidate_mask is not None:
    keep = candidate_mask | (jnp.arange(logits.shape[-1])[None, :] == labels[:, None])
    logits = jnp.where(keep, logits, _MASKED)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  w = row_weight.astype(logits.dtype)
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)


def symmetric_info_nce(a, b, tau: float, valid, ids=None):
  """Symmetric InfoNCE between two views a, b [N, d] of the same N objects (row n of a matches row
  n of b): 0.5 * (CE(a -> b) + CE(b -> a)) with logits cos(a_n, b_m) / tau over the valid rows.

  valid bool [N]; ids int [N] (optional): rows with the same id as the positive are masked out of
  the denominator (they are the same object).
  """
  n = a.shape[0]
  logits = l2_normalize(a) @ l2_normalize(b).T / tau                         # [N, N]
  cand = jnp.broadcast_to(valid[None, :], (n, n))
  if ids is not None:
    cand = cand & (ids[None, :] != ids[:, None])
  labels = jnp.arange(n)
  fwd = info_nce_from_logits(logits, labels, valid, cand)
  # Not cand.T: that would turn the column (candidate) validity into a row mask and let padded rows
  # of a in as negatives. The b -> a candidates are the valid rows of a, and the id mask is
  # symmetric, so the same mask serves both directions.
  bwd = info_nce_from_logits(logits.T, labels, valid, cand)
  return 0.5 * (fwd + bwd)


def alignment_loss(modal, tau: float, valid, ids=None):
  """PSU multi-modal alignment: mean over every modality pair (i < j) of `symmetric_info_nce`
  between the modality embeddings of the same positions.

  modal [N, M, d] (M >= 2), valid bool [N], ids int [N] or None.
  """
  m = modal.shape[1]
  pairs = list(itertools.combinations(range(m), 2))
  if not pairs:
    return jnp.zeros((), modal.dtype)
  return sum(symmetric_info_nce(modal[:, i], modal[:, j], tau, valid, ids) for i, j in pairs) / len(pairs)


def relevance_loss(query, item, has_query, valid, item_ids, tau: float):
  """PSU query-item relevance: per sequence, each search event's query against its own item
  (positive) and the items at the other valid positions of the sequence (negatives).

  query, item [B, L, d]; has_query, valid bool [B, L]; item_ids int [B, L]. Rows = search events.
  """
  logits = jnp.einsum("bld,bkd->blk", l2_normalize(query), l2_normalize(item)) / tau   # [B, L, L]
  b, length = valid.shape
  cand = valid[:, None, :] & (item_ids[:, None, :] != item_ids[:, :, None])
  labels = jnp.broadcast_to(jnp.arange(length), (b, length))
  rows = has_query & valid
  return info_nce_from_logits(logits.reshape(b * length, length), labels.reshape(-1), rows.reshape(-1),
                              cand.reshape(b * length, length))


def next_pair_loss(pred, pos_pair, neg_pair, valid):
  """PSU next (query, item) pair prediction: BCE of <pred_t, pair_{t+1}> (label 1) and
  <pred_t, negative pair_{t+1}> (label 0), mean over positions t whose successor is valid.

  pred, pos_pair, neg_pair [B, L, d]; valid bool [B, L] (positions of the window).
  """
  pos = jnp.einsum("bld,bld->bl", pred[:, :-1], pos_pair[:, 1:])
  neg = jnp.einsum("bld,bld->bl", pred[:, :-1], neg_pair[:, 1:])
  w = valid[:, 1:].astype(pred.dtype)
  per = (optax.sigmoid_binary_cross_entropy(pos, jnp.ones_like(pos))
         + optax.sigmoid_binary_cross_entropy(neg, jnp.zeros_like(neg)))
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def candidate_bce(logits, candidate_valid):
  """Downstream BCE: logits [B, C], column 0 the positive (label 1), the rest sampled negatives
  (label 0); candidate_valid bool [B, C] drops negatives equal to the positive."""
  labels = jnp.zeros_like(logits).at[:, 0].set(1.0)
  per = optax.sigmoid_binary_cross_entropy(logits, labels)
  w = candidate_valid.astype(logits.dtype)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
