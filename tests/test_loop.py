"""The one training loop (mvhan_jax/train.py) with its task plug-ins: SIGTERM saves and resumes,
every task trains through the one CLI, and the loop's stage hooks behave as documented."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mvhan_jax import sparse
from mvhan_jax import tasks
from mvhan_jax import train
from mvhan_jax.configs import load_config
from mvhan_jax.metrics_writer import read_metrics
from mvhan_jax.tasks import ranking
from mvhan_jax.tasks import retrieval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HINET = "experiments/configs/hinet_synthetic.py:smoke"
_OVERRIDES = {"total_steps": 200, "checkpoint_every_steps": 1000, "eval_every_steps": 100, "log_every_steps": 5}


def _config():
  cfg = load_config(_HINET)
  for k, v in _OVERRIDES.items():
    cfg[k] = v
  return cfg


def _cli(workdir):
  return [sys.executable, "-m", "mvhan_jax.main", f"--config={_HINET}", f"--workdir={workdir}", "--noplots"] + [
      f"--config.{k}={v}" for k, v in _OVERRIDES.items()]


def test_sigterm_saves_then_the_rerun_resumes_to_the_uninterrupted_result(tmp_path):
  """SIGTERM (a cloud preemption notice) mid-run: the CLI saves the latest checkpoint at the step it
  reached and exits with 143; rerunning the same command resumes there and ends with the parameters,
  metrics log and results of a run never interrupted."""
  straight = str(tmp_path / "straight")
  want = tasks.train_and_evaluate(_config(), straight)

  workdir = str(tmp_path / "preempted")
  proc = subprocess.Popen(_cli(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before the signal: raise total_steps"
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 143, err[-3000:]
  assert "SIGTERM at step" in err and "rerun the same command to resume" in err, err[-3000:]
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  # No periodic checkpoint before step 100 (evaluation) or 1000: the one there is the SIGTERM save.
  assert saved and 5 <= saved[-1] < _OVERRIDES["total_steps"], saved
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  rerun = subprocess.run(_cli(workdir), cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from step {saved[-1]}" in rerun.stdout
  exp = ranking.build_ranking_experiment(_config())
  a, step_a = ranking.restore_params(straight, exp, "latest")
  b, step_b = ranking.restore_params(workdir, exp, "latest")
  assert step_a == step_b == _OVERRIDES["total_steps"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("examples_per_sec")} for r in rows]
  assert strip(read_metrics(workdir)) == strip(read_metrics(straight))
  got = json.load(open(os.path.join(workdir, "results.json")))
  assert got["test"] == want["test"] and got["best_step"] == want["best_step"]


def test_every_task_is_chosen_by_its_config():
  assert tasks.task_name(load_config("experiments/configs/two_tower_ml100k.py:smoke")) == "retrieval"
  assert tasks.task_name(load_config("experiments/configs/mvhan_ml100k.py:smoke")) == "retrieval"
  assert tasks.task_name(load_config(_HINET)) == "ranking"
  assert tasks.task_name(load_config("experiments/configs/seminar_synthetic.py:smoke")) == "seminar"
  cfg = load_config(_HINET)
  cfg.task = "rankng"
  try:
    tasks.task_name(cfg)
  except ValueError as e:
    assert "rankng" in str(e) and "ranking" in str(e)
  else:
    raise AssertionError("an unknown task must be refused")


def test_early_stopping_and_best_selection_in_the_loop(tmp_path):
  """A stage whose validation metric peaks at the second evaluation: the best checkpoint is that
  step's, and with patience 2 the loop stops two evaluations later."""
  cfg = _config()
  cfg.total_steps, cfg.eval_every_steps, cfg.early_stopping_patience = 60, 10, 2
  task = tasks.build_task(cfg)
  stage = next(task.stages(str(tmp_path)))
  scores = iter([0.5, 0.9, 0.7, 0.6, 0.95, 0.99])
  stage.evaluate = lambda params, split: {"score": next(scores)}
  stage.select_metric = "score"
  _, meta = train.run_stage(stage, str(tmp_path))
  assert meta["best_step"] == 20 and meta["best_metric"] == 0.9
  assert meta["stopped_early"] and meta["final_step"] == 40
  assert train.checkpoint_manager(tmp_path / "best", 1).latest_step() == 20
  assert train.checkpoint_manager(tmp_path / "checkpoints", 2).latest_step() == 40


# --------------------------------------------------------------------------------------------------
# Per-step keys: every random draw of step i uses fold_in(key, i) (the Stage contract)
# --------------------------------------------------------------------------------------------------
def _loss_at_steps(step_fn, state, batch, consts, steps):
  """The loss the step function reports from the same parameters, batch and key with the state's
  step counter set to each of ``steps`` (a copy each time: the step donates its input)."""
  key = jax.random.key(7)
  out = []
  for n in steps:
    state_n = jax.tree.map(jnp.copy, state).replace(step=jnp.asarray(n, jnp.int32))
    out.append(float(step_fn(state_n, batch, consts, key)[1]["loss"]))
  return out


@pytest.fixture(scope="module")
def two_tower_smoke():
  cfg = load_config("experiments/configs/two_tower_ml100k.py:smoke")
  return cfg, retrieval.build_experiment(cfg)


@pytest.mark.parametrize("lazy_rows", [False, True], ids=["dense", "lazy_rows"])
def test_retrieval_steps_draw_new_negatives_every_step(two_tower_smoke, lazy_rows):
  # Sampled softmax: the negatives are the only random draw (dropout 0). Steps 0 and 1 from one
  # state must see different negatives (a step that used the key itself would reuse them, which
  # only a learning threshold noticed), and a step must be a pure function of its counter.
  cfg, exp = two_tower_smoke
  cfg = cfg.copy_and_resolve_references()
  cfg.optimizer.sparse_min_rows = 1000 if lazy_rows else 0
  tx = train.make_optimizer(cfg.optimizer, 100)
  assert isinstance(tx, sparse.SparseTableAdamW) == lazy_rows
  step = retrieval.make_train_step(exp, tx)
  batch = train.example_batch(exp.train_source, cfg.batch_size)
  a, a_again, b = _loss_at_steps(step, retrieval.init_state(exp, tx, jax.random.key(0)), batch, exp.tables, (0, 0, 1))
  assert a == a_again
  assert a != b


class _DropoutOnLogits(nn.Module):
  """A ranking model with dropout (the library's ranking models have none yet): the step's dropout
  key is what makes its logits random."""
  inner: nn.Module

  @nn.compact
  def __call__(self, batch, tables, train=False):
    return nn.Dropout(0.5, deterministic=not train)(self.inner(batch, tables, train))


def test_ranking_step_draws_a_new_dropout_mask_every_step():
  cfg = load_config("experiments/configs/hinet_synthetic.py:smoke,model=shared_bottom")
  exp = ranking.build_ranking_experiment(cfg)
  exp = dataclasses.replace(exp, model=_DropoutOnLogits(exp.model))
  tx = train.make_optimizer(exp.config.optimizer, 100)
  step = ranking.make_train_step(exp, tx)
  batch = {k: v[:64] for k, v in exp.data.splits["train"].items()}
  a, a_again, b = _loss_at_steps(step, ranking.init_state(exp, tx, jax.random.key(0)), batch, exp.tables, (0, 0, 1))
  assert a == a_again
  assert a != b
