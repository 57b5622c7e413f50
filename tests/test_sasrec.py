"""SASRec (models/sasrec.py): registry, shapes, causality, padding, a numpy reference of its
equations, the all-positions loss's targets and windows, and a smoke run through the retrieval task."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvhan_jax import configs, models, retrieval, tasks
from mvhan_jax.configs import load_config
from mvhan_jax.data import protocol
from mvhan_jax.features import DataSpec, FeatureSpec
from mvhan_jax.metrics_writer import read_metrics
from mvhan_jax.models.sasrec import SASRec
from mvhan_jax.tasks import retrieval as rtask

I, L = 30, 6
ITEM_SPECS = (FeatureSpec("genres", "multi", 4),)
TABLES = {"user": {}, "item": {"genres": jnp.asarray(np.random.default_rng(0).integers(0, 4, (I, 2)))}}


def _batch(seed=0, b=5):
  rng = np.random.default_rng(seed)
  lens = np.array([1, 3, L, 4, 2][:b], np.int32)
  hist = rng.integers(0, I, (b, L)).astype(np.int32)
  hist[np.arange(L)[None, :] >= lens[:, None]] = 0
  return {"user": np.arange(b, dtype=np.int32), "history": jnp.asarray(hist), "history_len": jnp.asarray(lens),
          "target": jnp.asarray(rng.integers(0, I, b).astype(np.int32))}


def _model(**kw):
  return SASRec(**{**dict(num_items=I, item_specs=ITEM_SPECS, dim=8, num_blocks=2, num_heads=2, maxlen=L,
                          dropout=0.3), **kw})


def _init(model, batch=None):
  return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, batch or _batch(), TABLES)


def test_registered_and_built_from_config():
  assert "sasrec" in models.MODELS
  cfg = load_config("experiments/configs/sasrec_ml100k.py:blocks=3,heads=2,dropout=0.5,norm=post,maxlen=20")
  model = models.build_model(cfg.model, DataSpec("t", 3, I, item_specs=ITEM_SPECS))
  assert isinstance(model, SASRec)
  assert (model.num_blocks, model.num_heads, model.dropout, model.norm, model.maxlen) == (3, 2, 0.5, "post", 20)
  assert cfg.loss.positions == "last" or cfg.train_examples == "windows"


@pytest.mark.parametrize("kw", [{}, {"norm": "post"}, {"positions": "recency"}, {"item_fields": True},
                                {"normalize": False}])
def test_shapes_and_finite(kw):
  model, batch = _model(**kw), _batch()
  params = _init(model)
  users = model.apply(params, batch, TABLES, method=model.encode_users)
  items = model.apply(params, jnp.arange(I), TABLES, method=model.encode_items)
  seq, valid = model.apply(params, batch, TABLES, method=model.encode_positions)
  assert users.shape == (5, 8) and items.shape == (I, 8) and seq.shape == (5, L, 8) and valid.shape == (5, L)
  assert np.isfinite(np.asarray(users)).all() and np.isfinite(np.asarray(items)).all()
  if kw.get("normalize", True):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(users), axis=-1), 1.0, rtol=1e-5)
  # The user vector is the sequence output at history_len - 1.
  last = np.asarray(batch["history_len"]) - 1
  np.testing.assert_allclose(np.asarray(users), np.asarray(seq)[np.arange(5), last], rtol=1e-6, atol=1e-6)
  # Training mode draws dropout; evaluation mode is deterministic.
  a = model.apply(params, batch, TABLES, True, method=model.encode_users, rngs={"dropout": jax.random.key(2)})
  b = model.apply(params, batch, TABLES, True, method=model.encode_users, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kw", [{}, {"norm": "post"}, {"positions": "recency"}])
def test_padding_beyond_history_len_does_not_matter(kw):
  model, batch = _model(**kw), _batch()
  params = _init(model)
  noisy = dict(batch)
  rng = np.random.default_rng(7)
  hist = np.asarray(batch["history"]).copy()
  pad = np.arange(L)[None, :] >= np.asarray(batch["history_len"])[:, None]
  hist[pad] = rng.integers(0, I, pad.sum())
  noisy["history"] = jnp.asarray(hist)
  a = model.apply(params, batch, TABLES, method=model.encode_users)
  b = model.apply(params, noisy, TABLES, method=model.encode_users)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_causal_prefix_vector_ignores_later_items(norm):
  """Absolute positions: the vector at position p is the user vector of the prefix history[:p+1],
  whatever the items after p are."""
  model = _model(norm=norm)
  full = {k: v[2:3] for k, v in _batch().items()}  # history_len = L
  params = _init(model, full)
  seq, _ = model.apply(params, full, TABLES, method=model.encode_positions)
  rng = np.random.default_rng(3)
  for p in range(L):
    prefix = dict(full, history_len=jnp.asarray([p + 1], jnp.int32))
    user = model.apply(params, prefix, TABLES, method=model.encode_users)
    np.testing.assert_allclose(np.asarray(user[0]), np.asarray(seq[0, p]), rtol=1e-5, atol=1e-6)
    # Change every later item (same history_len): positions <= p are unchanged.
    hist = np.asarray(full["history"]).copy()
    hist[0, p + 1:] = rng.integers(0, I, L - p - 1)
    seq2, _ = model.apply(params, dict(full, history=jnp.asarray(hist)), TABLES, method=model.encode_positions)
    np.testing.assert_allclose(np.asarray(seq2[0, :p + 1]), np.asarray(seq[0, :p + 1]), rtol=1e-5, atol=1e-6)
    if p < L - 1:
      assert not np.allclose(np.asarray(seq2[0, p + 1:]), np.asarray(seq[0, p + 1:]))


def _layer_norm(x, p, eps=1e-8):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _attention(x, p, heads, mask):
  q = np.einsum("ld,dhk->lhk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("ld,dhk->lhk", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("ld,dhk->lhk", x, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[None], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  o = np.einsum("hqs,shk->qhk", w, v)
  return np.einsum("qhk,hkd->qd", o, p["out"]["kernel"]) + p["out"]["bias"]


def _reference(params, history, n, norm, blocks, heads, dim):
  """SASRec by hand (numpy, no dropout) for one left-aligned history of length n: the output at n-1."""
  p = jax.tree.map(np.asarray, params["params"])
  h = np.asarray(history)[:n]
  x = p["item_id_embed"]["embedding"][h] * np.sqrt(dim) + p["position_embed"]["embedding"][np.arange(n)]
  mask = np.tril(np.ones((n, n), bool))
  for i in range(blocks):
    b = p[f"block_{i}"]
    ffn = lambda y: np.maximum(y @ b["ffn_in"]["kernel"] + b["ffn_in"]["bias"], 0) @ b["ffn_out"]["kernel"] \
        + b["ffn_out"]["bias"]  # noqa: E731
    if norm == "pre":
      x = x + _attention(_layer_norm(x, b["attention_norm"]), b["attention"], heads, mask)
      x = x + ffn(_layer_norm(x, b["ffn_norm"]))
    else:
      x = _layer_norm(x + _attention(x, b["attention"], heads, mask), b["attention_norm"])
      x = _layer_norm(x + ffn(x), b["ffn_norm"])
  if norm == "pre":
    x = _layer_norm(x, p["final_norm"])
  out = x[n - 1]
  return out / np.linalg.norm(out)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_matches_numpy_reference(norm):
  model, batch = _model(norm=norm, item_specs=()), _batch()
  params = _init(model)
  users = np.asarray(model.apply(params, batch, TABLES, method=model.encode_users))
  for row in range(5):
    ref = _reference(params, batch["history"][row], int(batch["history_len"][row]), norm, 2, 2, 8)
    np.testing.assert_allclose(users[row], ref, rtol=2e-4, atol=2e-5)
  items = np.asarray(model.apply(params, jnp.arange(I), TABLES, method=model.encode_items))
  emb = np.asarray(params["params"]["item_id_embed"]["embedding"])
  np.testing.assert_allclose(items, emb / np.linalg.norm(emb, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_history_wider_than_maxlen_is_an_error():
  model = _model(maxlen=L - 1)
  with pytest.raises(ValueError, match="model.maxlen"):
    _init(model)


def test_position_targets_hand_example():
  hist = jnp.array([[5, 6, 7, 0], [1, 0, 0, 0], [2, 3, 4, 8]])
  got = rtask.position_targets(hist, jnp.array([3, 1, 4]), jnp.array([9, 10, 11]))
  np.testing.assert_array_equal(np.asarray(got), [[6, 7, 9, 9], [10, 10, 10, 10], [3, 4, 8, 11]])


def test_training_windows_predict_every_item_once():
  seqs = [np.arange(100, 100 + n) for n in (1, 2, 5, 7, 12)]
  maxlen = 3
  win = protocol.training_windows(seqs, maxlen)
  full = protocol.training_examples(seqs, maxlen)
  predicted = []
  for h, n, t in zip(win["history"], win["history_len"], win["target"]):
    assert n == maxlen or n == t - h[0]  # full windows, or the sequence's start
    predicted += list(h[1:n]) + [t]
  assert sorted(predicted) == sorted(int(x) for s in seqs for x in s[1:])
  # Each window is one of the prefix examples (same fields), the last one of each user included.
  rows = {tuple(r) for r in np.c_[full["user"], full["history"], full["history_len"], full["target"]]}
  assert all(tuple(r) in rows for r in np.c_[win["user"], win["history"], win["history_len"], win["target"]])
  assert set(win["target"]) >= {s[-1] for s in seqs if len(s) > 1}


def test_all_positions_needs_a_per_position_model():
  cfg = load_config("experiments/configs/two_tower_ml100k.py:smoke")
  cfg.loss.positions = "all"
  with pytest.raises(configs.ConfigError, match="encode_positions"):
    rtask.build_experiment(cfg)
  cfg.loss.positions = "every"
  with pytest.raises(configs.ConfigError, match="loss.positions"):
    rtask.check_config(cfg)
  cfg.loss.positions = "all"
  cfg.loss.kind = "in_batch"
  with pytest.raises(configs.ConfigError, match="full_softmax"):
    rtask.check_config(cfg)


@pytest.mark.parametrize("arg", ["smoke", "smoke,loss=last,examples=prefixes", "smoke,softmax=full"])
def test_smoke_run_learns_and_serves(arg, tmp_path):
  cfg = load_config(f"experiments/configs/sasrec_ml100k.py:{arg}")
  results = tasks.train_and_evaluate(cfg, str(tmp_path))
  losses = [r["train/loss"] for r in read_metrics(str(tmp_path)) if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.3, losses
  assert results["valid"]["HR@50"] > 0.07, results["valid"]  # random: 50 / 1,682 = 0.03
  assert results["index"]["ann_recall@10"] > 0.8

  exp = rtask.build_experiment(cfg)
  params, _ = rtask.restore_params(str(tmp_path), exp)
  test = exp.eval_sets["test"]
  users, mask = rtask.encode_users(exp, params, test)
  assert mask is None and users.shape == (len(test.user), cfg.model.dim)
  # The evaluation's encoder agrees exactly with a direct apply of the model on the same batch (all
  # test rows: one evaluation chunk), and to rounding on a sub-batch (other shapes, other XLA kernels).
  batch = {"user": test.user, "history": test.history, "history_len": test.history_len}
  apply = jax.jit(lambda p, b: exp.model.apply(p, b, exp.tables, False, method=exp.model.encode_users))
  np.testing.assert_array_equal(users, np.asarray(apply(params, batch)))
  sub = apply(params, {k: v[:64] for k, v in batch.items()})
  np.testing.assert_allclose(users[:64], np.asarray(sub), rtol=1e-5, atol=1e-6)
  items = rtask.encode_items(exp, params)
  direct_items = jax.jit(lambda p: exp.model.apply(p, jnp.arange(exp.data.num_items), exp.tables,
                                                   method=exp.model.encode_items))(params)
  np.testing.assert_array_equal(items, np.asarray(direct_items))
  index = retrieval.load_index(os.path.join(str(tmp_path), "index"))
  recs = rtask.recommend(exp, index, params, int(test.user[3]), 10)
  assert len({i for i, _ in recs}) == 10
