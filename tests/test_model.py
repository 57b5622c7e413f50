"""Two-tower model: field embeddings, history pooling, padding invariance, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvhan_jax.features import FeatureSpec
from mvhan_jax import layers
from mvhan_jax.layers import FieldEmbedding, gather_rows, l2_normalize, masked_mean
from mvhan_jax.models.two_tower import TwoTower

USER_SPECS = (FeatureSpec("age", "categorical", 5), FeatureSpec("tags", "multi", 6))
ITEM_SPECS = (FeatureSpec("genres", "multi", 4), FeatureSpec("vec", "dense", 3))
TABLES = {
    "user": {"age": jnp.array([1, 2, 3]), "tags": jnp.array([[1, 2, 0], [3, 0, 0], [0, 0, 0]])},
    "item": {"genres": jnp.array([[1, 0], [2, 3], [1, 2], [3, 0], [0, 0]]),
             "vec": jnp.arange(15, dtype=jnp.float32).reshape(5, 3) / 10},
}
BATCH = {"user": jnp.array([0, 2]), "history": jnp.array([[1, 2, 3, 0], [4, 0, 0, 0]]),
         "history_len": jnp.array([3, 1]), "target": jnp.array([4, 0])}


def _model(**kw):
  return TwoTower(num_items=5, user_specs=USER_SPECS, item_specs=ITEM_SPECS, dim=8, hidden=(16,), maxlen=4, **kw)


def test_l2_normalize_unit_rows_and_finite_gradient_at_zero():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0], [3e-7, 4e-7]])
  y = l2_normalize(x)
  np.testing.assert_allclose(np.asarray(y), [[0.6, 0.8], [0.0, 0.0], [0.3, 0.4]], rtol=1e-5)  # |x| < eps: x / eps
  g = jax.grad(lambda v: l2_normalize(v).sum())(x)
  assert np.isfinite(np.asarray(g)).all()  # a dead (all-zero) row must not poison the gradient


def test_gather_rows_takes_rows_of_every_field():
  out = gather_rows(TABLES["item"], jnp.array([[4, 1]]))
  assert out["genres"].shape == (1, 2, 2) and out["vec"].shape == (1, 2, 3)
  np.testing.assert_array_equal(np.asarray(out["genres"][0, 1]), [2, 3])


def test_masked_mean_ignores_padding():
  x = jnp.array([[[1.0], [3.0], [100.0]]])
  assert float(masked_mean(x, jnp.array([[True, True, False]]))[0, 0]) == 2.0
  assert float(masked_mean(x, jnp.array([[False, False, False]]))[0, 0]) == 0.0


def test_field_embedding_pools_multi_valued_fields():
  layer = FieldEmbedding(USER_SPECS, 4)
  params = layer.init(jax.random.key(0), TABLES["user"])
  tokens = layer.apply(params, TABLES["user"])
  assert tokens.shape == (3, 2, 4)
  table = params["params"]["tags_embed"]["embedding"]
  np.testing.assert_allclose(tokens[0, 1], (table[1] + table[2]) / 2, rtol=1e-6)
  np.testing.assert_allclose(tokens[2, 1], np.zeros(4), atol=0)  # all-padding row pools to zeros


@pytest.mark.parametrize("pooling", ["mean", "recency"])
def test_outputs_are_unit_norm_and_padding_invariant(pooling):
  model = _model(pooling=pooling)
  params = model.init(jax.random.key(0), BATCH, TABLES)
  u = model.apply(params, BATCH, TABLES, method=model.encode_users)
  assert u.shape == (2, 8)
  np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0, rtol=1e-5)
  # Whatever sits in the padded positions must not change the user vector.
  noisy = dict(BATCH, history=jnp.array([[1, 2, 3, 4], [4, 1, 2, 3]]))
  np.testing.assert_allclose(model.apply(params, noisy, TABLES, method=model.encode_users), u, rtol=1e-6)
  # But the history itself must matter.
  other = dict(BATCH, history=jnp.array([[0, 0, 0, 0], [3, 0, 0, 0]]))
  assert not np.allclose(model.apply(params, other, TABLES, method=model.encode_users), u)


def test_recency_pooling_starts_as_mean_and_weights_recent_items():
  mean_model, rec_model = _model(pooling="mean"), _model(pooling="recency")
  params = rec_model.init(jax.random.key(0), BATCH, TABLES)
  hist, hlen = BATCH["history"], BATCH["history_len"]
  # zero recency logits = uniform weights = the masked mean
  rec = rec_model.apply(params, hist, hlen, method=rec_model.pool_history)
  mean = mean_model.apply(params, hist, hlen, method=mean_model.pool_history)
  np.testing.assert_allclose(rec, mean, rtol=1e-6)
  # a large logit at distance 0 puts all the weight on the most recent item (item 3 for row 0)
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["params"]["recency_logits"] = jnp.array([50.0, 0.0, 0.0, 0.0])
  rec = rec_model.apply(params, hist, hlen, method=rec_model.pool_history)
  table = params["params"]["item_id_embed"]["embedding"]
  np.testing.assert_allclose(rec[0], table[3], rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_shared_item_table_from_both_towers():
  model = _model()
  params = model.init(jax.random.key(0), BATCH, TABLES)

  def score(p):
    u, e = model.apply(p, BATCH, TABLES)
    return jnp.sum(u * e)

  g = jax.grad(score)(params)["params"]["item_id_embed"]["embedding"]
  touched = np.flatnonzero(np.abs(np.asarray(g)).sum(-1) > 0)
  # rows 1, 2, 3, 4 appear in histories, 4 and 0 are targets: all five rows get gradient
  assert set(touched.tolist()) == {0, 1, 2, 3, 4}


def test_unknown_pooling_is_a_clear_error():
  with pytest.raises(ValueError, match="model.pooling"):
    _model(pooling="max").init(jax.random.key(0), BATCH, TABLES)


def test_recency_weights_by_distance_from_the_newest_behaviour():
  # maxlen 3: distances 0, 1 and >= 2 have logits log 3, 0, 0.
  logits = jnp.log(jnp.array([3.0, 1.0, 1.0]))
  w = np.asarray(layers.recency_weights(logits, jnp.array([2, 4, 0]), 5))
  np.testing.assert_allclose(w[0], [1 / 4, 3 / 4, 0, 0, 0], rtol=1e-6)   # newest at position 1
  np.testing.assert_allclose(w[1], [1 / 6, 1 / 6, 1 / 6, 3 / 6, 0], rtol=1e-6)  # distance 3 shares the last logit
  np.testing.assert_array_equal(w[2], np.zeros(5))  # an empty history: all zero, no NaN
