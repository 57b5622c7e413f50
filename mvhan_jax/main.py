r"""The one command-line entry point: train, evaluate, index and recommend.

  mvhan-train --config=experiments/configs/two_tower_ml100k.py --workdir=runs/tt --mode=train
  mvhan-train --config=...:smoke --config.optimizer.lr=3e-3 --workdir=runs/tt --mode=eval
  mvhan-train --config=... --workdir=runs/tt --mode=recommend --user=42 --top_n=10
  mvhan-train --config=... --workdir=runs/tt --mode=plots --compare=runs/other,runs/third

--mode=train trains (resuming if the workdir has a checkpoint), evaluates the best-by-validation
parameters on the test users, builds and saves the ANN index, prints the results table and three
example recommendations and, with --plots (default), writes the evaluation figures as PNG into
<workdir>/plots/ (--mode=plots writes only those: HR@K curves, training curves, per-type results,
ANN recall against exact, a 2-D map of user and item vectors; see mvhan_jax/report.py).
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from mvhan_jax import report

config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:args]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, index and results.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "index", "recommend", "plots"], "What to run.")
flags.DEFINE_string("data_dir", None, "Dataset cache directory (default: $MVHAN_DATA_DIR or ~/.cache/mvhan_jax).")
flags.DEFINE_integer("user", None, "Dense user index for --mode=recommend (MovieLens: raw user id - 1).")
flags.DEFINE_integer("top_n", 10, "Recommendations to print.")
flags.DEFINE_string("type", None, "--mode=recommend: retrieve only items of this content type (e.g. 'family').")
flags.DEFINE_integer("examples", 3, "Example users to print after --mode=train.")
flags.DEFINE_bool("plots", True, "--mode=train: also write the evaluation figures into <workdir>/plots/.")
flags.DEFINE_list("compare", [], "--mode=plots: more workdirs drawn beside --workdir (HR@K, training, per type).")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs off TPU/SLURM/Kubernetes: host:port of process 0 "
                    "(or $MVHAN_COORDINATOR_ADDRESS); see mvhan_jax/distributed.py.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes (or $MVHAN_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index (or $MVHAN_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])

FLAGS = flags.FLAGS


def format_table(results: dict, model_name: str) -> str:
  """The run's table: one row per split (validation, test), the metric names as columns; with
  content types, a second table of the per-type metrics (ranking restricted to the type)."""
  rows = {f"{model_name} ({split})": [results[split]] for split in ("valid", "test")}
  test = results["test"]
  table = report.mean_std_table(rows, [k for k in test if "/" not in k])
  types = [k[: -len("/queries")] for k in test if k.endswith("/queries")]
  if types:
    table += "\n\nPer content type (test users whose held-out item has the type, ranked within it):\n\n"
    table += report.mean_std_table({t: [{m: test[f"{t}/{m}"] for m in ("queries", "HR@10", "HR@50", "AUC")}]
                                    for t in types}, ["queries", "HR@10", "HR@50", "AUC"])
  return table


def recommend(exp, index, params, user: int, top_n: int) -> list[tuple[int, float]]:
  """Top-N unseen items for ``user`` from the ANN index, with its whole history as the query."""
  from mvhan_jax import train  # pylint: disable=import-outside-toplevel
  test = exp.eval_sets["test"]
  rows = np.flatnonzero(test.user == user)
  if not len(rows):
    raise ValueError(f"--user={user} is not an evaluated user: use 0..{exp.data.num_users - 1} with >= 3 interactions")
  row = int(rows[0])
  seen = set(test.exclude_indices[test.exclude_indptr[row]:test.exclude_indptr[row + 1]].tolist())
  vec, mask = train.encode_users(exp, params, test, rows=[row])
  ids, scores = index.search(vec, min(top_n + len(seen), index.num_items), query_mask=mask)
  out = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in seen]
  return out[:top_n]


def print_recommendations(exp, index, params, users, top_n) -> None:
  titles = exp.data.item_titles or tuple(f"item {i}" for i in range(exp.data.num_items))
  test = exp.eval_sets["test"]
  for user in users:
    row = int(np.flatnonzero(test.user == user)[0])
    hist = test.history[row, : test.history_len[row]][-3:]
    target = int(test.targets[row, 0])
    print(f"\nUser {user}: recently watched " + "; ".join(titles[i] for i in hist))
    for rank, (item, score) in enumerate(recommend(exp, index, params, user, top_n), 1):
      mark = "  <- held-out test item" if item == target else ""
      print(f"  {rank:2d}. {titles[item]}  ({score:.3f}){mark}")


def write_plots(workdir: str, loaded, compare=()) -> list[str]:
  """The evaluation figures of ``workdir`` (and of the ``compare`` workdirs) as PNG in <workdir>/plots."""
  t0 = time.perf_counter()
  runs = [report.collect_run(workdir, loaded=loaded)] + [report.collect_run(w) for w in compare]
  paths = report.save_figures(workdir, runs)
  print(f"\n{len(paths)} figures written to {os.path.join(workdir, 'plots')} in {time.perf_counter() - t0:.1f} s")
  return paths


def main(argv):
  del argv
  from mvhan_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from mvhan_jax import retrieval  # pylint: disable=import-outside-toplevel
  from mvhan_jax import train  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  if FLAGS.data_dir:
    with config.unlocked():
      config.dataset.data_dir = FLAGS.data_dir
  workdir = FLAGS.workdir
  if FLAGS.mode == "train":
    results = train.train_and_evaluate(config, workdir)
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:  # the other modes are single-host reads of the workdir
      if jax.process_index() == 0:
        print(format_table(results, config.model.name))
      return
  exp = train.build_experiment(config)
  params, step = train.restore_params(workdir, exp, "best")
  if FLAGS.mode == "eval":
    results = {"valid": train.evaluate(exp, params, "valid"), "test": train.evaluate(exp, params, "test"), "best_step": step}
  if FLAGS.mode == "index":
    results = {"index": train.build_and_save_index(exp, params, step, workdir)}
    print(json.dumps(results["index"], indent=2))
    return
  if FLAGS.mode in ("train", "eval"):
    print(f"\n{config.model.name} on {config.dataset.name}, best step {results['best_step']}:\n")
    print(format_table(results, config.model.name))
    if "index" in results:
      print(f"\nANN index ({results['index']['backend']}) saved to {os.path.join(workdir, 'index')}: "
            f"recall@10 / @50 vs exact = {results['index']['ann_recall@10']:.4f} / {results['index']['ann_recall@50']:.4f}")
  if FLAGS.mode == "eval":
    return
  if FLAGS.mode == "plots" or (FLAGS.mode == "train" and FLAGS.plots):
    write_plots(workdir, (config, exp, params, step), FLAGS.compare if FLAGS.mode == "plots" else ())
  if FLAGS.mode == "plots":
    return
  index_dir = os.path.join(workdir, "index")
  if FLAGS.type:  # MV-HAN: retrieval restricted to one content type, from that type's own index
    index_dir = os.path.join(index_dir, "types", FLAGS.type)
    if not os.path.isdir(index_dir):
      names = exp.type_names or ()
      raise app.UsageError(f"--type={FLAGS.type!r}: no per-type index at {index_dir}; the run's content "
                           f"types are {list(names)} (per-type indexes exist for typed datasets only)")
  index = retrieval.load_index(index_dir)
  if FLAGS.mode == "recommend":
    if FLAGS.user is None:
      raise app.UsageError("--mode=recommend needs --user=<dense user index>")
    print_recommendations(exp, index, params, [FLAGS.user], FLAGS.top_n)
  elif FLAGS.mode == "train":
    rng = np.random.default_rng(0)
    users = rng.choice(exp.eval_sets["test"].user, size=min(FLAGS.examples, len(exp.eval_sets["test"].user)), replace=False)
    print_recommendations(exp, index, params, sorted(int(u) for u in users), FLAGS.top_n)


def run():
  logging.set_verbosity(logging.WARNING)
  app.run(main)


if __name__ == "__main__":
  run()
