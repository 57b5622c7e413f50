"""The listwise re-ranker (mvhan_jax/ranking/listwise.py): loss, attention mask, counts, learning."""

import jax
import jax.numpy as jnp
import numpy as np

from mvhan_jax.ranking import listwise


def test_listwise_loss_matches_numpy():
  scores = np.array([[2.0, 0.5, -1.0, 7.0], [0.1, 0.2, 0.3, 0.4]], np.float32)
  mask = np.array([[True, True, True, False], [True, True, True, True]])
  label = np.array([1, 3])
  ref = []
  for s, m, y in zip(scores.astype(np.float64), mask, label):
    z = s[m]
    ref.append(-(s[y] - np.log(np.sum(np.exp(z - z.max()))) - z.max()))
  got = listwise.listwise_loss(jnp.asarray(scores), jnp.asarray(label), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), np.mean(ref), rtol=1e-6)


def test_target_attention_ignores_padding():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  k = rng.normal(size=(2, 5, 4)).astype(np.float32)
  v = rng.normal(size=(2, 5, 6)).astype(np.float32)
  mask = np.array([[True, True, False, False, False], [False] * 5])
  out = listwise.target_attention(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
  k2, v2 = k.copy(), v.copy()
  k2[:, 2:] += 100.0
  v2[:, 2:] -= 50.0
  out2 = listwise.target_attention(q, jnp.asarray(k2), jnp.asarray(v2), jnp.asarray(mask))
  np.testing.assert_allclose(out, out2, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)   # an empty history attends nothing
  # Row 0 by hand: softmax over the two live keys.
  logits = np.einsum("nd,ld->nl", np.asarray(q[0]), k[0, :2]) / 2.0
  w = np.exp(logits - logits.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  np.testing.assert_allclose(out[0], w @ v[0, :2], rtol=1e-5, atol=1e-6)


def test_transition_features_match_hand_counts():
  # Users' training sequences over 5 items.
  seqs = [np.array([0, 1, 2]), np.array([0, 1, 3, 1, 2]), np.array([4, 0, 1])]
  f = listwise.CountFeatures(seqs, 5)
  # All users: 0->1 x3, 1->2 x2, 1->3 x1, 3->1 x1, 4->0 x1; departures from 1: 3.
  assert f.transitions[0, 1] == 3 and f.transitions[1, 2] == 2 and f.row[1] == 3
  # A query of user 2 (leave-user-out: drop 4->0, 0->1; counts drop 4, 0, 1 by one) with history
  # [4, 0, 1] (newest 1, then 0, then 4) and candidates 2, 3, 1, padding.
  hist = np.array([[4, 0, 1, 0]])
  dense = f.dense(np.array([2]), hist, np.array([3]), np.array([[2, 3, 1, -1]]))
  cols = {n: i for i, n in enumerate(listwise.TRANSITION_FEATURES + listwise.POPULARITY_FEATURES)}
  # Newest item 1: T(1->2) = 2, T(1->3) = 1, T(1->1) = 0, r(1) = 3 (user 2 never leaves 1).
  np.testing.assert_allclose(dense[0, :3, cols["trans_ratio_1"]], [2 / 3, 1 / 3, 0])
  np.testing.assert_allclose(dense[0, :3, cols["trans_log_1"]], np.log1p([2, 1, 0]))
  # Second newest 0: T(0->1) without user 2 = 2, r(0) = 2.
  np.testing.assert_allclose(dense[0, :3, cols["trans_ratio_2"]], [0, 0, 1.0])
  # Third newest 4: only user 2 leaves 4, so nothing is left.
  np.testing.assert_allclose(dense[0, :3, cols["trans_ratio_3"]], 0.0)
  # Popularity without user 2: item 2 x2, item 3 x1, item 1 x4 - 1 = 3; max count 4.
  np.testing.assert_allclose(dense[0, :3, cols["log_popularity"]], np.log1p([2, 1, 3]) / np.log1p(4), rtol=1e-6)
  np.testing.assert_array_equal(dense[0, 3], 0.0)
  # User 0 sees its own 0->1 removed: T(0->1) = 2 and r(0) = 2 for candidate 1 after item 0.
  d0 = f.dense(np.array([0]), np.array([[0, 0, 0, 0]]), np.array([1]), np.array([[1]]))
  np.testing.assert_allclose(d0[0, 0, cols["trans_ratio_1"]], 1.0)
  np.testing.assert_allclose(d0[0, 0, cols["trans_log_1"]], np.log1p(2))


def _synthetic(rng, num_queries, num_items, n, perm, vectors):
  """Lists where the target is perm[last history item], placed at a random slot among random
  candidates with random retrieval logits (the retrieval order puts it first 1 / n of the time)."""
  hist = rng.integers(0, num_items, size=(num_queries, 6))
  hlen = rng.integers(1, 7, size=num_queries)
  last = hist[np.arange(num_queries), hlen - 1]
  target = perm[last]
  cand = np.stack([rng.choice(np.setdiff1d(np.arange(num_items), [t]), n, replace=False) for t in target])
  label = rng.integers(0, n, size=num_queries)
  cand[np.arange(num_queries), label] = target
  logits = rng.normal(size=(num_queries, n)).astype(np.float32)
  order = np.argsort(-logits, 1)
  ranks = np.argsort(order, 1)
  dense = np.zeros((num_queries, n, len(listwise.DENSE_FEATURES)), np.float32)
  dense[..., :3] = listwise.retrieval_features(logits, np.ones_like(logits, bool), ranks, n)
  # Retrieval order = list order: sort each list by its logits.
  cand = np.take_along_axis(cand, order, 1)
  dense = np.take_along_axis(dense, order[..., None], 1)
  label = np.argmax(cand == target[:, None], 1)
  h, m = listwise.recent_history(hist, hlen, 6)
  return listwise.Lists(cand.astype(np.int32), dense, label.astype(np.int32), h, m, n)


def test_learns_a_deterministic_next_item():
  rng = np.random.default_rng(0)
  num_items, n, dim = 24, 8, 32
  perm = rng.permutation(num_items)
  vectors = rng.normal(size=(num_items, dim)).astype(np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  train = _synthetic(rng, 3000, num_items, n, perm, vectors)
  test = _synthetic(rng, 500, num_items, n, perm, vectors)
  cfg = listwise.TrainConfig(groups=("retrieval", "attention"), maxlen=6, attn_dim=32, hidden=(64,), lr=3e-3,
                             batch_size=100, epochs=15, patience=100)
  model, params, _ = listwise.train(cfg, train, test, vectors, log=lambda s: None)
  scores = listwise.score_lists(model, params, test, jnp.asarray(vectors))
  pos = listwise.reranked_positions(test.candidates, scores, test.label)
  retrieval_first = np.mean(test.label == 0)
  assert retrieval_first < 0.25
  assert np.mean(pos == 0) > 0.6, (np.mean(pos == 0), retrieval_first)
