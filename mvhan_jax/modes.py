"""What ``mvhan-train --mode=...`` does, for every task: train, eval, index, recommend, plots.

`mvhan_jax.main` holds only the flags; everything here is importable (notebooks, scripts, tests).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from mvhan_jax import errors
from mvhan_jax import report
from mvhan_jax import tasks
from mvhan_jax import train
from mvhan_jax import workdir as wd

MODES = ("train", "eval", "index", "recommend", "plots")


class UsageError(errors.UserError, ValueError):
  """A command-line value the run cannot use: the message names the flag and the valid values."""


class WorkdirError(errors.UserError, FileNotFoundError):
  """A --workdir (or --compare) that lacks what the mode reads: the message says what to run first."""


def run(mode: str, config, workdir, *, user: int | str | None = None, top_n: int = 10, content_type: str | None = None,
        examples: int = 3, plots: bool = True, compare=()) -> dict | None:
  """Runs ``mode`` for ``config``'s task on ``workdir`` and prints what a person reads.

  Every input is checked before any data is loaded or folder written (`check_inputs`, then the
  task's ``check_config`` when it is built, then the flags that need the data: --user, --type). A
  training run that fails before it wrote anything but config.json removes the workdir it created.
  """
  check_inputs(mode, config, workdir, user=user, top_n=top_n, examples=examples, compare=compare)
  created = mode == "train" and not wd.exists(workdir)
  try:
    return _run(mode, config, workdir, user, top_n, content_type, examples, plots, compare)
  except BaseException:
    if created:
      _remove_if_empty(workdir)
    raise


def check_inputs(mode: str, config, workdir, *, user: int | str | None = None, top_n: int = 10, examples: int = 3,
                 compare=()) -> None:
  """The inputs that need no data: the mode for the config's task, the numbers, and that a workdir
  to read holds a trained model (an absent one would otherwise be created empty by the restore)."""
  if mode not in MODES:
    raise UsageError(f"--mode={mode!r} is unknown: use one of {', '.join(MODES)}")
  name = tasks.task_name(config)
  if mode in ("index", "recommend") and name != "retrieval":
    raise UsageError(f"--mode={mode} serves a retrieval model from its ScaNN index; config.task={name!r} "
                     "has none: use --mode=train, eval or plots")
  if mode == "train":
    tasks.check_training(config)
  if top_n < 1:
    raise UsageError(f"--top_n={top_n} is invalid: ask for >= 1 recommendations")
  if examples < 0:
    raise UsageError(f"--examples={examples} is invalid: use >= 0 example users (0: none)")
  if mode == "recommend" and user is None:
    raise UsageError("--mode=recommend needs --user=<dense user index> (MovieLens: the raw user id - 1; "
                     "an interaction log: the raw id as in the file)")
  if mode == "recommend" and _dataset(config) != "interactions":
    try:
      user = int(user)
    except (TypeError, ValueError):
      raise UsageError(f"--user={user!r} is not a dense user index: give an integer >= 0 (MovieLens: the raw "
                       "user id - 1)") from None
    if user < 0:
      raise UsageError(f"--user={user} is out of range: use a dense user index >= 0 (MovieLens: the raw user id - 1)")
  try:
    wd.path(workdir)
  except ValueError as e:
    raise UsageError(f"--workdir={workdir}: {e}") from None
  data_dir = config.dataset.get("data_dir") if "dataset" in config else None
  if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise UsageError(f"--data_dir={data_dir} is a file: give the folder that caches the datasets (or drop the flag)")
  if mode != "train":
    _check_trained(workdir, "--workdir", needs_best=mode != "plots" or name == "retrieval")
  if mode == "plots":
    for other in compare:
      _check_trained(other, "--compare", needs_best=name == "retrieval")


def _dataset(config) -> str | None:
  return config.dataset.get("name") if "dataset" in config else None


def _check_trained(workdir, flag: str, needs_best: bool) -> None:
  how = "the same --config" if flag == "--workdir" else "its own --config"
  train_it = f"train it first (--mode=train with {how} and --workdir={workdir})"
  if not wd.exists(workdir):
    raise WorkdirError(f"{flag}={workdir} does not exist: {train_it}")
  if needs_best and not wd.exists(wd.path(workdir) / "best"):
    raise WorkdirError(f"{flag}={workdir} holds no best checkpoint (best/): {train_it}, or rerun an interrupted "
                       "training to finish it")


def _holds_results(directory) -> bool:
  """Whether ``directory`` holds any file but config.json (empty folders do not count)."""
  for child in directory.iterdir():
    if child.is_dir() and _holds_results(child):
      return True
    if not child.is_dir() and child.name != "config.json":
      return True
  return False


def _remove_if_empty(workdir) -> None:
  """Removes a workdir this run created when it holds nothing but config.json and empty folders."""
  if jax.process_index() != 0:
    return
  try:
    path = wd.path(workdir)
    if wd.exists(path) and not _holds_results(path):
      path.rmtree()
  except OSError:  # never hide the run's own error behind a clean-up failure
    pass


def _check_task_inputs(task, mode: str, user, content_type: str | None, workdir=None):
  """The flags checked against the loaded data (before training or any restore): --user, --type.
  Returns --user as a dense index (an interaction log's raw id mapped through <workdir>/ids/)."""
  if tasks.task_name(task.config) != "retrieval":
    return user
  from mvhan_jax.tasks import retrieval as rtask  # pylint: disable=import-outside-toplevel
  if mode == "recommend":
    user = rtask.dense_user(task.config, task.exp, workdir, user)
    rtask.test_row(task.exp, user)
  if content_type and mode in ("train", "recommend"):
    names = list(task.exp.type_names or ())
    if not names:
      raise UsageError(f"--type={content_type!r}: this run's dataset has no content types (MV-HAN on MovieLens: "
                       "config.dataset.content_types='genre_family'); drop --type")
    if content_type not in names:
      raise UsageError(f"--type={content_type!r} is not a content type of this run: use one of {', '.join(names)}")
  return user


def _run(mode, config, workdir, user, top_n, content_type, examples, plots, compare):
  name = tasks.task_name(config)
  task = tasks.build_task(config)
  user = _check_task_inputs(task, mode, user, content_type, workdir)
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
  if mode == "train" and (not task.config.index.build or not examples):
    return results  # no index to serve from (config.index.build=False), or no examples asked for
  index_dir = wd.path(workdir) / "index"
  if content_type:  # MV-HAN: retrieval restricted to one content type, from that type's own index
    index_dir = index_dir / "types" / content_type
  if not wd.exists(index_dir):
    raise WorkdirError(f"--workdir={workdir} has no index at {index_dir}: build it with --mode=index (same --config "
                       "and --workdir)")
  params, step = task.restore_best(workdir)
  index = rtask.load_serving_index(exp, workdir, params, step, index_dir)  # refuses another step's or run's
  if mode == "recommend":
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
