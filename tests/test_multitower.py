"""Multi-tower multi-interest model: serving score, repel regulariser, item tower, trainer hook."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mvhan_jax import evaluation, losses, retrieval
from mvhan_jax.data.types import InteractionData
from mvhan_jax.models import build_model, multitower


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_max_over_interests_equals_merged_multi_interest_retrieval():
  rng = np.random.default_rng(0)
  Q, K, D, I = 6, 3, 8, 40
  users = _unit(rng.normal(size=(Q, K, D))).astype(np.float32)
  items = _unit(rng.normal(size=(I, D))).astype(np.float32)
  mask = np.ones((Q, K), bool)
  mask[1, 2] = mask[4, 1:] = False
  scores = np.asarray(multitower.interest_scores(jnp.asarray(users), jnp.asarray(mask), jnp.asarray(items)))
  # NumPy reference of max over live interests.
  ref = np.where(mask[:, :, None], np.einsum("qkd,nd->qkn", users, items), -np.inf).max(1)
  np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-6)
  # Per-interest exact search, merged by max score (retrieval.merge_interests), returns the same top-k
  # as ranking by the model's score, and the same scores.
  k = 10
  per_ids = np.argsort(-np.einsum("qkd,nd->qkn", users, items), axis=-1)[:, :, :k]
  per_scores = np.take_along_axis(np.einsum("qkd,nd->qkn", users, items), per_ids, -1)
  merged_ids, merged_scores = retrieval.merge_interests(per_ids, per_scores, mask, k)
  np.testing.assert_array_equal(merged_ids, np.argsort(-scores, axis=1, kind="stable")[:, :k])
  np.testing.assert_allclose(merged_scores, -np.sort(-scores, axis=1)[:, :k], rtol=1e-5, atol=1e-6)
  # And the evaluator's exact top-k over interests agrees.
  _, exact_ids = evaluation.exact_topk(users, items, k, query_mask=mask)
  np.testing.assert_array_equal(np.asarray(exact_ids), merged_ids)


def test_lse_score_tends_to_max_and_upper_bounds_it():
  rng = np.random.default_rng(1)
  v = jnp.asarray(_unit(rng.normal(size=(4, 3, 5))), jnp.float32)
  e = jnp.asarray(_unit(rng.normal(size=(7, 5))), jnp.float32)
  mask = jnp.asarray(np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1]], bool))
  mx = multitower.interest_scores(v, mask, e, "max")
  soft = multitower.interest_scores(v, mask, e, "lse", 0.5)
  sharp = multitower.interest_scores(v, mask, e, "lse", 1e-3)
  assert np.all(np.asarray(soft) >= np.asarray(mx) - 1e-6)
  np.testing.assert_allclose(sharp, mx, atol=2e-3)
  # One live interest: lse = max exactly (the dead ones contribute exp(-huge) = 0).
  np.testing.assert_allclose(soft[1], mx[1], atol=1e-6)


def test_masked_interests_never_score():
  rng = np.random.default_rng(2)
  v = rng.normal(size=(2, 3, 4)).astype(np.float32)
  e = rng.normal(size=(5, 4)).astype(np.float32)
  mask = np.array([[True, False, False], [False, True, True]])
  # Make the dead interests the best match for every item: they must still be ignored.
  v[0, 1:] = 100 * e[0]
  v[1, 0] = 100 * e[0]
  for score in ("max", "lse"):
    s = np.asarray(multitower.interest_scores(jnp.asarray(v), jnp.asarray(mask), jnp.asarray(e), score, 0.1))
    np.testing.assert_allclose(s[0], v[0, 0] @ e.T, rtol=1e-5, atol=1e-5)
    live = v[1, 1:] @ e.T
    ref = live.max(0) if score == "max" else 0.1 * np.log(np.exp(live / 0.1).sum(0))
    np.testing.assert_allclose(s[1], ref, rtol=1e-4, atol=1e-4)


def _pair(angle):
  """Two unit interests at ``angle`` radians, and a third orthogonal to both (dead or live)."""
  return np.array([[1.0, 0, 0], [np.cos(angle), np.sin(angle), 0], [0, 0, 1.0]], np.float32)[None]


def test_repel_zero_for_orthogonal_and_grows_as_interests_align():
  live2 = jnp.asarray([[True, True, False]])
  angles = [np.pi / 2, np.pi / 3, np.pi / 6, 0.05]
  hinge = [float(multitower.repel_hinge(jnp.asarray(_pair(a)), live2)) for a in angles]
  assert hinge[0] == pytest.approx(0.0, abs=1e-6)
  assert np.all(np.diff(hinge) > 0)
  # Hand-computed: cos(pi/3) = 0.5 with margin 0.2 -> 0.3; anti-aligned -> 0.
  assert float(multitower.repel_hinge(jnp.asarray(_pair(np.pi / 3)), live2, 0.2)) == pytest.approx(0.3, abs=1e-5)
  assert float(multitower.repel_hinge(jnp.asarray(_pair(np.pi)), live2)) == pytest.approx(0.0, abs=1e-6)
  # Three live mutually orthogonal interests: still zero; the dead third interest is ignored even when
  # it equals the first.
  assert float(multitower.repel_hinge(jnp.asarray(_pair(np.pi / 2)), jnp.ones((1, 3), bool))) == pytest.approx(0.0, abs=1e-6)
  dup = _pair(np.pi / 2)
  dup[0, 2] = dup[0, 0] * 3.0
  assert float(multitower.repel_hinge(jnp.asarray(dup), live2)) == pytest.approx(0.0, abs=1e-6)
  assert float(multitower.repel_hinge(jnp.asarray(dup), jnp.ones((1, 3), bool))) == pytest.approx(1.0, abs=1e-5)
  # InfoNCE: the hand-computed value log(1 + exp((cos - 1) / tau)) per interest, increasing with cos.
  nce = [float(multitower.repel_infonce(jnp.asarray(_pair(a)), live2, 0.5)) for a in angles]
  np.testing.assert_allclose(nce, [np.log1p(np.exp((np.cos(a) - 1) / 0.5)) for a in angles], rtol=1e-5)
  assert np.all(np.diff(nce) > 0)
  # A single live interest has nothing to repel.
  one = jnp.asarray([[True, False, False]])
  assert float(multitower.repel_infonce(jnp.asarray(dup), one)) == pytest.approx(0.0, abs=1e-7)
  assert float(multitower.repel_hinge(jnp.asarray(dup), one)) == 0.0


def test_mean_pairwise_cosine_diagnostic():
  v = np.concatenate([_pair(np.pi / 3), _pair(np.pi / 2)])
  mask = np.array([[True, True, False], [True, False, False]])
  # Only the first user has a pair: cos(pi/3) = 0.5.
  assert multitower.mean_pairwise_cosine(v, mask) == pytest.approx(0.5)
  assert np.isnan(multitower.mean_pairwise_cosine(v, mask & False))


def _tiny_data(num_items=30, num_users=12, seed=0):
  rng = np.random.default_rng(seed)
  n = 200
  return InteractionData(
      name="tiny", num_users=num_users, num_items=num_items,
      user_features={"age": rng.integers(0, 4, num_users).astype(np.int32)},
      item_features={"genre": rng.integers(0, 5, num_items).astype(np.int32),
                     "text": rng.normal(size=(num_items, 6)).astype(np.float32)},
      vocab={"age": 4, "genre": 5},
      user=rng.integers(0, num_users, n).astype(np.int32), item=rng.integers(0, num_items, n).astype(np.int32),
      timestamp=np.arange(n, dtype=np.int64))


def _model_cfg(**kw):
  m = ml_collections.ConfigDict(dict(
      name="multitower", extractor="mind", dim=8, hidden=(16,), item_hidden=(16,), maxlen=6,
      num_interests=3, repel="hinge", repel_weight=1.0, training="serve"))
  m.update(kw)
  return m


def _batch(B=4, L=6, num_items=30, seed=0):
  rng = np.random.default_rng(seed)
  return {"user": jnp.asarray(rng.integers(0, 12, B), jnp.int32),
          "history": jnp.asarray(rng.integers(0, num_items, (B, L)), jnp.int32),
          "history_len": jnp.asarray([6, 5, 2, 4], jnp.int32)[:B],
          "target": jnp.asarray(rng.integers(0, num_items, B), jnp.int32)}


@pytest.mark.parametrize("extractor", ["mind", "comirec_sa"])
def test_repel_gradient_reaches_user_tower_and_only_it(extractor):
  data = _tiny_data()
  model = build_model(_model_cfg(extractor=extractor), data.spec)
  tables = {"user": {k: jnp.asarray(v) for k, v in data.user_features.items()},
            "item": {k: jnp.asarray(v) for k, v in data.item_features.items()}}
  batch = _batch()
  rngs = {"params": jax.random.key(0), "routing": jax.random.key(1), "dropout": jax.random.key(2)}
  params = model.init(rngs, batch, tables)
  assert set(params["params"]) == {"user_tower", "item_tower"}

  def repel(p):
    interests, mask = model.apply(p, batch, tables, True, method=model.encode_users, rngs={"routing": jax.random.key(3)})
    return model.apply(p, interests, mask, method=model.aux_loss)

  value, grads = jax.value_and_grad(repel)(params)
  assert float(value) > 0  # random interests are not orthogonal
  user_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["params"]["user_tower"]))
  item_norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["params"]["item_tower"]))
  assert np.isfinite(user_norm) and user_norm > 0
  assert item_norm == 0.0
  # Switched off, the regulariser is exactly zero.
  off = build_model(_model_cfg(extractor=extractor, repel="none"), data.spec)
  interests, mask = off.apply(params, batch, tables, method=off.encode_users, rngs={"routing": jax.random.key(3)})
  assert float(off.apply(params, interests, mask, method=off.aux_loss)) == 0.0


def test_mind_user_tower_vectors_do_not_depend_on_the_row():
  # The MIND extractor's routing draws are keyed by user id: a user encoded at row 0 of one batch and
  # at row 1 of another (different neighbours) gets the same interests under one fixed key.
  data = _tiny_data()
  model = build_model(_model_cfg(), data.spec)
  tables = {"user": {k: jnp.asarray(v) for k, v in data.user_features.items()},
            "item": {k: jnp.asarray(v) for k, v in data.item_features.items()}}
  a, b = _batch(seed=0), _batch(seed=1)
  params = model.init({"params": jax.random.key(0), "routing": jax.random.key(1)}, a, tables)
  moved = {k: v.at[1].set(a[k][0]) for k, v in b.items()}
  assert int(moved["user"][0]) != int(a["user"][0])
  enc = jax.jit(lambda batch: model.apply(params, batch, tables, method=model.encode_users,
                                          rngs={"routing": jax.random.key(3)})[0])
  np.testing.assert_allclose(np.asarray(enc(moved))[1], np.asarray(enc(a))[0], rtol=1e-6, atol=1e-6)


def test_item_tower_uses_features_and_drops_unseen_ids():
  data = _tiny_data()
  model = build_model(_model_cfg(), data.spec)
  tables = {"user": {k: jnp.asarray(v) for k, v in data.user_features.items()},
            "item": {k: jnp.asarray(v) for k, v in data.item_features.items()}}
  params = model.init({"params": jax.random.key(0), "routing": jax.random.key(1)}, _batch(), tables)
  ids = jnp.arange(data.num_items)
  base = np.asarray(model.apply(params, ids, tables, method=model.encode_items))
  np.testing.assert_allclose(np.linalg.norm(base, axis=-1), 1.0, rtol=1e-5)
  known = np.ones(data.num_items, np.float32)
  known[:5] = 0
  cold_tables = {"user": tables["user"], "item": {**tables["item"], multitower.KNOWN_ITEMS_KEY: jnp.asarray(known)}}
  cold = np.asarray(model.apply(params, ids, cold_tables, method=model.encode_items))
  np.testing.assert_allclose(cold[5:], base[5:], rtol=1e-6)  # seen items unchanged
  assert not np.allclose(cold[:5], base[:5])
  # A cold item's vector is a function of its features alone: two cold items with identical features
  # get identical vectors, whatever their (untrained) id rows hold.
  same = {k: np.asarray(v).copy() for k, v in data.item_features.items()}
  for k in same:
    same[k][1] = same[k][0]
  same_tables = {"user": tables["user"], "item": {**{k: jnp.asarray(v) for k, v in same.items()},
                                                 multitower.KNOWN_ITEMS_KEY: jnp.asarray(known)}}
  v = np.asarray(model.apply(params, ids, same_tables, method=model.encode_items))
  np.testing.assert_allclose(v[0], v[1], rtol=1e-6)
  assert not np.allclose(v[5], v[0])


def test_sampled_softmax_from_scores_matches_dot_product_loss():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  pos = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  neg = jnp.asarray(rng.normal(size=(7, 4)), jnp.float32)
  pos_ids = jnp.asarray([0, 1, 2, 3, 4])
  neg_ids = jnp.asarray([9, 1, 8, 7, 0, 6, 5])
  lq = jnp.asarray(rng.normal(size=(10,)), jnp.float32)
  ref, ref_logits = losses.sampled_softmax_loss(q, pos, neg, pos_ids, neg_ids, lq[pos_ids], lq[neg_ids], 0.1)
  got, logits = losses.sampled_softmax_loss_from_scores(
      jnp.sum(q * pos, -1), q @ neg.T, pos_ids, neg_ids, lq[pos_ids], lq[neg_ids], 0.1)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5)


def test_unknown_choices_name_the_config_field():
  data = _tiny_data()
  for field, value in (("extractor", "gru"), ("training", "soft"), ("score", "mean"), ("repel", "push")):
    with pytest.raises(ValueError, match=f"model.{field}"):
      build_model(_model_cfg(**{field: value}), data.spec)


def test_paired_scores_are_the_diagonal_of_the_serving_scores():
  """The training positives' scores (each user's own target only) equal the diagonal of the full
  [B, B] serving scores, with dead interests ignored, for both training scores."""
  rng = np.random.default_rng(3)
  v = jnp.asarray(_unit(rng.normal(size=(5, 3, 6))), jnp.float32)
  t = jnp.asarray(_unit(rng.normal(size=(5, 6))), jnp.float32)
  mask = jnp.asarray(np.array([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 1]], bool))
  for score in ("max", "lse"):
    full = np.asarray(multitower.interest_scores(v, mask, t, score, 0.1))
    paired = np.asarray(multitower.paired_interest_scores(v, mask, t, score, 0.1))
    np.testing.assert_allclose(paired, np.diagonal(full), rtol=1e-6, atol=1e-6)
  # Hand check of one row: user 1 has only interest 0 live.
  np.testing.assert_allclose(multitower.paired_interest_scores(v, mask, t)[1], float(v[1, 0] @ t[1]), rtol=1e-6)
