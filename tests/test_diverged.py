"""A diverged model must never look perfect: a NaN score compares false with every other score, so
a NaN model used to rank every target first (HR@10 = NDCG@10 = 1.0), be saved as the best, and have
that score written to results.json. The loop stops on a non-finite loss or state without saving it,
the CLI says so in one line, and every evaluation refuses non-finite vectors and scores."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvhan_jax import tasks
from mvhan_jax import train
from mvhan_jax.configs import load_config
from mvhan_jax.metrics_writer import read_metrics
from mvhan_jax.tasks import ranking
from mvhan_jax.tasks import retrieval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TWO_TOWER = "experiments/configs/two_tower_ml100k.py:smoke"


def _all_finite(tree) -> bool:
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def _nan_config():
  # lr = 1e6: the first steps of warmup blow the weights up, and around step 15 a forward pass
  # overflows (the training loss turns NaN, or first the evaluation's user vectors).
  cfg = load_config(_TWO_TOWER)
  cfg.optimizer.lr = 1e6
  cfg.index.build = False
  cfg.tensorboard = False
  cfg.checkpoint_every_steps = 5
  cfg.eval_every_steps = 5
  return cfg


def test_a_diverged_run_stops_and_keeps_only_finite_checkpoints(tmp_path, capsys):
  cfg = _nan_config()
  workdir = tmp_path / "nan"
  with pytest.raises(train.Diverged) as raised:
    tasks.train_and_evaluate(cfg, str(workdir))
  msg = str(raised.value)
  # At step 15 here: the loss is still finite, but the evaluation's forward pass overflows.
  found = re.search(r"diverged at step (\d+): (the training loss is nan|the valid split: user vectors hold)", msg)
  assert found, msg
  step = int(found.group(1))
  assert "config.optimizer.lr (now 1e+06)" in msg, msg
  assert not (workdir / "results.json").exists()
  # The finite steps before it were saved, the diverged one not: the newest checkpoint is finite.
  exp = retrieval.build_experiment(cfg)
  template = retrieval.abstract_state(exp, train.make_optimizer(cfg.optimizer, 1))
  latest = train.checkpoint_manager(workdir / "checkpoints", 2)
  saved = list(latest.all_steps())
  assert saved and max(saved) < step and f"the latest checkpoint (step {max(saved)}) is the last finite one" in msg, msg
  for s in saved:
    state, _ = train.restore_checkpoint(latest, s, template)
    assert _all_finite(state), f"checkpoint {s} holds NaN or inf"
  best, best_step = train.restore_best(workdir, template.params)
  assert best_step <= max(saved) and _all_finite(best)
  # Nothing perfect was logged: the evaluations saw only the finite model.
  valid = [r["valid/HR@10"] for r in read_metrics(workdir) if "valid/HR@10" in r]
  assert valid and max(valid) < 0.5
  # A rerun resumes from the last finite checkpoint (and, the same config, diverges the same way).
  capsys.readouterr()
  with pytest.raises(train.Diverged, match=f"diverged at step {step}:"):
    tasks.train_and_evaluate(cfg, str(workdir))
  assert f"resumed from step {max(saved)}" in capsys.readouterr().out


def test_the_cli_says_diverged_in_one_line_and_exits_1(tmp_path):
  workdir = tmp_path / "nan"
  proc = subprocess.run(
      [sys.executable, "-m", "mvhan_jax.main", f"--config={_TWO_TOWER}", "--config.optimizer.lr=1e6",
       "--config.index.build=False", f"--workdir={workdir}", "--noplots"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "NaN or Inf found" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("mvhan-train:")]
  assert len(lines) == 1 and proc.stderr.strip().endswith(lines[0]), proc.stderr[-3000:]
  # The smoke config logs and saves every 20 steps: the first check after step 15 is step 20.
  assert "diverged at step 20: the training loss is nan" in lines[0], lines[0]
  assert "No checkpoint was saved" in lines[0] and "config.optimizer.lr (now 1e+06)" in lines[0], lines[0]
  assert not (workdir / "results.json").exists()
  assert not [n for n in os.listdir(workdir / "best") + os.listdir(workdir / "checkpoints") if n.isdigit()]
  assert "1.0000" not in proc.stdout


def test_non_finite_parameters_with_a_finite_loss_are_not_saved(tmp_path):
  # The loss of a step is computed before its update: an update that overflows returns NaN
  # parameters with a finite loss. The save point after it must still refuse them.
  cfg = load_config("experiments/configs/hinet_synthetic.py:smoke,model=shared_bottom")
  cfg.total_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps, cfg.log_every_steps = 20, 5, 5, 5
  stage = next(tasks.build_task(cfg).stages(str(tmp_path)))
  inner = stage.train_step

  def overflowing_update_at_step_10(state, batch, consts, key):
    state, metrics = inner(state, batch, consts, key)
    params = jax.tree.map(lambda x: jnp.where(state.step >= 10, jnp.nan, x), state.params)
    return state.replace(params=params), metrics

  stage.train_step = overflowing_update_at_step_10
  with pytest.raises(train.Diverged, match=r"diverged at step 10: the state holds NaN or inf \(the loss is still "
                                           r"finite\).*the latest checkpoint \(step 5\)"):
    train.run_stage(stage, str(tmp_path))
  assert train.checkpoint_manager(tmp_path / "checkpoints", 2).all_steps() == [5]
  assert train.checkpoint_manager(tmp_path / "best", 1).all_steps() == [5]


def _nan_tree(tree):
  return jax.tree.map(lambda x: np.full(np.shape(x), np.nan, np.asarray(x).dtype)
                      if np.issubdtype(np.asarray(x).dtype, np.floating) else x, tree)


def test_retrieval_and_ranking_refuse_to_evaluate_nan_parameters():
  # (SEMINAR: tests/test_seminar.py.) Before, both scored a NaN model perfectly (HR@10 = AUC = 1).
  cfg = load_config(_TWO_TOWER)
  exp = retrieval.build_experiment(cfg)
  params = retrieval.init_state(exp, train.make_optimizer(cfg.optimizer, 1), jax.random.key(0)).params
  with pytest.raises(ValueError, match="valid split: user vectors hold"):
    retrieval.evaluate(exp, _nan_tree(params), "valid")
  cfg = load_config("experiments/configs/hinet_synthetic.py:smoke,model=shared_bottom")
  exp = ranking.build_ranking_experiment(cfg)
  params = ranking.init_state(exp, train.make_optimizer(cfg.optimizer, 1), jax.random.key(0)).params
  with pytest.raises(ValueError, match="test split: ctr predictions hold"):
    ranking.evaluate(exp, _nan_tree(params), "test")
