"""config.optimizer.group_*: one parameter group with its own learning-rate scale and weight decay
(MV-HAN's gated heads against the SASRec part they start from)."""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mvhan_jax import train
from mvhan_jax.configs import load_config
from mvhan_jax.tasks import retrieval as rtask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "mvhan_ml100k.py")


def _opt_cfg(**group):
  return ml_collections.ConfigDict(dict(lr=0.1, weight_decay=0.0, schedule="constant", warmup_steps=1,
                                        final_lr_fraction=1.0, grad_clip=0.0, **group))


def _run(tx, params, grads, steps):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(grads, state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
  return params


def test_group_takes_its_learning_rate_scale_and_weight_decay():
  params = {"params": {"head": {"w": jnp.ones(3)}, "encoder": {"w": jnp.ones(3)}}}
  # Equal gradients: Adam's step is lr * sign(g) (up to eps) once the warm-up's step 0 (lr 0) is past,
  # so after two steps the group has moved 0.1 x the others' distance.
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  tx = train.make_optimizer(_opt_cfg(group_pattern=r"^params/head/", group_lr_scale=0.1, group_weight_decay=0.0), 10)
  out = _run(tx, params, grads, 2)
  moved_head = 1.0 - np.asarray(out["params"]["head"]["w"])
  moved_enc = 1.0 - np.asarray(out["params"]["encoder"]["w"])
  np.testing.assert_allclose(moved_enc, 0.1, rtol=1e-5)
  np.testing.assert_allclose(moved_head, 0.01, rtol=1e-4)
  # Zero gradients: only the decoupled weight decay moves a parameter, w <- w (1 - lr * scale * wd).
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  tx = train.make_optimizer(_opt_cfg(group_pattern="head", group_lr_scale=0.5, group_weight_decay=2.0), 10)
  out = _run(tx, params, zeros, 2)
  np.testing.assert_allclose(out["params"]["head"]["w"], 1.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(out["params"]["encoder"]["w"], 1.0, rtol=1e-6)


def test_a_pattern_that_matches_nothing_is_refused():
  params = {"params": {"encoder": {"w": jnp.ones(3)}}}
  tx = train.make_optimizer(_opt_cfg(group_pattern="heads?/", group_lr_scale=0.1), 10)
  with pytest.raises(ValueError, match=r"group_pattern='heads\?/' matches no parameter .*params/encoder/w"):
    tx.init(params)
  with pytest.raises(ValueError, match=r"group_pattern='\(head' is not a regular expression"):
    train.make_optimizer(_opt_cfg(group_pattern="(head"), 10)
  with pytest.raises(ValueError, match="group_lr_scale=0.0 must be > 0"):
    train.make_optimizer(_opt_cfg(group_pattern="x", group_lr_scale=0.0), 10)


def test_gate_heads_group_is_every_parameter_outside_sasrec():
  """head_lr / head_wd: the group is exactly what `gate` adds to SASRec; the causal encoder, the
  positions and the shared item-id table (SASRec's parameters) keep the base optimizer."""
  cfg = load_config(f"{CONFIG}:smoke,gate,head_lr=0.1,head_wd=0.5")
  assert (cfg.optimizer.group_lr_scale, cfg.optimizer.group_weight_decay) == (0.1, 0.5)
  exp = rtask.build_experiment(cfg)
  state = rtask.abstract_state(exp, train.make_optimizer(cfg.optimizer, 10))
  paths = [train.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
  grouped = {p for p in paths if re.search(cfg.optimizer.group_pattern, p)}
  sasrec = set(paths) - grouped
  others = [p for p in sasrec if not p.startswith(("params/causal_", "params/position_embed/"))]
  assert others == ["params/content_embed/id_embed/embedding"], others
  assert "params/content_embed/id_embed/embedding" in sasrec
  assert {"params/user_gate", "params/item_gate"} <= grouped
  assert any(p.startswith("params/content_heads/") for p in grouped)
  assert any(p.startswith("params/user_fields/") for p in grouped)
  implied = load_config(f"{CONFIG}:head_wd=2.0")
  assert implied.model.sasrec_gate and implied.optimizer.group_weight_decay == 2.0
  assert implied.optimizer.group_lr_scale == 1.0
