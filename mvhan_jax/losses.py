"""Retrieval losses and negative samplers.

The sampled softmax follows Jean et al. (2015) / Yi et al. (2019, "Sampling-bias-corrected neural
modeling", RecSys): every logit ``s(u, i)`` of the positive and of the shared sampled negatives is
corrected by ``- log Q(i)``, the log of item ``i``'s expected count among the negatives, so that
popular items, which the sampler proposes often, are not over-penalised. Negatives that happen to
equal the positive ("accidental hits") are removed from the softmax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A fixed proposal distribution over the item catalogue, sampled on device.

  Attributes:
    name: 'uniform', 'log_uniform' or 'popularity'.
    probs: float32 [I], the proposal Q(i); sums to 1.
  """

  name: str
  probs: np.ndarray

  @property
  def cdf(self) -> np.ndarray:
    cdf = np.cumsum(self.probs.astype(np.float64))
    return (cdf / cdf[-1]).astype(np.float32)

  @property
  def log_probs(self) -> np.ndarray:
    return np.log(np.maximum(self.probs, 1e-30)).astype(np.float32)


SAMPLERS = ("uniform", "log_uniform", "popularity")


def make_sampler(name: str, item_counts: np.ndarray, alpha: float = 0.75) -> Sampler:
  """Builds a proposal distribution from training item counts.

  Args:
    name: 'uniform'; 'log_uniform' (Zipf over the items ranked by descending training frequency,
      P(rank r) = log((r + 2) / (r + 1)) / log(I + 1), as TF's log-uniform candidate sampler and
      ComiRec use); 'popularity' (P(i) proportional to (count_i + 1) ** alpha, word2vec style).
    item_counts: int [I] training interactions per item.
    alpha: popularity exponent.
  """
  counts = np.asarray(item_counts, np.float64)
  n = counts.shape[0]
  if name == "uniform":
    p = np.full(n, 1.0 / n)
  elif name == "log_uniform":
    # Stable sort: ties in count keep id order, so the ranking is deterministic.
    order = np.argsort(-counts, kind="stable")
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n)
    p = np.log((ranks + 2.0) / (ranks + 1.0)) / np.log(n + 1.0)
  elif name == "popularity":
    p = (counts + 1.0) ** alpha
  else:
    raise ValueError(f"loss.sampler={name!r} is unknown: use 'uniform', 'log_uniform' or 'popularity'")
  p = p / p.sum()
  return Sampler(name, p.astype(np.float32))


def sample_negatives(rng: jax.Array, cdf: jax.Array, num: int) -> jax.Array:
  """Draws ``num`` item ids with replacement by inverse-CDF lookup: O(num log I), not O(num I).

  Args:
    rng: PRNG key.
    cdf: float32 [I], cumulative proposal (last entry 1).
    num: number of shared negatives S.
  Returns:
    int32 [S].
  """
  u = jax.random.uniform(rng, (num,), minval=0.0, maxval=cdf[-1])
  ids = jnp.searchsorted(cdf, u, side="right")
  return jnp.minimum(ids, cdf.shape[0] - 1).astype(jnp.int32)


def sampled_softmax_loss(
    query: jax.Array,
    pos_emb: jax.Array,
    neg_emb: jax.Array,
    pos_ids: jax.Array,
    neg_ids: jax.Array,
    pos_log_q: jax.Array | None = None,
    neg_log_q: jax.Array | None = None,
    temperature: float = 1.0,
    remove_accidental_hits: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Sampled softmax with shared negatives and logQ correction.

  logit(u, i) = <q_u, e_i> / temperature - log Q(i)  for the positive and every negative;
  loss_u = -logit(u, pos) + logsumexp_{i in {pos} + negatives, i != pos} logit(u, i).

  Args:
    query: [B, D] user vectors.
    pos_emb: [B, D] positive item vectors.
    neg_emb: [S, D] shared negative item vectors.
    pos_ids: int [B]; neg_ids: int [S] (accidental hits are negatives with the positive's id).
    pos_log_q: [B] log expected count of each positive among the negatives (None: no correction).
    neg_log_q: [S] the same for each negative.
    temperature: divides the inner products.
    remove_accidental_hits: mask negatives equal to the row's positive.
  Returns:
    (loss [B], logits [B, 1 + S]) where column 0 is the positive.
  """
  return sampled_softmax_loss_from_scores(
      jnp.sum(query * pos_emb, axis=-1), query @ neg_emb.T, pos_ids, neg_ids, pos_log_q, neg_log_q,
      temperature, remove_accidental_hits)


def full_softmax_loss(query: jax.Array, item_emb: jax.Array, pos_ids: jax.Array,
                      temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy over the whole catalogue (no sampling, so no logQ correction).

  The objective that Klenitskiy & Vasilev (RecSys 2023) found lifts SASRec most: every item is a
  negative. Affordable when the catalogue's item vectors fit one step (MovieLens: 1,682 / 3,706 items).

  Args:
    query: [B, D] user vectors; item_emb: [I, D] every item's vector; pos_ids: int [B] the targets.
  Returns:
    (loss [B], logits [B, I]).
  """
  logits = query @ item_emb.T / temperature
  loss = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, pos_ids[:, None], axis=1)[:, 0]
  return loss, logits


def in_batch_softmax_loss(
    query: jax.Array,
    pos_emb: jax.Array,
    pos_ids: jax.Array,
    pos_log_q: jax.Array | None = None,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Softmax over the batch's own positives as negatives (Yi et al. 2019).

  The batch's items are drawn with the data's popularity, so logQ uses the training frequency.
  Other rows with the same item as row b's positive are accidental hits and are masked.

  Args:
    query: [B, D]; pos_emb: [B, D]; pos_ids: int [B]; pos_log_q: [B] log (B * frequency) or None.
  Returns:
    (loss [B], logits [B, B]) with the positives on the diagonal.
  """
  logits = query @ pos_emb.T / temperature
  if pos_log_q is not None:
    logits = logits - pos_log_q[None, :]
  b = query.shape[0]
  same = pos_ids[:, None] == pos_ids[None, :]
  logits = jnp.where(same & ~jnp.eye(b, dtype=bool), _NEG_INF, logits)
  loss = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
  return loss, logits


def sampled_softmax_loss_from_scores(
    pos_score: jax.Array,
    neg_score: jax.Array,
    pos_ids: jax.Array,
    neg_ids: jax.Array,
    pos_log_q: jax.Array | None = None,
    neg_log_q: jax.Array | None = None,
    temperature: float = 1.0,
    remove_accidental_hits: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """`sampled_softmax_loss` for scores computed by the model (e.g. max over a user's interests).

  logit(u, i) = s(u, i) / temperature - log Q(i), accidental hits masked, as `sampled_softmax_loss`
  does with s(u, i) = <q_u, e_i>.

  Args:
    pos_score: [B] s(u, positive of u).
    neg_score: [B, S] s(u, shared negative j).
    pos_ids, neg_ids, pos_log_q, neg_log_q, temperature, remove_accidental_hits: as in
      `sampled_softmax_loss`.
  Returns:
    (loss [B], logits [B, 1 + S]) where column 0 is the positive.
  """
  pos_logit = pos_score / temperature
  neg_logit = neg_score / temperature
  if pos_log_q is not None:
    pos_logit = pos_logit - pos_log_q
    neg_logit = neg_logit - neg_log_q[None, :]
  if remove_accidental_hits:
    neg_logit = jnp.where(pos_ids[:, None] == neg_ids[None, :], _NEG_INF, neg_logit)
  logits = jnp.concatenate([pos_logit[:, None], neg_logit], axis=1)
  loss = jax.nn.logsumexp(logits, axis=1) - pos_logit
  return loss, logits
