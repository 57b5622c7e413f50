"""The evaluation plots (mvhan_jax/report.py), `mvhan-train --mode=plots`, and the Colab notebook
experiments/colab/evaluate.ipynb executed headless on a tiny MV-HAN run."""

import json
import os

import numpy as np
import pytest

from mvhan_jax import tasks
from mvhan_jax import report
from mvhan_jax import retrieval
from mvhan_jax.configs import load_config
from mvhan_jax.metrics_writer import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab", "evaluate.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# Plot data helpers
# --------------------------------------------------------------------------------------------------
def test_hr_curve_equals_numpy_reference():
  ranks = np.random.default_rng(0).integers(0, 300, size=500)
  ks = np.arange(1, 101)
  np.testing.assert_allclose(report.hr_curve(ranks, ks), [np.mean(ranks < k) for k in ks])
  # Hand-computed: ranks 0, 0, 3, 9, 150 -> HR@1 = 2/5, HR@4 = 3/5, HR@10 = 4/5, HR@100 = 4/5.
  np.testing.assert_allclose(report.hr_curve([0, 0, 3, 9, 150], [1, 4, 10, 100]), [0.4, 0.6, 0.8, 0.8])
  with pytest.raises(ValueError, match="0-based ranks"):
    report.hr_curve([-1, 2])


def test_read_curves_parses_metrics_log_after_a_resume(tmp_path):
  w = MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(10, {"train/loss": 3.0})
  w.write(20, {"train/loss": 2.0})
  w.write(20, {"valid/HR@10": 0.1})
  w.write(30, {"train/loss": 9.0})      # lost: the run resumes from step 20
  w.truncate_after(20)
  w.write(30, {"train/loss": 1.5})
  w.write(30, {"valid/HR@10": 0.2})
  curves = report.read_curves(str(tmp_path))
  assert set(curves) == {"train/loss", "valid/HR@10"}
  np.testing.assert_array_equal(curves["train/loss"][0], [10, 20, 30])
  np.testing.assert_allclose(curves["train/loss"][1], [3.0, 2.0, 1.5])
  np.testing.assert_array_equal(curves["valid/HR@10"][0], [20, 30])
  np.testing.assert_allclose(curves["valid/HR@10"][1], [0.1, 0.2])
  assert report.read_curves(str(tmp_path / "nowhere")) == {}


def test_pca_2d_of_a_hand_built_example():
  # Centred points on the y axis (spread 2) and the x axis (spread 1): PC 1 = y, PC 2 = x,
  # variance 8 and 2 of 10.
  users = np.array([[1.0, 0.0, 5.0], [-1.0, 0.0, 5.0]])
  items = np.array([[0.0, 2.0, 5.0], [0.0, -2.0, 5.0]])
  (u, i), explained = report.pca_2d(users, items)
  np.testing.assert_allclose(u, [[0.0, 1.0], [0.0, -1.0]], atol=1e-12)
  np.testing.assert_allclose(i, [[2.0, 0.0], [-2.0, 0.0]], atol=1e-12)
  np.testing.assert_allclose(explained, [0.8, 0.2])
  # Any other data: the coordinates are the centred data times the top two right singular vectors,
  # so the map preserves the distances within that plane and the axes are uncorrelated.
  x = np.random.default_rng(1).normal(size=(40, 6)) * [5, 3, 1, 1, 1, 1]
  (a, b), _ = report.pca_2d(x[:15], x[15:])
  xy = np.concatenate([a, b])
  _, _, vt = np.linalg.svd(x - x.mean(0))
  np.testing.assert_allclose(np.abs(xy), np.abs((x - x.mean(0)) @ vt[:2].T), atol=1e-9)
  assert abs(np.corrcoef(xy.T)[0, 1]) < 1e-9


def test_ann_recall_curves_against_exact_search():
  rng = np.random.default_rng(2)
  items = rng.normal(size=(400, 16)).astype(np.float32)
  users = rng.normal(size=(64, 16)).astype(np.float32)
  ks, recall = report.ann_recall_curve(retrieval.ExactIndex(items), users, items, ks=(1, 10, 1000))
  np.testing.assert_array_equal(ks, [1, 10, 400])  # K capped at the catalogue
  np.testing.assert_allclose(recall, 1.0)
  out = report.leaves_recall_curve(retrieval.ExactIndex(items), users, items, k=10)
  if out is None:
    pytest.skip("scann not importable")
  leaves, recall, note = out
  assert leaves[0] == 1 and leaves[-1] == 20 and "20-leaf tree built" in note  # round(sqrt(400))
  # One leaf of 20 misses most of the exact top 10; every leaf (+ exact reordering) finds them.
  assert recall[0] < 0.6 and recall[-1] > 0.95, recall


def test_figures_show_their_data_with_labels():
  ks = np.arange(1, 101)
  fig = report.plot_hr_curves({"a": ks / 100.0, "b": ks / 200.0}, ks)
  ax = fig.axes[0]
  np.testing.assert_allclose(ax.lines[1].get_ydata(), ks / 200.0)
  assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title() == "Test HR@K"
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (HR@10 0.100)", "b (HR@10 0.050)"]

  results = {"m1": {"src/HR@50": 0.5, "tgt/HR@50": 0.25, "src/AUC": 0.9, "tgt/AUC": 0.7},
             "m2": {"src/HR@50": 0.4, "tgt/HR@50": 0.35, "src/AUC": 0.8, "tgt/AUC": 0.75}}
  fig = report.plot_per_type(results, ["src", "tgt"])
  hr_ax, auc_ax = fig.axes
  assert hr_ax.get_title() == "HR@50" and auc_ax.get_ylabel() == "AUC"
  assert [round(p.get_height(), 6) for p in hr_ax.patches] == [0.5, 0.25, 0.4, 0.35]
  assert [t.get_text() for t in hr_ax.get_xticklabels()] == ["src", "tgt"]

  curves = {"run": {"train/loss": (np.array([5, 10]), np.array([2.0, 1.0])),
                    "valid/HR@10": (np.array([10]), np.array([0.3]))}}
  fig = report.plot_training_curves(curves)
  assert [a.get_title() for a in fig.axes if a.get_visible()] == ["train/loss", "valid/HR@10"]
  np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [2.0, 1.0])
  with pytest.raises(ValueError, match="metrics="):
    report.plot_training_curves({"run": {"other": (np.array([1]), np.array([1.0]))}})

  fig = report.plot_embedding_map(np.zeros((3, 2)), np.ones((4, 2)), np.array([1, 1, 2, 2]), ("src", "tgt"),
                                  np.array([0.6, 0.3]))
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [
      "users (test)", "items: src (2)", "items: tgt (2)"]
  assert ax.get_xlabel() == "PC 1 (60% of variance)"
  fig = report.plot_ann_recall({"run": (np.array([1, 10]), np.array([1.0, 0.9]))},
                               {"run": (np.array([1, 2]), np.array([0.5, 1.0]), "a tree")})
  assert len(fig.axes) == 2 and "a tree" in fig.axes[1].get_title()


# --------------------------------------------------------------------------------------------------
# A tiny MV-HAN run: the CLI's figures and the notebook (one test, so that pytest-xdist trains once)
# --------------------------------------------------------------------------------------------------
def _table_value(text: str, row: str, column: str) -> str:
  lines = [l for l in text.splitlines() if l.startswith("| ")]  # rows, not the |---| rule
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  for line in lines[1:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    if cells[0] == row:
      return cells[header.index(column)]
  raise AssertionError(f"row {row!r} not in\n{text}")


def _check_cli_figures(workdir, results):
  from mvhan_jax import modes  # pylint: disable=import-outside-toplevel
  from mvhan_jax import tasks  # pylint: disable=import-outside-toplevel
  loaded = report.load_workdir(workdir)  # the config round-trips through config.json
  assert loaded[3] == results["best_step"]
  paths = modes.write_plots(tasks.build_task(loaded[0]), workdir)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["ann_recall.png", "embedding_map.png", "hr_curves.png", "per_type.png", "training_curves.png"]
  for p in paths:
    assert os.path.dirname(p) == os.path.join(workdir, "plots")
    with open(p, "rb") as f:
      assert f.read(8) == PNG_MAGIC
  # The plotted data agree with what the trainer measured.
  run = report.collect_run(workdir, loaded=loaded, leaves=False)
  assert report.hr_curve(run.ranks, [10, 50]) == pytest.approx([results["test"]["HR@10"], results["test"]["HR@50"]])
  assert dict(zip(run.ann[0], run.ann[1]))[10] == pytest.approx(results["index"]["ann_recall@10"], abs=2e-3)
  assert run.type_names == ("mainstream", "family", "niche")
  assert len(run.item_xy) == len(run.item_type) == 1682


def _check_notebook(workdir, cwd, train_config, train_flags):
  import nbclient  # pylint: disable=import-outside-toplevel
  import nbformat  # pylint: disable=import-outside-toplevel
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1, "the notebook needs one cell tagged 'parameters'"
  assert 'WORKDIRS = ["runs/mvhan_ml100k"]' in params[0].source  # README command 1's workdir
  params[0].source = (f"WORKDIRS = [{workdir!r}]\nNAMES = ['smoke']\nDATA_DIR = None\n"
                      f"TRAIN_CONFIG = {train_config!r}\nTRAIN_FLAGS = {train_flags!r}")
  # timeout: a guard against a hung kernel, not a speed limit (a starved machine may take minutes).
  nbclient.NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
  # The install cell was skipped (the package is importable here) and the table holds the metrics
  # of the re-evaluated best checkpoint: those the trainer wrote to results.json.
  assert "pip install" not in text
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  table = text[text.index("| model | HR@10"):]
  assert _table_value(table, "smoke (test)", "HR@10") == f"{saved['test']['HR@10']:.4f}"
  assert _table_value(table, "smoke (valid)", "NDCG@10") == f"{saved['valid']['NDCG@10']:.4f}"
  assert _table_value(table, "smoke (test)", "targets/AUC") == f"{saved['test']['targets/AUC']:.4f}"
  per_type = text[text.index("| model | mainstream/HR@50"):]
  assert _table_value(per_type, "smoke (test)", "niche/AUC") == f"{saved['test']['niche/AUC']:.4f}"
  assert "['ann_recall', 'embedding_map', 'hr_curves', 'per_type', 'training_curves']" in text
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(images) == 5


def test_cli_and_notebook_on_a_tiny_mvhan_run(tmp_path):
  """The notebook opened cold: its workdir does not exist, so it trains one itself through mvhan-train's
  own flags, then evaluates and plots it; the CLI's figures of the same workdir agree with it."""
  workdir = str(tmp_path / "mvhan_smoke")
  config = os.path.join(ROOT, "experiments", "configs", "mvhan_ml100k.py") + ":smoke,typed"
  flags = ["--config.total_steps=30", "--config.log_every_steps=10", "--config.eval_every_steps=30",
           "--config.checkpoint_every_steps=30", "--config.tensorboard=False"]
  _check_notebook(workdir, str(tmp_path), config, flags)
  assert os.path.exists(os.path.join(workdir, "plots", "hr_curves.png"))  # the notebook's save cell
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["final_step"] == 30
  _check_cli_figures(workdir, results)
