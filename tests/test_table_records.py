"""Seed records of the long results tables (mvhan_jax/tables.py): a row whose seeds take hours each
is assembled from committed per-seed records made in different sessions, and only from records of
the row's exact config."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from mvhan_jax import configs
from mvhan_jax import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = "experiments/configs/mvhan_ml100k.py:sasrec_paths,gate,steps=12000,dataset=ml1m"


def _config_json(spec: str, seed: int) -> str:
  cfg = configs.load_config(os.path.join(ROOT, spec))
  cfg.seed, cfg.progress = seed, False  # as ml1m_table.py sets them
  return cfg.to_json_best_effort()


def test_a_record_is_read_back_only_for_its_own_config(tmp_path):
  path = str(tmp_path / "row" / "seed0.json")
  results = {"test": {"HR@10": 0.25}, "best_step": 1200}
  assert tables.read_seed_record(path, _config_json(GATE, 0)) is None            # no record yet
  tables.write_seed_record(path, _config_json(GATE, 0), results, "a machine", "python x.py --seeds=0")
  record = tables.read_seed_record(path, _config_json(GATE, 0))
  assert record["results"] == results and record["machine"] == "a machine" and record["command"].endswith("=0")
  assert tables.read_seed_record(path, _config_json(GATE, 1)) is None            # another seed's config
  assert tables.read_seed_record(path, _config_json(GATE.replace("12000", "6000"), 0)) is None
  assert os.listdir(tmp_path / "row") == ["seed0.json"]                         # no temporary file left
  with open(path, "w") as f:
    f.write('{"config": {}')                                                     # cut short
  with pytest.raises(ValueError, match=r"seed0.json: not a seed record.*delete it"):
    tables.read_seed_record(path, _config_json(GATE, 0))


def test_ml1m_table_assembles_a_row_from_records_without_training(tmp_path):
  # Three seeds recorded (as three sessions would leave them): the script writes the row's mean ± std
  # from them, trains nothing (no ML-1M copy, no workdir is needed) and names the seeds.
  records, out = tmp_path / "records", str(tmp_path / "ml1m.md")
  hr10 = [0.30, 0.31, 0.32]
  for seed, hr in enumerate(hr10):
    metrics = {"HR@10": hr, "NDCG@10": hr / 2, "HR@50": 0.5, "NDCG@50": 0.2, "MRR": 0.1}
    tables.write_seed_record(str(records / "mvhan_gate_long" / f"seed{seed}.json"), _config_json(GATE, seed),
                             {"test": metrics, "index": {"ann_recall@50": 0.99}}, "m", "c")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             MVHAN_DATA_DIR=str(tmp_path / "no_data"))
  proc = subprocess.run([sys.executable, "experiments/ml1m_table.py", "--seeds=0,1,2", "--models=mvhan_gate_long",
                         f"--records={records}", f"--out={out}", f"--workdir_root={tmp_path / 'runs'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("read from") == 3 and not os.path.exists(tmp_path / "runs")
  row = next(line for line in open(out).read().splitlines() if line.startswith("| MV-HAN (starts as SASRec"))
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert cells[1] == f"{np.mean(hr10):.4f} ± {np.std(hr10, ddof=1):.4f}" == "0.3100 ± 0.0100"
  assert cells[-2] == "0.9900 ± 0.0000" and cells[-1] == "3"
