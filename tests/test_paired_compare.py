"""experiments/paired_compare.py: two runs compared per user on the same test users."""

import importlib.util
import json
import os

import pytest

from mvhan_jax import tasks
from mvhan_jax.configs import apply_overrides, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MVHAN = os.path.join(ROOT, "experiments", "configs", "mvhan_ml100k.py")
_spec = importlib.util.spec_from_file_location("paired_compare", os.path.join(ROOT, "experiments", "paired_compare.py"))
paired_compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paired_compare)


def _check_means(workdir):
  per, targets = paired_compare.per_user(workdir, "test")
  with open(os.path.join(workdir, "results.json")) as f:
    test = json.load(f)["test"]
  assert len(targets) == len(per["HR@10"]) > 0
  for m in ("HR@10", "NDCG@10", "HR@50"):
    assert per[m].mean() == pytest.approx(test[m], abs=1e-6)
  return targets


def test_per_user_means_are_the_runs_test_metrics(sasrec_workdir, tmp_path):
  targets = _check_means(sasrec_workdir)
  # MV-HAN evaluates per content type (config.eval_per_type): the pooled ranks give the same metrics.
  cfg = apply_overrides(load_config(f"{MVHAN}:sasrec_paths,gate,smoke"),
                        ["total_steps=10", "eval_every_steps=10", "index.build=False"])
  assert cfg.eval_per_type
  tasks.train_and_evaluate(cfg, str(tmp_path))
  assert (_check_means(str(tmp_path)) == targets).all()


def test_a_run_against_itself_differs_by_nothing(sasrec_workdir, tmp_path):
  table = paired_compare.compare([sasrec_workdir], [sasrec_workdir], "test", ["HR@10", "NDCG@10"], resamples=100)
  rows = [r for r in table.splitlines() if r.startswith("| HR@10") or r.startswith("| NDCG@10")]
  assert len(rows) == 2
  for row in rows:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "+0.0000" and cells[5] == "[+0.0000, +0.0000]" and cells[6] == "1.000" and cells[8] == "0 / 0"
  with pytest.raises(ValueError, match="one B per A"):
    paired_compare.compare([sasrec_workdir, sasrec_workdir], [sasrec_workdir], "test", ["HR@10"], resamples=10)
  with pytest.raises(FileNotFoundError, match="config.json"):
    paired_compare.compare([sasrec_workdir], [str(tmp_path)], "test", ["HR@10"], resamples=10)
  with pytest.raises(ValueError, match="not per-user metrics"):
    paired_compare.compare([sasrec_workdir], [sasrec_workdir], "test", ["AUC@3"], resamples=10)
