"""Multi-interest models through the shared trainer, evaluator and ScaNN serving path."""

import os

import numpy as np
import pytest

from mvhan_jax import tasks
from mvhan_jax import evaluation
from mvhan_jax import retrieval
from mvhan_jax import train
from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.configs import load_config
from mvhan_jax.metrics_writer import read_metrics



def _config(arg):
  return load_config(f"experiments/configs/mind_ml100k.py:{arg}")


@pytest.mark.parametrize("model", ["mind", "comirec_sa"])
def test_multi_interest_model_learns_and_serves(model, tmp_path):
  cfg = _config(f"model={model},smoke")
  results = tasks.train_and_evaluate(cfg, str(tmp_path))
  losses = [r["train/loss"] for r in read_metrics(str(tmp_path)) if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.2, losses
  assert results["valid"]["HR@50"] > 0.12  # random: 0.03
  assert results["index"]["ann_recall@10"] > 0.8

  exp = rtask.build_experiment(cfg)
  params, _ = rtask.restore_params(str(tmp_path), exp)
  test = exp.eval_sets["test"]
  users, mask = rtask.encode_users(exp, params, test)
  assert users.shape == (len(test.user), 4, cfg.model.dim) and mask.shape == (len(test.user), 4)
  if model == "mind":  # dynamic K'_u = max(1, min(4, floor(log2 |history|)))
    expect = np.clip(np.floor(np.log2(np.maximum(test.history_len, 1))), 1, 4)
    np.testing.assert_array_equal(mask.sum(1), expect)
  # Serving: the saved index answers multi-interest queries like the exact merged search.
  index = retrieval.load_index(os.path.join(str(tmp_path), "index"))
  items = rtask.encode_items(exp, params)
  exact = retrieval.ExactIndex(items)
  a, _ = index.search(users[:50], 10, query_mask=mask[:50])
  b, _ = exact.search(users[:50], 10, query_mask=mask[:50])
  assert retrieval.ann_recall(a, b) > 0.8
  # The evaluator scores a user by the max over live interests: a dead interest never counts.
  ev = evaluation.LeaveOneOutEvaluator(test)
  poisoned = users.copy()
  poisoned[~mask] = 100.0
  assert ev.evaluate(poisoned, items, user_mask=mask) == pytest.approx(results["test"], rel=1e-5)
  # --mode=recommend encodes one user alone: it must get the vectors the evaluation scored (MIND's
  # routing draws are keyed by user id, not by the row in the evaluation chunk).
  one, one_mask = rtask.encode_users(exp, params, test, rows=[3])
  np.testing.assert_allclose(one[0], users[3], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(one_mask[0], mask[3])
  recs = rtask.recommend(exp, index, params, int(test.user[3]), 10)
  assert len({i for i, _ in recs}) == 10
