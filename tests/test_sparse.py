"""Lazy row updates of large embedding tables (mvhan_jax/sparse.py), against dense references."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mvhan_jax import sparse
from mvhan_jax import train
from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = ("params", "item_embed", "embedding")


class _Model(nn.Module):
  """One large table looked up twice (a sequence and single ids, repeated ids), one small table."""

  @nn.compact
  def __call__(self, seq, single):
    table = nn.Embed(10, 4, name="item_embed")
    small = nn.Embed(3, 4, name="small_embed")(seq % 3).sum(1)
    h = jnp.tanh(table(seq).sum(1) + 2.0 * table(single) + small)
    return nn.Dense(1)(h)[:, 0]


def _loss(params, seq, single):
  out = _Model().apply(params, seq, single)
  return jnp.sum(jnp.square(out - 1.0)), {"mean": out.mean()}


@pytest.fixture(scope="module")
def params():
  return _Model().init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,), jnp.int32))


def test_only_large_embed_tables_are_sparse(params):
  assert sparse.sparse_table_paths(params, 5) == (TABLE,)
  assert sparse.sparse_table_paths(params, 3) == (TABLE, ("params", "small_embed", "embedding"))
  assert sparse.sparse_table_paths(params, 11) == ()
  assert sparse.sparse_table_paths(params, 0) == ()


def test_row_gradients_scatter_to_the_dense_gradient(params):
  seq = jnp.array([[1, 2, 2], [5, 9, 1]])
  single = jnp.array([7, 2])
  dense_grad = jax.grad(lambda p: _loss(p, seq, single)[0])(params)
  aux, grads, rows = jax.jit(lambda p: sparse.grads_by_rows(_loss, p, (TABLE,), seq, single))(params)
  ids, row_grads, valid = rows[TABLE]
  # 8 lookups, 5 distinct ids: sorted, then padding (id = num_rows, zero gradient).
  np.testing.assert_array_equal(ids, [1, 2, 5, 7, 9, 10, 10, 10])
  np.testing.assert_array_equal(valid, [True] * 5 + [False] * 3)
  assert not np.asarray(row_grads[5:]).any()
  scattered = jnp.zeros((10, 4)).at[ids].add(row_grads, mode="drop")
  np.testing.assert_allclose(scattered, dense_grad["params"]["item_embed"]["embedding"], rtol=1e-5, atol=1e-6)
  # Row 2 is looked up three times: its gradient is the sum of the three (not the last one).
  assert np.abs(np.asarray(scattered[2])).sum() > 0
  for name in ("Dense_0", "small_embed"):
    for a, b in zip(jax.tree.leaves(grads["params"][name]), jax.tree.leaves(dense_grad["params"][name])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(aux["mean"], _loss(params, seq, single)[1]["mean"], rtol=1e-6)


@pytest.mark.parametrize("clip", [1e-3, 100.0])  # clipping active / inactive
def test_lazy_adamw_is_adamw_when_every_row_is_looked_up(params, clip):
  seq = jnp.arange(10).reshape(2, 5)
  single = jnp.array([0, 9])
  lr = optax.linear_schedule(0.05, 0.01, 3)
  lazy = sparse.SparseTableAdamW(lr, weight_decay=0.1, grad_clip=clip, min_rows=5)
  dense = optax.chain(optax.clip_by_global_norm(clip), optax.adamw(lr, weight_decay=0.1))
  p1, s1 = params, lazy.init(params)
  p2, s2 = params, dense.init(params)
  for step in range(3):
    _, grads, rows = sparse.grads_by_rows(_loss, p1, (TABLE,), seq, single)
    p1, s1, norm = lazy.update(jnp.int32(step), grads, rows, s1, p1)
    g = jax.grad(lambda p: _loss(p, seq, single)[0])(p2)
    np.testing.assert_allclose(norm, optax.tree.norm(g), rtol=1e-5)
    updates, s2 = dense.update(g, s2, p2)
    p2 = optax.apply_updates(p2, updates)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(p1["params"]["item_embed"]["embedding"], params["params"]["item_embed"]["embedding"])


def test_rows_not_looked_up_keep_their_value_and_moments(params):
  seq = jnp.array([[1, 2, 2], [5, 9, 1]])
  single = jnp.array([7, 2])
  lazy = sparse.SparseTableAdamW(lambda s: 0.01, weight_decay=0.5, grad_clip=0.0, min_rows=5)
  state = lazy.init(params)
  assert jax.tree.leaves(state["mu"])[0].shape == (10, 4)
  _, grads, rows = sparse.grads_by_rows(_loss, params, (TABLE,), seq, single)
  new, state, _ = lazy.update(jnp.int32(0), grads, rows, state, params)
  before = np.asarray(params["params"]["item_embed"]["embedding"])
  after = np.asarray(new["params"]["item_embed"]["embedding"])
  mu = np.asarray(state["mu"]["params"]["item_embed"]["embedding"])
  touched = np.isin(np.arange(10), [1, 2, 5, 7, 9])
  np.testing.assert_array_equal(after[~touched], before[~touched])  # no decay, no drift
  assert not mu[~touched].any()
  assert (np.abs(after[touched] - before[touched]).sum(axis=1) > 0).all()
  assert (np.abs(mu[touched]).sum(axis=1) > 0).all()


def test_bad_sparse_min_rows_is_a_clear_error():
  cfg = load_config(os.path.join(ROOT, "experiments", "configs", "two_tower_ml100k.py") + ":smoke")
  cfg.optimizer.sparse_min_rows = -1
  with pytest.raises(ValueError, match="config.optimizer.sparse_min_rows"):
    train.make_optimizer(cfg.optimizer, 10)


def test_trainer_steps_match_dense_adamw_on_the_rows_they_touch():
  # The real trainer on MovieLens-100k (two-tower, 1,682-row item table, in-batch negatives so that
  # the rows a step looks up are the batch's targets and histories). Two lazy steps and two dense
  # steps from the same state on the same batch (the first has lr = 0: warmup) agree on every
  # non-table parameter and on every looked-up row; the other rows keep their initial value, where
  # dense AdamW's weight decay moves them.
  cfg = load_config(os.path.join(ROOT, "experiments", "configs", "two_tower_ml100k.py") + ":smoke")
  cfg.optimizer.weight_decay = 0.1
  cfg.loss.kind = "in_batch"
  exp = rtask.build_experiment(cfg)
  dense_tx = train.make_optimizer(cfg.optimizer, 100)
  cfg.optimizer.sparse_min_rows = 1000
  lazy_tx = train.make_optimizer(cfg.optimizer, 100)
  assert isinstance(lazy_tx, sparse.SparseTableAdamW)
  key = jax.random.key(0)
  batch = train.example_batch(exp.train_source, cfg.batch_size)
  s_dense = rtask.init_state(exp, dense_tx, key)
  s_lazy = rtask.init_state(exp, lazy_tx, key)
  init = np.asarray(s_dense.params["params"]["item_id_embed"]["embedding"])
  dense_step, lazy_step = rtask.make_train_step(exp, dense_tx), rtask.make_train_step(exp, lazy_tx)
  for _ in range(2):
    s_dense, m_dense = dense_step(s_dense, batch, exp.tables, key)
    s_lazy, m_lazy = lazy_step(s_lazy, batch, exp.tables, key)
    np.testing.assert_allclose(m_lazy["loss"], m_dense["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_lazy["grad_norm"], m_dense["grad_norm"], rtol=1e-4)
  path = ("params", "item_id_embed", "embedding")
  dense_table = np.asarray(s_dense.params["params"]["item_id_embed"]["embedding"])
  lazy_table = np.asarray(s_lazy.params["params"]["item_id_embed"]["embedding"])
  touched = np.zeros(len(init), bool)
  touched[np.asarray(batch["target"])] = True
  touched[np.asarray(batch["history"]).ravel()] = True  # padded positions are looked up too
  assert 100 < touched.sum() < len(touched)
  np.testing.assert_allclose(lazy_table[touched], dense_table[touched], rtol=1e-4, atol=1e-6)
  assert not np.allclose(lazy_table[touched], init[touched])
  np.testing.assert_array_equal(lazy_table[~touched], init[~touched])
  assert (dense_table[~touched] != init[~touched]).mean() > 0.5  # weight decay moved them
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat_l, flat_d = traverse_util.flatten_dict(s_lazy.params), traverse_util.flatten_dict(s_dense.params)
  for p in flat_d:
    if p != path:
      np.testing.assert_allclose(flat_l[p], flat_d[p], rtol=1e-4, atol=1e-6, err_msg=str(p))
