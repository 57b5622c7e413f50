"""config.warm_start (mvhan_jax/warm_start.py): MV-HAN's gated model loaded from a trained SASRec.

One short SASRec run on MovieLens-100k is the source (conftest.py's sasrec_workdir). With its parameters loaded and the gates at 0,
MV-HAN ranks exactly as that SASRec (the same validation metrics); trained with freeze=True, the
loaded parameters keep their values and the heads move; bad sources and renames are refused."""

import json
import os
import re

import jax
import numpy as np
import pytest

from mvhan_jax import configs
from mvhan_jax import sharding
from mvhan_jax import tasks
from mvhan_jax import train
from mvhan_jax import warm_start
from mvhan_jax.configs import apply_overrides, load_config
from mvhan_jax.tasks import retrieval as rtask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MVHAN = os.path.join(ROOT, "experiments", "configs", "mvhan_ml100k.py")


def _mvhan_config(source, *overrides, freeze=True):
  init = "frozen" if freeze else "tuned"
  cfg = apply_overrides(load_config(f"{MVHAN}:sasrec_paths,sasrec_init={init},smoke"),
                        ["total_steps=20", "eval_every_steps=10", "index.build=False", *overrides])
  cfg.warm_start.workdir = source
  return cfg


def _flat(params):
  return {train.param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_loaded_sasrec_with_closed_gates_ranks_as_that_sasrec(sasrec_workdir):
  cfg = _mvhan_config(sasrec_workdir)
  task = rtask.RetrievalTask(cfg)
  state = rtask.init_state(task.exp, train.make_optimizer(cfg.optimizer, 10), jax.random.key(3))
  source = warm_start.load_source(cfg)
  assert set(source) == {"params/content_embed/id_embed/embedding", "params/position_embed/embedding",
                         *(k for k in source if k.startswith("params/causal_0/")), "params/causal_norm/scale",
                         "params/causal_norm/bias"}
  params = warm_start.merge(sharding.host_local(state.params), source)
  flat = _flat(params)
  # sasrec_lr=: its learning-rate group is exactly the loaded SASRec part.
  lr_cfg = load_config(f"{MVHAN}:sasrec_paths,sasrec_init=tuned,sasrec_lr=0.1,smoke")
  assert lr_cfg.optimizer.group_lr_scale == 0.1
  assert {k for k in flat if re.search(lr_cfg.optimizer.group_pattern, k)} == set(source)
  for bad in ("sasrec_init=frozen,sasrec_lr=0.1", "sasrec_init=tuned,sasrec_lr=0.1,head_lr=2"):
    with pytest.raises(configs.ConfigError, match="sasrec_lr= sets the learning rate of a tuned SASRec part"):
      load_config(f"{MVHAN}:sasrec_paths,{bad},smoke")
  assert float(flat["params/user_gate"]) == 0.0 and float(flat["params/item_gate"]) == 0.0
  got = task.evaluate(params, "valid")
  with open(os.path.join(sasrec_workdir, "results.json")) as f:
    want = json.load(f)["valid"]
  for metric in ("HR@10", "NDCG@10", "HR@50"):
    assert got[metric] == pytest.approx(want[metric], abs=1e-6), metric
  # Left at its initialisation, the same model is a different ranker (the check above can fail).
  assert task.evaluate(state.params, "valid")["NDCG@10"] != pytest.approx(want["NDCG@10"], abs=1e-3)


def test_frozen_warm_start_trains_only_the_heads(sasrec_workdir, tmp_path):
  cfg = _mvhan_config(sasrec_workdir)
  tasks.train_and_evaluate(cfg, str(tmp_path))
  task = rtask.RetrievalTask(cfg)
  best, _ = task.restore_best(str(tmp_path))
  flat = _flat(sharding.host_local(best))
  source = warm_start.load_source(cfg)
  for path, value in source.items():
    np.testing.assert_array_equal(flat[path], value, err_msg=path)
  assert float(flat["params/user_gate"]) != 0.0 or float(flat["params/item_gate"]) != 0.0
  # The latest checkpoint's optimizer state has the frozen layout: it restores (and resumes) too.
  latest, step = rtask.restore_params(str(tmp_path), task.exp, "latest")
  assert step == 20
  np.testing.assert_array_equal(_flat(sharding.host_local(latest))["params/causal_norm/scale"],
                                source["params/causal_norm/scale"])
  # Tuned (not frozen): the loaded parameters move too.
  tuned = _mvhan_config(sasrec_workdir, freeze=False)
  tasks.train_and_evaluate(tuned, str(tmp_path / "tuned"))
  best, _ = rtask.RetrievalTask(tuned).restore_best(str(tmp_path / "tuned"))
  flat = _flat(sharding.host_local(best))
  assert not np.array_equal(flat["params/causal_norm/scale"], source["params/causal_norm/scale"])


def test_bad_sources_and_renames_are_config_errors(sasrec_workdir, tmp_path):
  cfg = _mvhan_config(str(tmp_path / "nowhere"))
  with pytest.raises(configs.ConfigError, match=r"warm_start.workdir=.*nowhere.* holds no best checkpoint"):
    warm_start.load_source(cfg)
  cfg = _mvhan_config(sasrec_workdir)
  cfg.warm_start.rename = (("^params/final_norm/", "params/causal_norm/"),)  # the other names not mapped
  task = rtask.RetrievalTask(cfg)
  params = sharding.host_local(rtask.init_state(task.exp, train.make_optimizer(cfg.optimizer, 10),
                                                jax.random.key(0)).params)
  with pytest.raises(configs.ConfigError, match=r"the source's params/block_0/\S+ \(and 16 more\) has no parameter "
                     r"of that name here \(names here look like \['params/causal_0/"):
    warm_start.merge(params, warm_start.load_source(cfg))
  with pytest.raises(configs.ConfigError, match=r"config.warm_start.workdir=.*sasrec.*: the source's params/block_0/"):
    next(rtask.RetrievalTask(cfg).stages(str(tmp_path / "run")))  # refused before anything trains
  cfg.warm_start.rename = (("(", "x"),)
  with pytest.raises(configs.ConfigError, match=r"rename\[0\] pattern '\(' is not a regular expression"):
    rtask.check_config(cfg)
  # The seed placeholder: one config names every seed's source.
  cfg.warm_start.workdir = "runs/x/seed{seed}"
  cfg.seed = 2
  assert warm_start.source_workdir(cfg) == "runs/x/seed2"
