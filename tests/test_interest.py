"""Multi-interest layers and models: MIND routing against a plain NumPy Algorithm 1, masking and
padding invariance, dynamic K, label-aware attention, stop-gradient placement, ComiRec extractors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mvhan_jax.data.types import InteractionData
from mvhan_jax.models import interest as il
from mvhan_jax.models import mind

B, L, D, K = 2, 5, 4, 3
HLEN = np.array([5, 3])
BMASK = np.arange(L)[None, :] < HLEN[:, None]
IMASK = np.array([[True, True, True], [True, True, False]])


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  E = rng.normal(size=(B, L, D)).astype(np.float32)
  S = (rng.normal(size=(D, D)) / 2).astype(np.float32)
  b0 = rng.normal(size=(B, L, K)).astype(np.float32)
  return E, S, b0


def np_routing(e_hat, bmask, imask, b0, iterations, axis):
  """Algorithm 1 written out plainly. e_hat[b, i, j] is the vector behaviour i sends to interest j
  (MIND: S e_i for every j; ComiRec-DR: W[i, j] e_i). Returns (capsules [B, K, D], final w [B, L, K])."""
  nb, nl, nk, nd = e_hat.shape
  e_hat = e_hat.astype(np.float64)
  b = b0.astype(np.float64).copy()
  for _ in range(iterations):
    w = np.zeros((nb, nl, nk))
    for n in range(nb):
      live_i = [i for i in range(nl) if bmask[n, i]]
      live_j = [j for j in range(nk) if imask[n, j]]
      if axis == "interests":
        for i in live_i:
          den = sum(np.exp(b[n, i, j]) for j in live_j)
          for j in live_j:
            w[n, i, j] = np.exp(b[n, i, j]) / den
      else:
        for j in live_j:
          den = sum(np.exp(b[n, i, j]) for i in live_i)
          for i in live_i:
            w[n, i, j] = np.exp(b[n, i, j]) / den
    u = np.zeros((nb, nk, nd))
    for n in range(nb):
      for j in range(nk):
        z = sum(w[n, i, j] * e_hat[n, i, j] for i in range(nl))
        nz = np.linalg.norm(z)
        u[n, j] = 0.0 if nz == 0 else nz ** 2 / (1 + nz ** 2) * z / nz
        for i in range(nl):
          b[n, i, j] += u[n, j] @ e_hat[n, i, j]
  return u * imask[..., None], w


def _mind_e_hat(E, S):
  return np.repeat((E @ S.T)[:, :, None, :], K, axis=2)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", ["interests", "behaviours"])
@pytest.mark.parametrize("iterations", [1, 3])
def test_b2i_routing_matches_numpy_algorithm_1(axis, iterations):
  E, S, b0 = _inputs()
  got = il.b2i_routing(E, BMASK, IMASK, b0, S, iterations, axis)
  want, _ = np_routing(_mind_e_hat(E, S), BMASK, IMASK, b0, iterations, axis)
  assert got.shape == (B, K, D)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  assert np.all(np.asarray(got)[1, 2] == 0)  # dead interest is exactly zero


def test_routing_axes_differ_and_capsules_are_distinct():
  E, S, b0 = _inputs()
  a = il.b2i_routing(E, BMASK, IMASK, b0, S, 3, "interests")
  b = il.b2i_routing(E, BMASK, IMASK, b0, S, 3, "behaviours")
  assert not np.allclose(a, b, atol=1e-3)
  assert not np.allclose(a[0, 0], a[0, 1], atol=1e-3)  # random init logits break the symmetry
  assert np.all(np.linalg.norm(a, axis=-1) < 1)  # squash keeps norms below 1
  with pytest.raises(ValueError, match="softmax_axis"):
    il.b2i_routing(E, BMASK, IMASK, b0, S, 3, "rows")


@pytest.mark.parametrize("axis", ["interests", "behaviours"])
def test_b2i_routing_ignores_padding_and_dead_interest_inputs(axis):
  E, S, b0 = _inputs()
  ref = il.b2i_routing(E, BMASK, IMASK, b0, S, 3, axis)
  E2, b2 = E.copy(), b0.copy()
  E2[1, 3:] = 1e3 * np.random.default_rng(1).normal(size=(2, D))  # padded behaviours of row 1
  b2[1, 3:] = 50.0  # logits of padded behaviours
  b2[1, :, 2] = -40.0  # logits of the dead interest
  got = il.b2i_routing(E2, BMASK, IMASK, b2, S, 3, axis)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # The live inputs do matter.
  E2[1, 0] += 1.0
  assert not np.allclose(il.b2i_routing(E2, BMASK, IMASK, b0, S, 3, axis)[1], ref[1])


def test_squash_and_empty_history_are_nan_free():
  z = jnp.array([[0.0, 0.0], [3.0, 4.0]])
  np.testing.assert_allclose(il.squash(z), [[0, 0], [25 / 26 * 0.6, 25 / 26 * 0.8]], rtol=1e-6)
  g = jax.grad(lambda z: jnp.sum(il.squash(z)))(z)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[0] == 0)
  E, S, b0 = _inputs()
  empty = np.zeros((B, L), bool)
  out, gS = jax.jit(jax.value_and_grad(lambda S: jnp.sum(il.b2i_routing(E, empty, IMASK, b0, S, 3))))(S)
  assert float(out) == 0.0 and np.all(np.isfinite(gS))


def test_dynamic_interest_count():
  np.testing.assert_array_equal(il.dynamic_interest_count(jnp.array([1, 3, 8, 16]), 4), [1, 1, 3, 4])
  np.testing.assert_array_equal(il.dynamic_interest_count(jnp.array([0, 2, 4, 7, 1000]), 4), [1, 1, 2, 2, 4])
  np.testing.assert_array_equal(il.interest_mask(jnp.array([1, 8]), 4),
                                [[True, False, False, False], [True, True, True, False]])


def _jax_routing_ref(E, S, b0, iterations):
  """Differentiable Algorithm 1 (softmax over interests) WITHOUT any stop-gradient."""
  live = jnp.asarray(BMASK)[:, :, None] & jnp.asarray(IMASK)[:, None, :]
  se = jnp.einsum("bld,ed->ble", E, S)
  b = jnp.asarray(b0)
  for _ in range(iterations):
    x = se
    w = jax.nn.softmax(jnp.where(live, b, -1e30), axis=2) * live
    z = jnp.einsum("blk,bld->bkd", w, x)
    n2 = jnp.sum(z * z, -1, keepdims=True)
    u = n2 / (1 + n2) * z / jnp.sqrt(n2 + 1e-30)  # the dead interest has z = 0
    b = b + jnp.einsum("bkd,bld->blk", u, x)
  return u * jnp.asarray(IMASK)[..., None]


def test_stop_gradient_only_the_last_iteration_trains_S():
  E, S, b0 = _inputs()
  R = jnp.asarray(np.random.default_rng(2).normal(size=(B, K, D)), jnp.float32)
  loss = lambda f: jax.jit(jax.grad(lambda S: jnp.sum(R * f(S))))(jnp.asarray(S))
  for iterations in (1, 3):
    g = loss(lambda S: il.b2i_routing(E, BMASK, IMASK, b0, S, iterations))
    # With stop-gradient the couplings w of the last iteration act as constants: S is trained only
    # through u_j = squash(sum_i w_ij S e_i).
    _, w = np_routing(_mind_e_hat(E, S), BMASK, IMASK, b0, iterations, "interests")
    w = jnp.asarray(w, jnp.float32)
    g_const_w = loss(lambda S: il.squash(jnp.einsum("blk,bld->bkd", w, jnp.einsum("bld,ed->ble", E, S))))
    np.testing.assert_allclose(g, g_const_w, rtol=1e-4, atol=1e-6)
    g_nostop = loss(lambda S: _jax_routing_ref(E, S, b0, iterations))
    if iterations == 1:  # nothing to stop
      np.testing.assert_allclose(g, g_nostop, rtol=1e-4, atol=1e-6)
    else:
      assert not np.allclose(g, g_nostop, rtol=1e-2, atol=1e-4)


def test_comirec_dr_routing_matches_numpy():
  E, _, _ = _inputs()
  W = np.random.default_rng(3).normal(size=(L + 2, K, D, D)).astype(np.float32) / 2  # maxlen > L
  e_hat = np.einsum("lkde,ble->blkd", W[:L], E)
  got = il.comirec_dr_routing(E, BMASK, W, 3)
  want, _ = np_routing(e_hat, BMASK, np.ones((B, K), bool), np.zeros((B, L, K)), 3, "interests")
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  E2 = E.copy()
  E2[1, 3:] = 7.0
  np.testing.assert_array_equal(np.asarray(il.comirec_dr_routing(E2, BMASK, W, 3)), np.asarray(got))
  with pytest.raises(ValueError, match="maxlen"):
    il.comirec_dr_routing(E, BMASK, W[:3], 3)


def test_self_attentive_rows_sum_to_one_on_live_positions():
  E, _, _ = _inputs()
  layer = il.SelfAttentiveExtractor(K, D, maxlen=8)
  params = jax.jit(layer.init)(jax.random.key(0), E, BMASK)
  apply = jax.jit(lambda e, m: layer.apply(params, e, m, return_attention=True))
  V, A = apply(E, BMASK)
  assert V.shape == (B, K, D) and A.shape == (B, K, L)
  np.testing.assert_allclose(np.sum(A, -1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(A)[1, :, 3:] == 0) and np.all(np.asarray(A)[1, :, :3] > 0)
  np.testing.assert_allclose(V, np.einsum("bkl,bld->bkd", A, E), rtol=1e-5, atol=1e-6)  # V = A^T H
  E2 = E.copy()
  E2[1, 3:] = 100.0
  np.testing.assert_array_equal(np.asarray(apply(E2, BMASK)[0]), np.asarray(V))
  # Positions matter: the same items in another order get different attention.
  full = np.ones((B, L), bool)
  assert not np.allclose(apply(E[:, ::-1].copy(), full)[1][0], apply(E, full)[1][0][:, ::-1])


def test_label_aware_attention():
  V = jnp.array([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
  mask = jnp.array([[True, True, False]])  # the dead interest has the largest dot product
  t = jnp.array([[2.0, 1.0]])
  np.testing.assert_allclose(il.label_aware_attention(V, mask, t, 0.0), [[0.5, 0.5]], rtol=1e-6)
  # p = 1: hand softmax over the live dot products (2, 1).
  w = np.exp([2.0, 1.0]) / np.exp([2.0, 1.0]).sum()
  np.testing.assert_allclose(il.label_aware_attention(V, mask, t, 1.0), [w], rtol=1e-6)
  np.testing.assert_allclose(il.label_aware_attention(V, mask, t, 50.0), [[1.0, 0.0]], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(il.label_aware_attention(V, mask, t, "hard")), [[1.0, 0.0]])
  # With every interest live, the third wins.
  all_live = jnp.ones((1, 3), bool)
  np.testing.assert_array_equal(np.asarray(il.label_aware_attention(V, all_live, t, "hard")), [[5.0, 5.0]])
  # Hard readout picks the argmax exactly, even for negative dot products.
  np.testing.assert_array_equal(np.asarray(il.label_aware_attention(V, mask, -t, "hard")), [[0.0, 1.0]])
  with pytest.raises(ValueError, match="label_power"):
    il.label_aware_attention(V, mask, t, "soft")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
NI = 9
TABLES = {
    "user": {"age": jnp.array([1, 2, 3])},
    "item": {"genres": jnp.array([[1, 0], [2, 3], [1, 2], [3, 0], [0, 0], [1, 0], [2, 0], [3, 1], [2, 2]]),
             "vec": jnp.arange(NI * 3, dtype=jnp.float32).reshape(NI, 3) / 10},
}
# Histories of lengths 8, 3, 1 (K'_u = 3, 1, 1 with K = 4); 0 is a real item, padding is at the end.
HIST = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 0, 6, 0, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0]])
BATCH = {"user": jnp.array([0, 1, 2]), "history": HIST, "history_len": jnp.array([8, 3, 1]),
         "target": jnp.array([8, 2, 3])}
RNGS = {"params": jax.random.key(0), "routing": jax.random.key(1)}


def _data():
  return InteractionData(
      name="toy", num_users=3, num_items=NI, user_features={"age": np.array([1, 2, 3], np.int32)},
      item_features={k: np.asarray(v) for k, v in TABLES["item"].items()}, vocab={"age": 5, "genres": 4},
      user=np.array([0], np.int32), item=np.array([0], np.int32), timestamp=np.array([0], np.int64))


def _cfg(name, **kw):
  fields = dict(name=name, dim=8, hidden=[16], num_interests=4, routing_iterations=3, routing_sigma=1.0,
                softmax_axis="interests", label_power=2.0, normalize=True, maxlen=8, dropout=0.0)
  return ml_collections.ConfigDict({**fields, **kw})


@functools.lru_cache(maxsize=None)
def _build(name, K):
  """A registry-built model and its initial parameters."""
  cfg = _cfg("mind" if name == "mind1" else name, num_interests=K)
  if name.startswith("comirec"):
    del cfg["label_power"]  # ComiRec's default readout is 'hard'
  model = mind.MODELS[cfg.name](cfg, _data().spec)
  return model, jax.jit(model.init)(RNGS, BATCH, TABLES)


@pytest.mark.parametrize("name,K,want_mask", [
    ("mind", 4, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]]),
    ("mind1", 1, [[1], [1], [1]]),
    ("comirec_dr", 4, np.ones((3, 4))),
    ("comirec_sa", 4, np.ones((3, 4))),
])
def test_models_shapes_masks_and_padding_invariance(name, K, want_mask):
  model, params = _build(name, K)
  assert model.multi_interest

  @jax.jit  # one compiled program for all three histories below (eager flax dispatch is slow here)
  def run(b):
    interests, mask = model.apply(params, b, TABLES, rngs={"routing": jax.random.key(5)},
                                  method=model.encode_users)
    items = model.apply(params, jnp.arange(NI), TABLES, method=model.encode_items)
    readout = model.apply(params, interests, mask, items[b["target"]], method=model.readout)
    return interests, mask, items, readout

  interests, mask, items, out = map(np.asarray, run(BATCH))
  assert interests.shape == (3, K, 8) and mask.dtype == np.bool_
  np.testing.assert_array_equal(mask, np.asarray(want_mask, bool))
  norms = np.linalg.norm(interests, axis=-1)
  np.testing.assert_allclose(norms[mask], 1.0, rtol=1e-5)  # normalize=True
  assert np.all(norms[~mask] == 0)
  assert items.shape == (NI, 8) and out.shape == (3, 8)
  dots = np.einsum("bkd,bd->bk", interests, items[np.asarray(BATCH["target"])])
  if name.startswith("comirec"):  # hard readout: exactly the closest interest
    np.testing.assert_array_equal(out, interests[np.arange(3), np.argmax(dots, -1)])
  else:  # label-aware attention with p = 2 over the live interests, re-normalised
    w = np.where(mask, np.exp(2.0 * dots), 0.0)
    v = np.einsum("bk,bkd->bd", w / w.sum(-1, keepdims=True), interests)
    np.testing.assert_allclose(out, v / np.linalg.norm(v, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
  # Items in padded positions change nothing; a live item does.
  again = run(dict(BATCH, history=HIST.at[1, 3:].set(8).at[2, 1:].set(3)))[0]
  np.testing.assert_allclose(again, interests, rtol=1e-5, atol=1e-6)
  changed = run(dict(BATCH, history=HIST.at[2, 0].set(4)))[0]
  assert not np.allclose(changed[2], interests[2])


@pytest.fixture(scope="module")
def mind_model():
  """The MIND model of the 'mind' case above and its parameters (compiling init once saves seconds)."""
  return _build("mind", 4)


def test_mind_item_embedding_is_mean_of_id_and_fields(mind_model):
  model, params = mind_model
  p = params["params"]
  e = model.apply(params, jnp.array([1]), TABLES, method=model.item_embedding)[0]
  genres = p["item_field_embed"]["genres_embed"]["embedding"]
  proj = p["item_field_embed"]["vec_proj"]
  vec = TABLES["item"]["vec"][1] @ proj["kernel"] + proj["bias"]
  want = (p["item_id_embed"]["embedding"][1] + (genres[2] + genres[3]) / 2 + vec) / 3
  np.testing.assert_allclose(e, want, rtol=1e-5, atol=1e-7)
  # encode_items is that embedding, L2-normalised (normalize=True).
  np.testing.assert_allclose(model.apply(params, jnp.array([1]), TABLES, method=model.encode_items)[0],
                             want / np.linalg.norm(want), rtol=1e-5)


def test_mind_gradients_reach_S_and_history_items(mind_model):
  model, params = mind_model

  def score(p):
    u, e = model.apply(p, BATCH, TABLES, rngs={"routing": jax.random.key(3)})
    return jnp.sum(u * e)

  g = jax.jit(jax.grad(score))(params)["params"]
  assert float(jnp.abs(g["routing"]["S"]).sum()) > 0
  table_grad = np.abs(np.asarray(g["item_id_embed"]["embedding"])).sum(-1)
  # Items 0, 1, 4 appear only in histories (not as targets): their gradient comes through routing.
  assert np.all(table_grad[[0, 1, 4]] > 0)
  assert np.all(np.isfinite(np.asarray(g["user_fields"]["age_embed"]["embedding"])))


def test_mind_user_vectors_do_not_depend_on_the_row_or_the_batch(mind_model):
  # Evaluation encodes users in chunks with one fixed key and serving encodes one user alone: the
  # same user (same history) must get the same vectors at any row, beside any neighbours.
  model, params = mind_model
  enc = jax.jit(lambda b: model.apply(params, b, TABLES, rngs={"routing": jax.random.key(7)},
                                      method=model.encode_users)[0])
  base = np.asarray(enc(BATCH))
  # User 0 moved to row 1, its neighbours different users with different histories.
  other = {"user": jnp.array([2, 0, 1]), "history": HIST[jnp.array([2, 0, 1])].at[0, 0].set(4),
           "history_len": jnp.array([2, 8, 3]), "target": jnp.array([3, 8, 2])}
  moved = np.asarray(enc(other))
  np.testing.assert_allclose(moved[1], base[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(moved[2], base[1], rtol=1e-6, atol=1e-6)
  alone = np.asarray(enc({k: v[:1] for k, v in BATCH.items()}))  # a batch of one (--mode=recommend)
  np.testing.assert_allclose(alone[0], base[0], rtol=1e-6, atol=1e-6)
  wider = np.asarray(enc(dict(BATCH, history=jnp.pad(HIST, ((0, 0), (0, 2))))))  # more padding columns
  np.testing.assert_allclose(wider, base, rtol=1e-6, atol=1e-6)
  # The layer: identical behaviours route identically for one user id, independently for two, and a
  # new key (a new training step) redraws them.
  layer = il.B2IRouting(K, D)
  E, _, _ = _inputs()
  E = jnp.asarray(np.repeat(E[:1], 2, 0))
  ones_b, ones_k = jnp.ones((2, L), bool), jnp.ones((2, K), bool)
  lp = layer.init(RNGS, E, ones_b, ones_k, jnp.array([4, 4]))
  route = lambda users, k: np.asarray(layer.apply(lp, E, ones_b, ones_k, jnp.asarray(users),  # noqa: E731
                                                  rngs={"routing": jax.random.key(k)}))
  same, two = route([4, 4], 0), route([4, 5], 0)
  np.testing.assert_array_equal(same[0], same[1])
  np.testing.assert_array_equal(two[0], same[0])
  assert not np.allclose(two[1], two[0])
  assert not np.allclose(route([4, 4], 1)[0], same[0])


def test_mind_routing_uses_the_routing_rng_and_config_errors_are_clear(mind_model):
  model, params = mind_model
  enc = jax.jit(lambda k: model.apply(params, BATCH, TABLES, rngs={"routing": jax.random.key(k)},
                                      method=model.encode_users)[0])
  np.testing.assert_array_equal(np.asarray(enc(7)), np.asarray(enc(7)))
  assert not np.allclose(enc(7)[0], enc(8)[0])
  # Bad config values fail at construction / init with the field named.
  with pytest.raises(ValueError, match="model.softmax_axis"):
    mind.MODELS["mind"](_cfg("mind", softmax_axis="rows"), _data().spec).init(RNGS, BATCH, TABLES)
  with pytest.raises(ValueError, match="model.label_power"):
    mind.MODELS["mind"](_cfg("mind", label_power="soft"), _data().spec)


def test_mind_recency_weights_start_as_the_paper_and_learn_from_the_order():
  cfg = _cfg("mind", recency_weights=True)
  model = mind.MODELS["mind"](cfg, _data().spec)
  plain, plain_params = _build("mind", 4)
  params = jax.jit(model.init)(RNGS, BATCH, TABLES)
  assert params["params"]["recency_logits"].shape == (8,)  # maxlen distances, zero at init
  # The same parameters but the recency logits: identical interests (all weights 1 at init).
  shared = {"params": {**plain_params["params"], "recency_logits": params["params"]["recency_logits"]}}
  enc = jax.jit(lambda p, b: model.apply(p, b, TABLES, rngs={"routing": jax.random.key(5)},
                                         method=model.encode_users)[0])
  want = plain.apply(plain_params, BATCH, TABLES, rngs={"routing": jax.random.key(5)}, method=plain.encode_users)[0]
  np.testing.assert_allclose(np.asarray(enc(shared, BATCH)), np.asarray(want), rtol=1e-5, atol=1e-6)
  # Weighting the newest behaviour (distance 0) moves user 0's interests; padding still changes nothing.
  tilted = {"params": {**shared["params"], "recency_logits": jnp.zeros(8).at[0].set(3.0)}}
  moved = np.asarray(enc(tilted, BATCH))
  assert not np.allclose(moved[0], np.asarray(want)[0], atol=1e-3)
  padded = np.asarray(enc(tilted, dict(BATCH, history=HIST.at[1, 3:].set(8))))
  np.testing.assert_allclose(padded, moved, rtol=1e-5, atol=1e-6)
  # The logits are trained: the loss reaches them through routing.
  g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, BATCH, TABLES, rngs={"routing": jax.random.key(3)})[0]
                                          * jnp.arange(8.0))))(params)
  assert float(jnp.abs(g["params"]["recency_logits"]).sum()) > 0
