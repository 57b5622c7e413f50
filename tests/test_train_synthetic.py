"""The same trainer on a synthetic world: it must learn the world's interest structure."""

import importlib.util
import os

import numpy as np

from mvhan_jax import evaluation
from mvhan_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_tower_beats_popularity_on_a_synthetic_world(tmp_path):
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "experiments/configs/two_tower_synthetic.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config("smoke")
  cfg.index.build = False
  results = train.train_and_evaluate(cfg, str(tmp_path))

  exp = train.build_experiment(cfg)
  counts = np.bincount(np.concatenate(exp.split.train_sequences), minlength=exp.data.num_items).astype(np.float32)
  test = exp.eval_sets["test"]
  pop = evaluation.LeaveOneOutEvaluator(test).evaluate(np.ones((len(test.user), 1), np.float32), counts[:, None])
  # Users draw items from their few interest topics: a model of their history must beat popularity.
  assert results["test"]["HR@50"] > 1.3 * pop["HR@50"], (results["test"], pop)
