"""End to end on MovieLens-100k: the trainer learns, writes what it promises, and resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mvhan_jax import tasks
from mvhan_jax import retrieval
from mvhan_jax import train
from mvhan_jax.tasks import retrieval as rtask
from mvhan_jax.configs import load_config
from mvhan_jax.metrics_writer import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "two_tower_ml100k.py")


def _config(**overrides):
  cfg = load_config(f"{CONFIG}:smoke")
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  cfg = _config()
  return cfg, workdir, tasks.train_and_evaluate(cfg, workdir)


def test_smoke_run_learns(smoke_run):
  cfg, workdir, results = smoke_run
  rows = read_metrics(workdir)
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == cfg.total_steps // cfg.log_every_steps
  assert losses[-1] < losses[0] - 0.3, losses
  # A random ranking gives HR@50 = 50/1682 = 0.03; 120 steps must already be far above it.
  assert results["valid"]["HR@50"] > 0.15
  assert results["test"]["HR@50"] > 0.10
  valid_rows = [r for r in rows if "valid/NDCG@10" in r]
  assert [r["step"] for r in valid_rows] == [60, 120]
  assert results["best_step"] == max(valid_rows, key=lambda r: r["valid/NDCG@10"])["step"]


def test_smoke_run_writes_index_and_results(smoke_run):
  cfg, workdir, results = smoke_run
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  assert saved["test"] == pytest.approx(results["test"])
  assert os.listdir(os.path.join(workdir, "tb")), "no TensorBoard event file"
  index = retrieval.load_index(os.path.join(workdir, "index"))
  with open(os.path.join(workdir, "index", "index.json")) as f:
    assert json.load(f)["step"] == results["best_step"]
  assert results["index"]["ann_recall@10"] > 0.8
  # Recommendations never repeat what the user has seen, and the index agrees with exact search.
  exp = rtask.build_experiment(cfg)
  params, _ = rtask.restore_params(workdir, exp)
  test = exp.eval_sets["test"]
  user = int(test.user[5])
  recs = rtask.recommend(exp, index, params, user, 10)
  seen = set(test.exclude_indices[test.exclude_indptr[5]:test.exclude_indptr[6]].tolist())
  assert len(recs) == 10 and not seen & {i for i, _ in recs}
  # Re-evaluating the restored best parameters reproduces the reported test metrics.
  assert rtask.evaluate(exp, params, "test") == pytest.approx(results["test"], rel=1e-6)


def test_killed_run_resumes_to_identical_parameters(tmp_path):
  overrides = {"total_steps": 300, "checkpoint_every_steps": 20, "eval_every_steps": 100, "log_every_steps": 20}
  cfg = _config(**overrides)
  straight = str(tmp_path / "straight")
  tasks.train_and_evaluate(cfg, straight)

  killed = str(tmp_path / "killed")
  args = [sys.executable, "-m", "mvhan_jax.main", f"--config={CONFIG}:smoke", f"--workdir={killed}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()] + ["--config.index.build=False"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  # Kill -9 at an arbitrary moment after the first checkpoints, mid-training.
  while time.time() < deadline and proc.poll() is None:
    steps = [r["step"] for r in read_metrics(killed)] if os.path.exists(os.path.join(killed, "metrics.jsonl")) else []
    if steps and max(steps) >= 50:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed: raise total_steps"
  resumed = tasks.train_and_evaluate(cfg, killed)

  exp = rtask.build_experiment(cfg)
  a, _ = rtask.restore_params(straight, exp, "latest")
  b, step = rtask.restore_params(killed, exp, "latest")
  assert step == cfg.total_steps
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The resumed log equals the uninterrupted one: no lost and no duplicated steps.
  la = [(r["step"], r.get("train/loss"), r.get("valid/NDCG@10")) for r in read_metrics(straight)]
  lb = [(r["step"], r.get("train/loss"), r.get("valid/NDCG@10")) for r in read_metrics(killed)]
  assert la == lb
  assert resumed["valid"] == pytest.approx(json.load(open(os.path.join(straight, "results.json")))["valid"])


def test_bad_config_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="loss.sampler"):
    tasks.train_and_evaluate(_config(**{"loss.sampler": "zipfian"}), str(tmp_path))
  with pytest.raises(ValueError, match="config.batch_size"):
    tasks.train_and_evaluate(_config(batch_size=10**7), str(tmp_path))


def test_early_stopping_stops_when_validation_stalls(tmp_path):
  # lr = 0 freezes the parameters, so validation never improves after the first evaluation.
  cfg = _config(**{"optimizer.lr": 0.0, "eval_every_steps": 20, "early_stopping_patience": 2, "index.build": False})
  results = tasks.train_and_evaluate(cfg, str(tmp_path))
  assert results["stopped_early"] and results["final_step"] == 60 and results["best_step"] == 20


def test_in_batch_negatives_learn(tmp_path):
  cfg = _config(**{"loss.kind": "in_batch", "index.build": False})
  results = tasks.train_and_evaluate(cfg, str(tmp_path))
  losses = [r["train/loss"] for r in read_metrics(str(tmp_path)) if "train/loss" in r]
  assert losses[-1] < losses[0] - 0.3, losses
  assert results["valid"]["HR@50"] > 0.10
