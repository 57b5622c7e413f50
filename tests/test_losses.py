"""Sampled softmax, in-batch softmax and samplers against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvhan_jax import losses


def _example():
  query = jnp.array([[1.0, 0.0]])
  pos = jnp.array([[2.0, 0.0]])        # <q, pos> = 2
  neg = jnp.array([[0.0, 1.0], [1.0, 0.0]])  # <q, neg> = 0, 1
  pos_ids = jnp.array([5])
  neg_ids = jnp.array([3, 5])          # the second negative is an accidental hit
  pos_log_q = jnp.log(jnp.array([0.5]))
  neg_log_q = jnp.log(jnp.array([0.25, 0.5]))
  return query, pos, neg, pos_ids, neg_ids, pos_log_q, neg_log_q


def test_sampled_softmax_hand_computed():
  q, pos, neg, pid, nid, plq, nlq = _example()
  loss, logits = losses.sampled_softmax_loss(q, pos, neg, pid, nid, plq, nlq)
  # logits: pos 2 - log .5, neg1 0 - log .25, neg2 masked  =>  loss = log(1 + e^{-2} * .5/.25)
  assert float(loss[0]) == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-5)
  assert float(logits[0, 0]) == pytest.approx(2 + math.log(2), rel=1e-5)
  assert float(logits[0, 2]) < -1e8


def test_full_softmax_hand_computed():
  query = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  items = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  loss, logits = losses.full_softmax_loss(query, items, jnp.array([0, 2]), temperature=0.5)
  # row 0: logits (2, 0, -2), target 0;  row 1: logits (0, 4, 0), target 2.
  assert float(loss[0]) == pytest.approx(math.log(math.exp(2) + 1 + math.exp(-2)) - 2, rel=1e-5)
  assert float(loss[1]) == pytest.approx(math.log(2 + math.exp(4)), rel=1e-5)
  np.testing.assert_allclose(np.asarray(logits), [[2, 0, -2], [0, 4, 0]], atol=1e-6)


def test_sampled_softmax_keeps_accidental_hit_when_asked():
  q, pos, neg, pid, nid, plq, nlq = _example()
  loss, _ = losses.sampled_softmax_loss(q, pos, neg, pid, nid, plq, nlq, remove_accidental_hits=False)
  # + e^{1 - 2} * .5/.5 for the un-masked duplicate of the positive
  assert float(loss[0]) == pytest.approx(math.log(1 + 2 * math.exp(-2) + math.exp(-1)), rel=1e-5)


def test_sampled_softmax_logq_sign_and_temperature():
  q, pos, neg, pid, nid, plq, nlq = _example()
  no_q, _ = losses.sampled_softmax_loss(q, pos, neg, pid, nid)
  assert float(no_q[0]) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)
  # A popular negative (high Q) must be penalised LESS after correction: its corrected logit drops.
  hot = losses.sampled_softmax_loss(q, pos, neg, pid, nid, plq, jnp.log(jnp.array([0.9, 0.5])))[0]
  cold = losses.sampled_softmax_loss(q, pos, neg, pid, nid, plq, jnp.log(jnp.array([0.01, 0.5])))[0]
  assert float(hot[0]) < float(cold[0])
  t, _ = losses.sampled_softmax_loss(q, pos, neg, pid, nid, temperature=0.5)
  assert float(t[0]) == pytest.approx(math.log(1 + math.exp(-4)), rel=1e-5)


def test_in_batch_softmax_masks_duplicates_and_uses_diagonal():
  q = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  e = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
  ids = jnp.array([7, 8, 7])  # rows 0 and 2 share item 7: each other's copy is not a negative
  loss, logits = losses.in_batch_softmax_loss(q, e, ids)
  # row 0: logits [1, 0, masked] -> log(1 + e^{-1}); row 1: [0, 2, 0] -> log(1 + 2e^{-2})
  # row 2: [masked, 2, 1] -> logsumexp(2, 1) - 1
  assert float(loss[0]) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-5)
  assert float(loss[1]) == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-5)
  assert float(loss[2]) == pytest.approx(math.log(math.exp(2) + math.exp(1)) - 1, rel=1e-5)


def _np_in_batch_softmax(q, e, ids, log_q, temperature):
  """Reference: logit(b, j) = <q_b, e_j> / T - log Q(j) (Yi et al. 2019), other rows holding b's
  item masked, loss_b = logsumexp_j logit(b, j) - logit(b, b)."""
  logits = q @ e.T / temperature - log_q[None, :]
  dup = (ids[:, None] == ids[None, :]) & ~np.eye(len(ids), dtype=bool)
  logits = np.where(dup, -np.inf, logits)
  top = logits.max(axis=1, keepdims=True)
  lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
  return lse - np.diagonal(logits), logits


def test_in_batch_softmax_logq_correction_matches_numpy():
  # A popular item (high Q) is a frequent in-batch negative: its logit is lowered by log Q, in
  # every column (as a negative and as the row's own positive).
  rng = np.random.default_rng(0)
  q = rng.normal(size=(5, 3)).astype(np.float32)
  e = rng.normal(size=(5, 3)).astype(np.float32)
  ids = np.array([4, 9, 4, 2, 7])
  log_q = np.log(np.array([0.4, 0.05, 0.4, 0.3, 0.01], np.float32) * 5)
  want_loss, want_logits = _np_in_batch_softmax(q.astype(np.float64), e.astype(np.float64), ids,
                                                log_q.astype(np.float64), 0.5)
  loss, logits = losses.in_batch_softmax_loss(jnp.asarray(q), jnp.asarray(e), jnp.asarray(ids),
                                              pos_log_q=jnp.asarray(log_q), temperature=0.5)
  np.testing.assert_allclose(np.asarray(loss), want_loss, rtol=1e-5)
  live = np.isfinite(want_logits)
  np.testing.assert_allclose(np.asarray(logits)[live], want_logits[live], rtol=1e-5)
  assert (np.asarray(logits)[~live] < -1e8).all()


def test_log_uniform_ranks_by_frequency():
  counts = np.array([5, 50, 0, 20])
  s = losses.make_sampler("log_uniform", counts)
  n = 4
  # item 1 has rank 0, item 3 rank 1, item 0 rank 2, item 2 rank 3
  expect = {1: 0, 3: 1, 0: 2, 2: 3}
  for item, rank in expect.items():
    assert s.probs[item] == pytest.approx(math.log((rank + 2) / (rank + 1)) / math.log(n + 1), rel=1e-5)
  assert s.probs.sum() == pytest.approx(1.0, rel=1e-5)


def test_popularity_and_uniform_probs():
  counts = np.array([0, 3, 15])
  s = losses.make_sampler("popularity", counts, alpha=0.5)
  raw = np.array([1.0, 2.0, 4.0])
  np.testing.assert_allclose(s.probs, raw / raw.sum(), rtol=1e-6)
  np.testing.assert_allclose(losses.make_sampler("uniform", counts).probs, [1 / 3] * 3, rtol=1e-6)
  with pytest.raises(ValueError, match="loss.sampler"):
    losses.make_sampler("zipf", counts)


def test_sample_negatives_follows_the_proposal():
  probs = np.array([0.5, 0.0, 0.3, 0.2], np.float32)
  sampler = losses.Sampler("custom", probs)
  ids = np.asarray(losses.sample_negatives(jax.random.key(0), jnp.asarray(sampler.cdf), 200_000))
  freq = np.bincount(ids, minlength=4) / ids.size
  np.testing.assert_allclose(freq, probs, atol=0.005)
  assert freq[1] == 0.0  # a zero-probability item is never drawn
