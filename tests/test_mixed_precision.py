"""config.compute_dtype: the bfloat16 forward pass computes the same loss as float32 within bfloat16
rounding, keeps float32 master weights and gradients, and a bad value is refused."""

import os

import jax
import numpy as np
import pytest

from mvhan_jax import train

from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "mind_ml100k.py")


def _step(dtype: str):
  cfg = load_config(f"{CONFIG}:model=mind,smoke")
  cfg.compute_dtype = dtype
  exp = rtask.build_experiment(cfg)
  tx = train.make_optimizer(cfg.optimizer, 100)
  state = rtask.init_state(exp, tx, jax.random.key(0))
  batch = rtask.train_dataset(exp, 64, seed=0)[1]
  new_state, metrics = rtask.make_train_step(exp, tx)(state, batch, exp.tables, jax.random.key(1))
  return new_state, metrics


def test_bfloat16_forward_matches_float32_and_keeps_float32_weights():
  s32, m32 = _step("float32")
  s16, m16 = _step("bfloat16")
  l32, l16 = float(m32["loss"]), float(m16["loss"])
  # Same rng, same batch, same initial weights: only the forward's rounding differs (bf16: 8 bits of
  # mantissa, ~0.4% per op), so the loss agrees to about a percent, never exactly.
  assert l16 != l32
  assert abs(l16 - l32) / l32 < 0.02
  for leaf in jax.tree.leaves(s16.params):
    assert leaf.dtype == np.float32
  g32, g16 = float(m32["grad_norm"]), float(m16["grad_norm"])
  assert abs(g16 - g32) / g32 < 0.1


def test_unknown_compute_dtype_is_refused():
  with pytest.raises(ValueError, match="compute_dtype"):
    _step("int8")
