"""The same trainer on a synthetic world: it must learn the world's interest structure."""

import numpy as np

from mvhan_jax import tasks
from mvhan_jax import evaluation
from mvhan_jax import train
from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.configs import load_config



def test_two_tower_beats_popularity_on_a_synthetic_world(tmp_path):
  cfg = load_config("experiments/configs/two_tower_synthetic.py:smoke")
  cfg.index.build = False
  results = tasks.train_and_evaluate(cfg, str(tmp_path))

  exp = rtask.build_experiment(cfg)
  counts = np.bincount(np.concatenate(exp.split.train_sequences), minlength=exp.data.num_items).astype(np.float32)
  test = exp.eval_sets["test"]
  pop = evaluation.LeaveOneOutEvaluator(test).evaluate(np.ones((len(test.user), 1), np.float32), counts[:, None])
  # Users draw items from their few interest topics: a model of their history must beat popularity.
  assert results["test"]["HR@50"] > 1.3 * pop["HR@50"], (results["test"], pop)
