"""MV-HAN (Fan et al., ASE'22) and MV-DNN: parameter sharing as the flags say, per-type heads, attention
masks and behaviour positions, cosine outputs, temperature, config errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mvhan_jax.data.types import InteractionData
from mvhan_jax.features import FeatureSpec
from mvhan_jax.models.mvhan import (MODELS, MVDNN, MVHAN, AttentionBlock, FEL, from_config, mv_dnn_from_config,
                                   recent_behaviours)

T, D, I = 3, 8, 8
USER_SPECS = (FeatureSpec("age", "categorical", 4),)
ITEM_SPECS = (FeatureSpec("type", "categorical", T + 1), FeatureSpec("genres", "multi", 5),
              FeatureSpec("vec", "dense", 2))
# Items 0, 2, 4, 6 share genres and vec; 0 and 6 are type 1, 2 is type 2, 4 is type 3; 7 has unknown type 0.
TABLES = {
    "user": {"age": jnp.array([1, 2, 3])},
    "item": {
        "type": jnp.array([1, 1, 2, 2, 3, 3, 1, 0]),
        "genres": jnp.array([[1, 2], [3, 0], [1, 2], [4, 0], [1, 2], [0, 0], [1, 2], [1, 2]]),
        "vec": jnp.array([[1.0, 0.5], [0.0, 1.0], [1.0, 0.5], [2.0, 0.0], [1.0, 0.5], [0.5, 0.5],
                          [1.0, 0.5], [1.0, 0.5]]),
    },
}
# Init batch: all targets of type 1, so per-type parameters must exist without being seen.
BATCH = {"user": jnp.array([0, 1, 2]),
         "history": jnp.array([[1, 2, 3, 4, 0], [5, 0, 0, 0, 0], [0, 0, 0, 0, 0]]),
         "history_len": jnp.array([4, 1, 0]),
         "target": jnp.array([0, 1, 6])}
VARIANTS = {
    "shared": {},
    "exclusive": dict(share_embeddings=False, share_fel=False),
    "mlp": dict(interaction="mlp"),
}
_CACHE = {}
# Speed on 2 CPU cores: whole towers are jitted (one compile per variant, reused across batches of one
# shape), and the shared test parameters are drawn with numpy over the tree that the model's own
# ``init`` traces (``jax.eval_shape``), since compiling ``init`` costs more than every forward pass.
# ``test_real_init_creates_every_per_type_copy`` runs the real ``init`` once.
KEY = jax.random.key(0, impl="unsafe_rbg")  # cheaper to compile than threefry; any key works


def _model(cls=MVHAN, **kw):
  kw = dict(dict(dim=D, fel_layers=1, num_heads=2, mrl_hidden=(16,), num_behaviour_tokens=3), **kw)
  return cls(num_users=3, num_items=I, num_types=T, user_specs=USER_SPECS, item_specs=ITEM_SPECS, **kw)


def _shapes(model):
  return jax.eval_shape(model.init, KEY, BATCH, TABLES)


def _draw(shapes, seed=0):
  """Parameters for the tree ``shapes``: LayerNorm scales 1, everything else N(0, 0.3^2)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.ones(s.shape) if jax.tree_util.keystr(path).endswith("['scale']")
      else jnp.asarray(rng.normal(0.0, 0.3, s.shape), jnp.float32), shapes)


def _init(variant="shared"):
  """(model, params, forward) for a variant; forward(params, batch) -> (users [B, D], all items [I, D])."""
  if variant not in _CACHE:
    model = _model(**VARIANTS[variant])
    params = _draw(_shapes(model))

    @jax.jit
    def forward(p, batch):
      users = model.apply(p, batch, TABLES, method=model.encode_users)
      return users, model.apply(p, jnp.arange(I), TABLES, method=model.encode_items)

    _CACHE[variant] = model, params, forward
  return _CACHE[variant]


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def _copy(params):
  return jax.tree_util.tree_map(lambda x: x, params)


def test_parameter_tree_follows_the_sharing_flags():
  # Two FEL blocks here (the other tests run one, to compile faster); shapes only, no compile.
  sp = _shapes(_model(fel_layers=2))["params"]
  ep = _shapes(_model(fel_layers=2, **VARIANTS["exclusive"]))["params"]
  # One content FEL shared by all types: an unstacked attention kernel [D, H, D/H].
  assert set(sp["content_fel"]) == {"attention_0", "attention_1", "final_norm"}
  mha = sp["content_fel"]["attention_0"]["MultiHeadDotProductAttention_0"]
  assert mha["query"]["kernel"].shape == (D, 2, 4)
  # One FEL per type: every content-FEL leaf is stacked with a leading axis T; same structure otherwise.
  assert jax.tree_util.tree_structure(sp["content_fel"]) == jax.tree_util.tree_structure(ep["content_fel"])
  for (path, a), (_, b) in zip(_leaves(sp["content_fel"]), _leaves(ep["content_fel"])):
    assert b.shape == (T,) + a.shape, path
  # Per-type MRL heads in both, created although the init batch held type 1 only.
  for p in (sp, ep):
    for path, leaf in _leaves(p["content_heads"]):
      assert leaf.shape[0] == T, path
  # Content embedding tables: one set when shared, T sets when exclusive.
  assert sp["content_embed"]["id_embed"]["embedding"].shape == (I, D)
  assert ep["content_embed"]["id_embed"]["embedding"].shape == (T, I, D)
  assert ep["content_embed"]["fields"]["genres_embed"]["embedding"].shape == (T, 5, D)
  assert sp["position_embed"]["embedding"].shape == (3, D)  # one per behaviour slot
  assert "type_embed" not in sp["content_embed"]["fields"]  # type selects a head; it is not a token
  # The user tower is shared across types in every variant (nothing stacked).
  shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)
  assert shapes(ep["user_fel"]) == shapes(sp["user_fel"])
  assert ep["user_mlp"]["Dense_0"]["kernel"].shape == sp["user_mlp"]["Dense_0"]["kernel"].shape


def test_untied_behaviour_embeddings_are_the_user_towers_own():
  model = _model(tie_behaviour_embeddings=False)
  params = _draw(_shapes(model))
  assert params["params"]["behaviour_embed"]["embedding"].shape == (I, D)
  users = jax.jit(lambda p: model.apply(p, BATCH, TABLES, method=model.encode_users))
  before = users(params)
  # The content tower's id table no longer reaches the user vector; the behaviour table does.
  moved = _copy(params)
  moved["params"]["content_embed"]["id_embed"]["embedding"] += 1.0
  np.testing.assert_array_equal(np.asarray(users(moved)), np.asarray(before))
  moved = _copy(params)
  # (not a constant shift: the FEL's LayerNorm removes those)
  moved["params"]["behaviour_embed"]["embedding"] = moved["params"]["behaviour_embed"]["embedding"].at[2].add(
      jnp.linspace(-1.0, 1.0, D))
  assert not np.allclose(np.asarray(users(moved))[0], np.asarray(before)[0])  # user 0's history holds item 2
  np.testing.assert_allclose(np.asarray(users(moved))[2], np.asarray(before)[2], atol=1e-6)  # empty history


def test_without_the_user_id_token_users_are_their_profile_and_history():
  model = _model(user_id_token=False)
  params = _draw(_shapes(model))
  assert "user_id_embed" not in params["params"] and "user_id_embed" in _shapes(_model())["params"]
  users = jax.jit(lambda p, b: model.apply(p, b, TABLES, method=model.encode_users))
  # Users 0 and 1 (different ids) with the same age and history get the same vector.
  tables_same_age = {**TABLES, "user": {"age": jnp.array([1, 1, 1])}}
  same = {**BATCH, "history": jnp.tile(BATCH["history"][:1], (3, 1)), "history_len": jnp.array([4, 4, 4])}
  out = np.asarray(model.apply(params, same, tables_same_age, method=model.encode_users))
  np.testing.assert_allclose(out[0], out[1], atol=1e-6)
  assert np.all(np.isfinite(np.asarray(users(params, BATCH))))


def test_last_token_readout_reads_the_most_recent_behaviour_slot():
  model = _model(last_token_readout=True, user_id_token=False)
  params = _draw(_shapes(model))
  users = jax.jit(lambda p: model.apply(p, BATCH, TABLES, method=model.encode_users))
  before = np.asarray(users(params))
  # Zeroing the read-out projection gives the tower without it (same other parameters).
  plain = _model(user_id_token=False)
  p0 = {"params": {k: v for k, v in params["params"].items() if k != "last_readout"}}
  off = _copy(params)
  off["params"]["last_readout"] = jax.tree_util.tree_map(jnp.zeros_like, params["params"]["last_readout"])
  np.testing.assert_allclose(np.asarray(users(off)), np.asarray(plain.apply(p0, BATCH, TABLES, method=plain.encode_users)),
                             atol=1e-6)
  assert not np.allclose(before[:2], np.asarray(users(off))[:2])  # histories 1 and 2 are not empty
  with pytest.raises(ValueError, match="last_token_readout"):
    _shapes(_model(last_token_readout=True, num_behaviour_tokens=0))


def test_item_id_residual_adds_the_shared_id_embedding_to_the_head():
  """item_id_residual: content vector = normalise(type head + id embedding); with every head's last
  layer zeroed it is the normalised id row, the same table the behaviour tokens read."""
  for variant in ("shared", "exclusive"):
    model = _model(item_id_residual=True, **VARIANTS[variant])
    params = _draw(_shapes(model))
    items = jax.jit(lambda p: model.apply(p, jnp.arange(I), TABLES, method=model.encode_items))
    plain = _model(**VARIANTS[variant])
    with_head = np.asarray(items(params))
    assert not np.allclose(with_head, np.asarray(plain.apply(params, jnp.arange(I), TABLES, method=plain.encode_items)),
                           atol=1e-3)
    off = _copy(params)
    heads = off["params"]["content_heads"]
    last = sorted(heads)[-1]
    heads[last] = jax.tree_util.tree_map(jnp.zeros_like, heads[last])
    ids = np.asarray(model.apply(off, jnp.arange(I), TABLES, method=model.behaviour_embedding))
    np.testing.assert_allclose(np.asarray(items(off)), ids / np.linalg.norm(ids, axis=-1, keepdims=True),
                               atol=1e-5)


def test_causal_behaviour_encoder_vector_of_every_prefix():
  """behaviour_encoder='causal': the vector at history position p is the tower's user vector of the
  prefix history[:p+1] (profile and id included), later items change only later positions, and the
  'tokens' tower refuses encode_positions."""
  model = _model(behaviour_encoder="causal", maxlen=5, causal_dropout=0.1, last_token_readout=True)
  params = _draw(_shapes(model))
  assert "causal_0" in params["params"] and model.encodes_positions and not _model().encodes_positions
  positions = jax.jit(lambda p, b: model.apply(p, b, TABLES, method=model.encode_positions))
  users = jax.jit(lambda p, b: model.apply(p, b, TABLES, method=model.encode_users))
  full = {**BATCH, "history": jnp.array([[1, 2, 3, 4, 5]] * 3), "history_len": jnp.array([5, 5, 5])}
  seq, valid = positions(params, full)
  assert seq.shape == (3, 5, D) and bool(valid.all())
  np.testing.assert_allclose(np.linalg.norm(np.asarray(seq), axis=-1), 1.0, rtol=1e-5)
  rng = np.random.default_rng(0)
  for p in range(5):
    prefix = {**full, "history_len": jnp.full((3,), p + 1)}
    np.testing.assert_allclose(np.asarray(users(params, prefix)), np.asarray(seq[:, p]), atol=1e-5)
    hist = np.asarray(full["history"]).copy()
    hist[:, p + 1:] = rng.integers(0, I, (3, 4 - p))
    seq2, _ = positions(params, {**full, "history": jnp.asarray(hist)})
    np.testing.assert_allclose(np.asarray(seq2[:, :p + 1]), np.asarray(seq[:, :p + 1]), atol=1e-6)
    if p < 4:
      assert not np.allclose(np.asarray(seq2[:, p + 1:]), np.asarray(seq[:, p + 1:]))
  # Same history, different users (id and age): different vectors. Empty history: finite, and
  # padding beyond history_len is never read.
  assert not np.allclose(np.asarray(seq[0]), np.asarray(seq[1]))
  empty = np.asarray(users(params, BATCH))[2]
  noisy = {**BATCH, "history": BATCH["history"].at[2].set(jnp.array([3, 1, 4, 1, 5]))}
  np.testing.assert_allclose(np.asarray(users(params, noisy))[2], empty, atol=1e-6)
  # Training mode draws the encoder's dropout.
  a, b = (model.apply(params, full, TABLES, True, method=model.encode_users, rngs={"dropout": jax.random.key(k)})
          for k in (1, 2))
  assert not np.allclose(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="behaviour_encoder='causal'"):
    _model().apply(_draw(_shapes(_model())), BATCH, TABLES, method=MVHAN.encode_positions)
  with pytest.raises(ValueError, match="maxlen"):
    _model(behaviour_encoder="causal", maxlen=3).apply(params, full, TABLES, method=MVHAN.encode_users)
  with pytest.raises(ValueError, match="behaviour_encoder"):
    _shapes(_model(behaviour_encoder="gru"))


def test_sasrec_gate_starts_as_sasrec_and_opens_onto_the_heads():
  """sasrec_gate: with both gates at 0 the user vector is the normalised causal state at the newest
  position (SASRec's read-out) and the item vector the normalised shared id row; open gates add the
  FEL/MLP heads; an empty history (all-zero vector at gate 0) has finite gradients."""
  model = _model(behaviour_encoder="causal", maxlen=5, causal_dropout=0.0, sasrec_gate=True)
  params = _draw(_shapes(model))
  closed = _copy(params)
  closed["params"]["user_gate"] = jnp.zeros(())
  closed["params"]["item_gate"] = jnp.zeros(())
  users = np.asarray(model.apply(closed, BATCH, TABLES, method=model.encode_users))
  seq, _ = model.apply(closed, BATCH, TABLES, method=model.causal_sequence)
  state = np.asarray(seq)[np.arange(3), np.maximum(np.asarray(BATCH["history_len"]) - 1, 0)]
  state[2] = 0.0  # empty history: no state
  want = state / np.maximum(np.linalg.norm(state, axis=-1, keepdims=True), 1e-6)
  np.testing.assert_allclose(users, want, atol=1e-5)
  ids = np.asarray(model.apply(closed, jnp.arange(I), TABLES, method=model.behaviour_embedding))
  items = np.asarray(model.apply(closed, jnp.arange(I), TABLES, method=model.encode_items))
  np.testing.assert_allclose(items, ids / np.linalg.norm(ids, axis=-1, keepdims=True), atol=1e-5)
  opened = _copy(params)
  opened["params"]["user_gate"] = jnp.ones(())
  opened["params"]["item_gate"] = jnp.ones(())
  assert not np.allclose(np.asarray(model.apply(opened, BATCH, TABLES, method=model.encode_users))[:2], users[:2], atol=1e-3)
  assert not np.allclose(np.asarray(model.apply(opened, jnp.arange(I), TABLES, method=model.encode_items)), items, atol=1e-3)

  def loss(p):
    u, valid = model.apply(p, {**BATCH, "history_len": jnp.array([4, 1, 0])}, TABLES, method=model.encode_positions)
    return jnp.sum(u.sum(-1) * valid) + jnp.sum(model.apply(p, BATCH, TABLES, method=model.encode_users))

  grads = jax.grad(loss)(closed)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads["params"]["user_gate"])) > 0  # the closed gate still learns
  with pytest.raises(ValueError, match="sasrec_gate needs model.behaviour_encoder='causal'"):
    _shapes(_model(sasrec_gate=True))


def test_causal_tower_learns_a_transition_map_at_every_position():
  """A learning signal: sequences that walk 0 -> 1 -> ... -> 7 -> 0 from a random start; trained with
  the all-positions cross-entropy, the causal tower predicts the next item at every position."""
  model = _model(behaviour_encoder="causal", maxlen=6, causal_dropout=0.0, user_id_token=False)
  rng = np.random.default_rng(0)
  start = rng.integers(0, I, 64)
  history = jnp.asarray((start[:, None] + np.arange(6)[None]) % I)
  batch = {"user": jnp.asarray(rng.integers(0, 3, 64)), "history": history,
           "history_len": jnp.asarray(rng.integers(1, 7, 64)), "target": jnp.zeros(64, jnp.int32)}
  nxt = (history + 1) % I

  def loss_fn(p):
    users, valid = model.apply(p, batch, TABLES, method=model.encode_positions)
    items = model.apply(p, jnp.arange(I), TABLES, method=model.encode_items)
    logits = users @ items.T / 0.1
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, nxt)
    return jnp.sum(ce * valid) / valid.sum(), (jnp.argmax(logits, -1) == nxt, valid)

  params = model.init(KEY, batch, TABLES)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss, aux

  first = None
  for _ in range(150):
    params, opt, loss, (hit, valid) = step(params, opt)
    first = float(loss) if first is None else first
  acc = float(jnp.sum(hit * valid) / valid.sum())
  assert float(loss) < 0.2 * first and acc > 0.95, (first, float(loss), acc)


def test_real_init_creates_every_per_type_copy():
  model = _model(**VARIANTS["exclusive"])
  params = jax.jit(model.init)(KEY, BATCH, TABLES)  # BATCH's targets are all type 1
  shapes = _shapes(model)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes)
  # Every per-type copy is its own draw (split init RNG), not one copy broadcast T times.
  p = params["params"]
  for tree in (p["content_heads"], p["content_fel"], p["content_embed"]["id_embed"]):
    for path, leaf in _leaves(tree):
      if np.ptp(leaf[0]) > 0:  # constant inits (zero biases, unit scales) are equal in every copy
        assert not np.allclose(leaf[0], leaf[1]) and not np.allclose(leaf[1], leaf[2]), path
  _, forward = _init("exclusive")[::2]
  assert np.all(np.isfinite(forward(params, BATCH)[1]))


@pytest.mark.parametrize("variant", ["shared", "exclusive"])
def test_target_type_update_leaves_the_source_head_untouched(variant):
  model, params, _ = _init(variant)

  @jax.jit
  @jax.grad
  def grad(p):  # a softmax over type-2 items only (2, 3), scored against a fixed user vector
    e = model.apply(p, jnp.array([2, 3, 2]), TABLES, method=model.encode_items)
    return -jax.nn.log_softmax(e @ jnp.linspace(-1.0, 1.0, D))[0]

  grads = grad(params)
  g = grads["params"]
  for path, leaf in _leaves(g["content_heads"]):
    assert not np.any(leaf[0]), f"type-1 (source) head got a gradient at {path}"
    assert not np.any(leaf[2]), f"type-3 head got a gradient at {path}"
    assert np.any(leaf[1]), f"type-2 head got no gradient at {path}"
  q = g["content_fel"]["attention_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  if variant == "shared":
    assert np.any(q)  # the shared FEL learns from the target type
  else:
    assert not np.any(q[0]) and np.any(q[1])  # only the type-2 FEL does

  tx = optax.sgd(0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  old, new = params["params"], optax.apply_updates(params, updates)["params"]
  for (path, a), (_, b) in zip(_leaves(old["content_heads"]), _leaves(new["content_heads"])):
    np.testing.assert_array_equal(a[0], b[0], err_msg=f"source head changed at {path}")
    assert not np.array_equal(a[1], b[1]), path
  if variant == "shared":
    for (path, a), (_, b) in zip(_leaves(old["content_fel"]), _leaves(new["content_fel"])):
      key = jax.tree_util.keystr(path)
      if key.endswith("['key']['bias']"):
        continue  # a key bias shifts all of a query's logits equally: softmax-invariant, zero gradient
      assert not np.array_equal(a, b), f"shared content FEL unchanged at {key}"


def test_recent_behaviours_are_indexed_by_distance_from_the_most_recent():
  hist = jnp.array([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]])
  ids, live = recent_behaviours(hist, jnp.array([3, 5, 0]), 4)
  np.testing.assert_array_equal(live, [[True, True, True, False], [True, True, True, True], [False] * 4])
  np.testing.assert_array_equal(np.where(live, ids, -1), [[7, 6, 5, -1], [5, 4, 3, 2], [-1] * 4])
  # K > L: the extra slots are always padding
  _, live = recent_behaviours(hist[:, :2], jnp.array([2, 2, 1]), 3)
  np.testing.assert_array_equal(live, [[True, True, False], [True, True, False], [True, False, False]])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_is_ignored_and_behaviour_order_matters(variant):
  _, params, forward = _init(variant)
  u, _ = forward(params, BATCH)
  assert np.all(np.isfinite(u))  # includes the user with history_len 0
  # Padded positions can hold anything (item 0 is a real item, so padding is masked by length).
  noisy = dict(BATCH, history=jnp.array([[1, 2, 3, 4, 7], [5, 6, 6, 1, 2], [3, 2, 1, 7, 7]]))
  np.testing.assert_allclose(forward(params, noisy)[0], u, rtol=1e-5, atol=1e-6)
  # Same items, other order: the pooled token is unchanged, the position-embedded tokens are not.
  permuted = dict(BATCH, history=jnp.array([[4, 3, 2, 1, 0], [5, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
  up, _ = forward(params, permuted)
  assert not np.allclose(up[0], u[0], atol=1e-4)
  np.testing.assert_allclose(up[1:], u[1:], rtol=1e-5, atol=1e-6)
  # A live behaviour matters.
  longer = dict(BATCH, history_len=jnp.array([4, 1, 1]))
  assert not np.allclose(forward(params, longer)[0][2], u[2], atol=1e-4)


def test_attention_ignores_padded_tokens_even_when_huge():
  """A padded behaviour with an enormous embedding would dominate any unmasked softmax."""
  _, params, forward = _init("shared")
  u, _ = forward(params, BATCH)
  p = _copy(params)
  table = p["params"]["content_embed"]["id_embed"]["embedding"]
  p["params"]["content_embed"]["id_embed"]["embedding"] = table.at[7].set(1e4)
  noisy = dict(BATCH, history=jnp.array([[1, 2, 3, 4, 7], [5, 7, 7, 7, 7], [7, 7, 7, 7, 7]]))
  np.testing.assert_allclose(forward(p, noisy)[0], u, rtol=1e-5, atol=1e-6)


def test_attention_block_masks_padded_keys():
  """The towers zero padded tokens before the FEL too; this checks the block's own key mask."""
  block = AttentionBlock(num_heads=2)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
  mask = jnp.array([[True, True, True, False, False], [False] * 5])
  params = _draw(jax.eval_shape(block.init, KEY, x, mask))
  apply = jax.jit(block.apply)
  y = apply(params, x, mask)
  y2 = apply(params, x.at[:, 3:].set(jnp.asarray(rng.normal(size=(2, 2, D)) * 100, jnp.float32)), mask)
  np.testing.assert_array_equal(y2[0, :3], y[0, :3])  # padded keys are not attended: weight exactly 0
  assert np.all(np.isfinite(y[1]))  # a fully masked row stays finite (uniform softmax, not NaN)


def test_fel_zeroes_padded_tokens_and_ignores_them_through_every_block():
  """Padded rows are left as they are between blocks; after two blocks a live token still has never
  seen them (exactly), and the FEL's output holds zeros in their place."""
  fel = FEL(num_layers=2, num_heads=2)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(3, 5, D)), jnp.float32)
  mask = jnp.array([[True, True, True, False, False], [True] * 5, [False] * 5])
  params = _draw(jax.eval_shape(fel.init, KEY, x, mask))
  apply = jax.jit(fel.apply)
  y = apply(params, x, mask).reshape(3, 5, D)
  noisy = x.at[:, 3:].set(jnp.asarray(rng.normal(size=(3, 2, D)) * 1e3, jnp.float32))
  y2 = apply(params, noisy, mask).reshape(3, 5, D)
  np.testing.assert_array_equal(y2[0, :3], y[0, :3])
  np.testing.assert_array_equal(y[0, 3:], 0.0)  # padded queries carry nothing onward
  np.testing.assert_array_equal(y[2], 0.0)  # a fully masked row: zeros, not NaN
  assert not np.allclose(y2[1, 3:], y[1, 3:])  # a live token at the same place does count


def test_mlp_interaction_has_no_attention_parameters():
  paths = [jax.tree_util.keystr(path) for path, _ in _leaves(_init("mlp")[1])]
  assert not any("ttention" in path for path in paths)
  assert any("content_fel']['mlp_0" in path for path in paths)
  mhsa_paths = [jax.tree_util.keystr(path) for path, _ in _leaves(_init("shared")[1])]
  assert any("MultiHeadDotProductAttention" in path for path in mhsa_paths)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_outputs_are_unit_norm(variant):
  _, params, forward = _init(variant)
  u, e = forward(params, BATCH)
  assert u.shape == (3, D) and e.shape == (I, D)
  np.testing.assert_allclose(np.linalg.norm(u, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)


def test_item_vector_depends_on_the_type_head():
  _, params, forward = _init("shared")
  p = _copy(params)
  table = p["params"]["content_embed"]["id_embed"]["embedding"]
  # Items 0, 2, 4, 6, 7 get one id embedding: with their identical fields they differ only in type.
  p["params"]["content_embed"]["id_embed"]["embedding"] = table.at[jnp.array([2, 4, 6, 7])].set(table[0])
  e = np.asarray(forward(p, BATCH)[1])
  np.testing.assert_allclose(e[6], e[0], rtol=1e-6)  # same type (1), same features
  np.testing.assert_allclose(e[7], e[0], rtol=1e-6)  # unknown type 0 is served by the type-1 head
  for a, b in [(0, 2), (0, 4), (2, 4)]:
    assert not np.allclose(e[a], e[b], atol=1e-3), (a, b)  # types 1, 2, 3: different heads


def test_dropout_is_random_in_training():
  model = _model(dropout=0.5, fel_layers=0)  # dropout after the per-type (vmapped) head's hidden layer
  params = _draw(_shapes(model))
  run = jax.jit(lambda k: model.apply(params, jnp.arange(I), TABLES, True, method=model.encode_items,
                                      rngs={"dropout": k}))
  assert not np.allclose(run(jax.random.key(1)), run(jax.random.key(2)))


def test_temperature_fixed_or_learned():
  model, params, _ = _init("shared")
  assert "log_temperature" not in params["params"]
  assert float(model.apply(params, method=model.temperature)) == pytest.approx(0.1)
  learned = _model(learn_temperature=True, init_temperature=0.05)
  assert _shapes(learned)["params"]["log_temperature"].shape == ()  # __call__ creates it
  lp = learned.init(KEY, method=learned.temperature)
  assert float(learned.apply(lp, method=learned.temperature)) == pytest.approx(0.05, rel=1e-5)
  grad = jax.grad(lambda p: learned.apply(p, method=learned.temperature))(lp)
  assert float(grad["params"]["log_temperature"]) == pytest.approx(0.05, rel=1e-5)  # d exp(x)/dx


def _data(with_type=True):
  item_features = {k: np.asarray(v) for k, v in TABLES["item"].items() if with_type or k != "type"}
  return InteractionData(
      name="tiny", num_users=3, num_items=I,
      user_features={"age": np.array([1, 2, 3], np.int32)}, item_features=item_features,
      vocab={"age": 4, "type": T + 1, "genres": 5},
      user=np.array([0, 1], np.int32), item=np.array([1, 2], np.int32), timestamp=np.array([0, 1]))


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(dim=D, mrl_hidden=(16,), num_behaviour_tokens=3), **kw))


def test_from_config_reads_num_types_and_builds_mv_dnn():
  assert MODELS == {"mvhan": from_config, "mv_dnn": mv_dnn_from_config}
  model = from_config(_cfg(share_fel=False, interaction="mlp"), _data().spec)
  assert isinstance(model, MVHAN) and model.num_types == T and not model.share_fel
  assert model.interaction == "mlp" and model.share_embeddings and model.fel_layers == 2
  with pytest.raises(ValueError, match="'type'"):
    from_config(_cfg(), _data(with_type=False).spec)
  with pytest.raises(ValueError, match="model.num_heads"):
    _shapes(from_config(_cfg(num_heads=3), _data().spec))
  with pytest.raises(ValueError, match="model.interaction"):
    _shapes(from_config(_cfg(interaction="gru"), _data().spec))
  dnn = mv_dnn_from_config(_cfg(), _data().spec)
  assert isinstance(dnn, MVDNN)
  params = _shapes(dnn)["params"]
  assert "content_fel" not in params and "user_fel" not in params  # fel_layers=0: no FEL parameters
  assert params["content_embed"]["id_embed"]["embedding"].shape == (T, I, D)
  assert params["content_heads"]["Dense_0"]["kernel"].shape[0] == T
  assert not any("ttention" in jax.tree_util.keystr(p) for p, _ in _leaves(params))
  with pytest.raises(ValueError, match="model.share_fel"):
    _shapes(_model(MVDNN, share_fel=True))
