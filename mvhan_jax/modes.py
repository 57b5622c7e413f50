"""What ``mvhan-train --mode=...`` does, for every task: train, eval, index, recommend, plots.

`mvhan_jax.main` holds only the flags; everything here is importable (notebooks, scripts, tests).
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from mvhan_jax import report
from mvhan_jax import tasks
from mvhan_jax import train
from mvhan_jax import workdir as wd

MODES = ("train", "eval", "index", "recommend", "plots")


def run(mode: str, config, workdir, *, user: int | None = None, top_n: int = 10, content_type: str | None = None,
        examples: int = 3, plots: bool = True, compare=()) -> dict | None:
  """Runs ``mode`` for ``config``'s task on ``workdir`` and prints what a person reads."""
  name = tasks.task_name(config)
  if mode in ("index", "recommend") and name != "retrieval":
    raise ValueError(f"--mode={mode} serves a retrieval model from its ScaNN index; config.task={name!r} "
                     "has none: use --mode=train, eval or plots")
  task = tasks.build_task(config)
  if mode == "train":
    results = train.train_and_evaluate(task, workdir)
    if results is None:
      return None
    if jax.process_count() > 1:  # the other modes are single-host reads of the workdir
      if jax.process_index() == 0:
        print(_title(config, results))
        print(task.format_results(results))
      return results
  if mode == "train" or mode == "eval":
    if mode == "eval":
      tree, step = task.restore_best(workdir)
      results = {"valid": task.evaluate(tree, "valid"), "test": task.evaluate(tree, "test"), "best_step": step}
    print(_title(config, results))
    print(task.format_results(results))
    if "index" in results:
      print(f"\nANN index ({results['index']['backend']}) saved to {wd.path(workdir) / 'index'}: "
            f"recall@10 / @50 vs exact = {results['index']['ann_recall@10']:.4f} / {results['index']['ann_recall@50']:.4f}")
    if mode == "eval":
      return results
  if mode == "index":
    from mvhan_jax.tasks import retrieval as rtask  # pylint: disable=import-outside-toplevel
    params, step = task.restore_best(workdir)
    results = {"index": rtask.build_and_save_index(task.exp, params, step, workdir)}
    print(json.dumps(results["index"], indent=2))
    return results
  if mode == "plots" or (mode == "train" and plots):
    write_plots(task, workdir, compare if mode == "plots" else ())
  if mode == "plots" or name != "retrieval":
    return results if mode == "train" else None
  return _serve(task, workdir, mode, user, top_n, content_type, examples, results if mode == "train" else None)


def _title(config, results) -> str:
  return f"\n{config.model.get('name', tasks.task_name(config))} on {config.dataset.name}, best step {results['best_step']}:\n"


def _serve(task, workdir, mode, user, top_n, content_type, examples, results):
  """--mode=recommend (one user) and the example recommendations at the end of --mode=train."""
  from mvhan_jax.tasks import retrieval as rtask  # pylint: disable=import-outside-toplevel
  exp = task.exp
  params, step = task.restore_best(workdir)
  index_dir = wd.path(workdir) / "index"
  if content_type:  # MV-HAN: retrieval restricted to one content type, from that type's own index
    index_dir = index_dir / "types" / content_type
    if not wd.exists(index_dir):
      names = exp.type_names or ()
      raise ValueError(f"--type={content_type!r}: no per-type index at {index_dir}; the run's content "
                       f"types are {list(names)} (per-type indexes exist for typed datasets only)")
  if mode == "train" and not task.config.index.build:
    return results
  index = rtask.load_serving_index(exp, workdir, params, step, index_dir)  # refuses another step's or run's
  if mode == "recommend":
    if user is None:
      raise ValueError("--mode=recommend needs --user=<dense user index>")
    rtask.print_recommendations(exp, index, params, [user], top_n)
    return None
  rng = np.random.default_rng(0)
  test_users = exp.eval_sets["test"].user
  users = rng.choice(test_users, size=min(examples, len(test_users)), replace=False)
  rtask.print_recommendations(exp, index, params, sorted(int(u) for u in users), top_n)
  return results


def write_plots(task, workdir, compare=()) -> list[str]:
  """The evaluation figures of ``workdir`` (and of the ``compare`` workdirs) as PNG in <workdir>/plots."""
  t0 = time.perf_counter()
  workdir = str(workdir)
  if tasks.task_name(task.config) == "retrieval":
    params, step = task.restore_best(workdir)
    runs = [report.collect_run(workdir, loaded=(task.config, task.exp, params, step))]
    runs += [report.collect_run(w) for w in compare]
    paths = report.save_figures(workdir, runs)
  else:
    paths = report.save_training_figures(workdir, list(compare))
  print(f"\n{len(paths)} figures written to {wd.path(workdir) / 'plots'} in {time.perf_counter() - t0:.1f} s")
  return paths
